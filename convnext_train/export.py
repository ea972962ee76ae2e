"""The export command: a checkpoint of any format we read, written in the format another codebase or
runtime reads, and read back by that library before it is put in place.

    python -m convnext_train.export checkpoint=<file> format=<name> out=<path> [overwrite=true]

`format=` is one of `FORMATS`: `official` (the facebookresearch release's `{"model": ...}` file),
`timm`, `hf` (a save_pretrained directory), `torchvision` (V1 T/S/B/L), `safetensors` (the official
names), `onnx` (for deployment: see convnext_train/deploy.py). The model comes from the checkpoint as
in eval.py and predict.py (`model=` only when it cannot say; `use_ema=`, `trust_checkpoint=`).

What is written goes to a temporary name beside `out`, is read back by the library it is for (timm,
transformers, torchvision, ONNX Runtime; the project's own loader for official and safetensors,
building the model from the file alone) and its logits compared with ours on a fixed batch; only
then is it renamed to `out`. A difference over the tolerance is one line and exit code 2, and
nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from convnext_train.configs import CONFIG_DIR
from convnext_train.data.transforms import EvalPreprocessing
from convnext_train.deploy import OnnxModel, export_onnx, quiet
from convnext_train.errors import UserError, exit_on_user_error
from convnext_train.inference import CheckpointModel, load_checkpoint_model, load_command_model
from convnext_train.models import TIMM_NAMES
from convnext_train.weights import (
    CheckpointError,
    export_hf,
    export_official,
    export_safetensors,
    export_timm,
    export_torchvision,
    official_to_hf,
    official_to_timm,
    official_to_torchvision,
)
from convnext_train.weights.loading import Architecture

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # largest logit difference, relative to the largest logit (>= 1)


@dataclass
class Exported:
    """What is being exported: the model, and what a format may record beside its weights."""

    loaded: CheckpointModel
    preprocessing: EvalPreprocessing
    precision: str
    opset: int | None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def timm_name(self) -> str | None:
        """timm's name for a model of this class and size (not for the `model=` it was built from,
        whose size may have been overridden)."""
        shape = Architecture.of(self.model.state_dict())
        return TIMM_NAMES.get(shape.variant()) if shape is not None else None


@dataclass(frozen=True)
class Format:
    """How one format is checked, written and read back.

    `accepts` raises CheckpointError when the model has no equivalent there; `write` writes to a path
    (a file, or a directory for `directory` formats); `read_back` returns the logits that the
    format's own library computes from what was written; `suffixes` are the file names allowed
    (empty: a directory); `how_to_load` is printed, `{out}` filled in.
    """

    accepts: Callable[[dict], None]
    write: Callable[[Exported, Path], None]
    read_back: Callable[[Exported, Path, torch.Tensor], torch.Tensor]
    library: str
    suffixes: tuple[str, ...]
    how_to_load: str


def _accept_any(state_dict: dict) -> None:
    pass


def _read_ours(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    # The file alone: architecture from its shapes, as eval.py without model= would.
    return load_checkpoint_model(path, None).model(images)


def _read_timm(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    import timm

    weights = exported.model.state_dict()
    if exported.timm_name is not None:
        model = timm.create_model(exported.timm_name, pretrained=False, num_classes=weights["head.weight"].shape[0])
    else:
        from convnext_train.weights.export import timm_model

        model = timm_model(weights, None).to_empty(device="cpu")
    with quiet("timm"):  # its INFO record names the temporary path
        timm.models.load_checkpoint(model, str(path), strict=True)
    return model.eval()(images)


def _read_hf(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per tensor group on stderr
    return AutoModelForImageClassification.from_pretrained(path).eval()(pixel_values=images).logits


def _read_torchvision(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    import torchvision

    from convnext_train.weights.layouts import TORCHVISION_SIZES, architecture

    weights = exported.model.state_dict()
    variant = TORCHVISION_SIZES[tuple(map(tuple, architecture(weights)))]
    builder = getattr(torchvision.models, TIMM_NAMES[variant])  # torchvision's names are timm's: convnext_tiny
    model = builder(weights=None, num_classes=weights["head.weight"].shape[0])
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model.eval()(images)


def _read_onnx(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    return OnnxModel.load(path)(images)[0]


def _write_onnx(exported: Exported, path: Path) -> None:
    export_onnx(
        exported.model,
        path,
        preprocessing=exported.preprocessing,
        class_names=exported.loaded.class_names,
        variant=exported.loaded.variant,
        precision=exported.precision,
        opset=exported.opset,
    )


FORMATS: dict[str, Format] = {
    "official": Format(
        _accept_any,
        lambda e, path: export_official(e.model, path),
        _read_ours,
        "convnext_train's loader",
        (".pth", ".pt"),
        "the official repository: main.py --finetune {out}; here: checkpoint={out} or finetune.checkpoint={out}",
    ),
    "timm": Format(
        lambda sd: official_to_timm(sd),
        lambda e, path: export_timm(e.model, path, e.timm_name),
        _read_timm,
        "timm",
        (".pth", ".pt", ".bin", ".safetensors"),
        "timm.create_model({timm_name!r}, num_classes={num_classes}, pretrained=True, "
        "pretrained_cfg_overlay=dict(file={out!r}, num_classes={num_classes}))",
    ),
    "hf": Format(
        lambda sd: official_to_hf(sd),
        lambda e, path: export_hf(e.model, path, e.loaded.class_names),
        _read_hf,
        "transformers",
        (),
        "transformers.AutoModelForImageClassification.from_pretrained({out!r})",
    ),
    "torchvision": Format(
        lambda sd: official_to_torchvision(sd),
        lambda e, path: export_torchvision(e.model, path),
        _read_torchvision,
        "torchvision",
        (".pth", ".pt"),
        "model = torchvision.models.<convnext_size>(weights=None, num_classes={num_classes}); "
        "model.load_state_dict(torch.load({out!r}))",
    ),
    "safetensors": Format(
        _accept_any,
        lambda e, path: export_safetensors(e.model, path),
        _read_ours,
        "convnext_train's loader",
        (".safetensors",),
        "safetensors.torch.load_file({out!r}) (official names); here: checkpoint={out}",
    ),
    "onnx": Format(
        _accept_any,
        _write_onnx,
        _read_onnx,
        "ONNX Runtime",
        (".onnx",),
        "python predict.py backend=onnxruntime checkpoint={out} images=<folder>",
    ),
}


def run(cfg: DictConfig) -> Path:
    _check(cfg)
    loaded = load_command_model(cfg)
    fmt = FORMATS[cfg.format]
    weights = loaded.model.state_dict()
    try:
        fmt.accepts(weights)
    except CheckpointError as error:
        can = [name for name, other in FORMATS.items() if _accepts(other, weights)]
        raise UserError(
            f"format={cfg.format} cannot take {loaded.variant} ({error.args[0].rstrip('.').split(';')[0]}); "
            f"it can go to format={', '.join(can)}"
        ) from None
    exported = Exported(
        loaded,
        loaded.preprocessing(cfg.img_size, cfg.crop_pct),
        cfg.precision,
        cfg.opset,
    )
    out = Path(cfg.out).expanduser().resolve()
    tolerance = cfg.tolerance if cfg.tolerance is not None else TOLERANCE[cfg.precision]
    images = torch.randn(
        2,
        loaded.model_cfg.get("in_chans", 3),
        *(2 * [exported.preprocessing.img_size]),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        ours = loaded.model(images)
        difference = _write_and_check(fmt, exported, out, images, ours, tolerance, cfg.overwrite)
    print(
        f"wrote {out} (format={cfg.format}, {loaded.variant}, {exported.precision}); read back by {fmt.library}: "
        f"largest logit difference {difference:.2e} (tolerance {tolerance:.0e} x largest logit)"
    )
    print(
        "load it with: "
        + fmt.how_to_load.format(out=str(out), timm_name=exported.timm_name, num_classes=len(loaded.class_names))
    )
    return out


def _accepts(fmt: Format, weights: dict) -> bool:
    try:
        fmt.accepts(weights)
    except CheckpointError:
        return False
    return True


def _write_and_check(
    fmt: Format,
    exported: Exported,
    out: Path,
    images: torch.Tensor,
    ours: torch.Tensor,
    tolerance: float,
    overwrite: bool,
) -> float:
    """Write into a private directory beside `out`, read back, compare, then rename into place (every
    file the export made: ONNX's `.data` beside a large model too). Nothing is left on failure."""
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        written = staging / out.name
        fmt.write(exported, written)
        theirs = fmt.read_back(exported, written, images).float()
        scale = max(1.0, ours.abs().max().item())
        difference = (theirs - ours).abs().max().item() / scale
        if not difference <= tolerance:  # NaN fails too
            raise UserError(
                f"the {fmt.library} read-back of the export differs from this model: largest logit difference "
                f"{difference:.2e} x largest logit, over the tolerance {tolerance:.0e}; nothing was written to {out} "
                "(tolerance= raises the limit, if that difference is expected)"
            )
        for item in sorted(staging.iterdir()):
            _replace(item, out.parent / item.name, overwrite)
        return difference
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(source: Path, target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:  # appeared while exporting
        raise UserError(f"out={target} exists: choose another out=, or add overwrite=true")
    if target.is_dir() and not target.is_symlink():
        aside = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(target, aside)
        os.replace(source, target)
        shutil.rmtree(aside)
    else:
        os.replace(source, target)


def _check(cfg: DictConfig) -> None:
    problems = []
    for key in ("checkpoint", "format", "out"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            problems.append(f"set {key}=")
    if problems:
        raise UserError("invalid export config: " + "; ".join(problems) + f" (format= one of {', '.join(FORMATS)})")
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format} is not a format we write: choose one of {', '.join(FORMATS)}")
    fmt, out = FORMATS[cfg.format], Path(cfg.out).expanduser()
    if fmt.suffixes and out.suffix.lower() not in fmt.suffixes:
        problems.append(f"out={cfg.out}: format={cfg.format} writes a {' or '.join(fmt.suffixes)} file")
    if out.exists() and not cfg.overwrite:
        problems.append(f"out={cfg.out} exists: choose another out=, or add overwrite=true")
    if cfg.precision not in TOLERANCE:
        problems.append(f"precision={cfg.precision}: must be one of {', '.join(TOLERANCE)}")
    elif cfg.precision != "fp32" and cfg.format != "onnx":
        problems.append(f"precision={cfg.precision} is for format=onnx; weight files are written as trained")
    if cfg.img_size is not None and not (isinstance(cfg.img_size, int) and cfg.img_size > 0):
        problems.append(f"img_size={cfg.img_size}: must be null or a positive integer")
    if cfg.crop_pct is not None and not (isinstance(cfg.crop_pct, (int, float)) and 0 < cfg.crop_pct <= 1):
        problems.append(f"crop_pct={cfg.crop_pct}: must be null or in (0, 1]")
    if cfg.tolerance is not None and not (isinstance(cfg.tolerance, (int, float)) and cfg.tolerance > 0):
        problems.append(f"tolerance={cfg.tolerance}: must be null or a positive number")
    if problems:
        raise UserError("invalid export config: " + "; ".join(problems))


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """The Hydra app, here rather than in cli.py with the others because `python -m` runs this module
    (cli.py's `convnext-export` calls it): cli.py importing it and it importing cli.py would be a cycle."""
    run(cfg)


if __name__ == "__main__":
    main()
