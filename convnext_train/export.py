"""The export command: a checkpoint of any format we read, written in the format another codebase or
runtime reads, and read back by that library before it is put in place.

    python -m convnext_train.export checkpoint=<file> format=<name> out=<path> [overwrite=true]

`format=` is one of `FORMATS`: `official` (the facebookresearch release's `{"model": ...}` file),
`timm`, `hf` (a save_pretrained directory), `torchvision` (V1 T/S/B/L), `safetensors` (the official
names), `onnx` (for deployment: see convnext_train/deploy.py). An FCMAE pre-training checkpoint
(experiment=fcmae, no classifier yet) goes to `format=fcmae`: the official `convnextv2_*_fcmae.pt`
layout (MinkowskiEngine's sparse shapes, decoder included), which the official main_finetune.py and
main_pretrain.py read; the bytes written are read back and must give every tensor bit for bit. The model comes from the checkpoint as
in eval.py and predict.py (`model=` only when it cannot say; `use_ema=`, `trust_checkpoint=`).

What is written goes to a temporary name beside `out`, is read back by the library it is for (timm,
transformers, torchvision, ONNX Runtime; the project's own loader for official and safetensors,
building the model from the file alone) and its logits compared with ours on a fixed batch; only
then is it renamed to `out`. A difference over the tolerance is one line and exit code 2, and
nothing is left behind.

One module of about 430 lines because it is one command: the formats' table, the staging and
read-back, and the checks of its arguments share the `Exported` model and are used nowhere else.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import hydra
import timm
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from convnext_train.configs import CONFIG_DIR
from convnext_train.data.transforms import EvalPreprocessing
from convnext_train.deploy import OnnxModel, export_onnx, quiet
from convnext_train.errors import UserError, exit_on_user_error
from convnext_train.inference import CheckpointModel, load_command_model
from convnext_train.models import TIMM_NAMES, build_model
from convnext_train.weights import (
    CheckpointError,
    export_fcmae,
    export_hf,
    export_official,
    export_safetensors,
    export_timm,
    export_torchvision,
    load_weights,
    official_to_hf,
    official_to_timm,
    official_to_torchvision,
    timm_class_arguments,
    timm_model,
)
from convnext_train.weights.files import read_checkpoint
from convnext_train.weights.layouts import (
    TORCHVISION_SIZES,
    architecture,
    detect_format,
)
from convnext_train.weights.loading import Architecture, state_dict_from_checkpoint

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

    @cached_property  # building timm's model to compare its shapes is not free; several steps ask
    def timm_name(self) -> str | None:
        """timm's name for a model of this class, size and layer scale (not for the `model=` it was
        built from, whose size may have been overridden); None when timm names none."""
        weights = self.model.state_dict()
        shape = Architecture.of(weights)
        name = TIMM_NAMES.get(shape.variant()) if shape is not None else None
        return timm_model(weights, name)[1] if name is not None else None


@dataclass(frozen=True)
class Format:
    """How one format is checked, written and read back.

    `accepts` raises CheckpointError when the model has no equivalent there; `write` writes to a path
    (a file, or a directory when `suffixes` is empty); `read_back` returns the logits that the
    format's own library computes from what was written; `how_to_load` is the line printed at the
    end: the call that loads the file.
    """

    accepts: Callable[[dict], None]
    write: Callable[[Exported, Path], None]
    read_back: Callable[[Exported, Path, torch.Tensor], torch.Tensor]
    library: str
    suffixes: tuple[str, ...]
    how_to_load: Callable[[Exported, Path], str]

    def refusal(self, weights: dict) -> str | None:
        """Why the model cannot go to this format (its converter's reason), or None."""
        try:
            self.accepts(weights)
        except CheckpointError as error:
            return error.args[0].rstrip(".").split(";")[0]
        return None


def _accept_any(state_dict: dict) -> None:
    pass


def _accept_rgb(state_dict: dict) -> None:
    stem = state_dict.get("downsample_layers.0.0.weight", state_dict.get("stem.weight"))
    if stem is not None and stem.shape[1] != 3:
        raise CheckpointError(f"its input has {stem.shape[1]} channels; the ONNX input contract is RGB")


def _read_ours(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    # Strictly, into a fresh model of the exported architecture (its config: the file's shapes alone
    # do not say a size no model= config has, nor settings such as layer scale).
    model = build_model(exported.loaded.model_cfg)
    load_weights(model, path)
    return model.eval()(images)


def _read_timm(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    model, _ = timm_model(exported.model.state_dict(), exported.timm_name, device="cpu")
    with quiet("timm"):  # its INFO record names the temporary path
        timm.models.load_checkpoint(model, str(path), strict=True)
    return model.eval()(images)


def _load_timm(exported: Exported, out: Path) -> str:
    classes = len(exported.loaded.class_names)
    if exported.timm_name is not None:
        return (
            f"timm.create_model({exported.timm_name!r}, num_classes={classes}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(out)!r}, num_classes={classes}))"
        )
    arguments = timm_class_arguments(exported.model.state_dict())
    return (
        f"model = timm.models.convnext.ConvNeXt(num_classes={classes}, "
        + ", ".join(f"{key}={value!r}" for key, value in arguments.items())
        + f"); timm.models.load_checkpoint(model, {str(out)!r})"
    )


def _read_hf(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per tensor group on stderr
    return AutoModelForImageClassification.from_pretrained(path).eval()(pixel_values=images).logits


def _torchvision_builder(exported: Exported) -> str:
    """torchvision's function for this size: its names are timm's (convnext_tiny .. convnext_large)."""
    return TIMM_NAMES[TORCHVISION_SIZES[tuple(map(tuple, architecture(exported.model.state_dict())))]]


def _read_torchvision(exported: Exported, path: Path, images: torch.Tensor) -> torch.Tensor:
    builder = getattr(torchvision.models, _torchvision_builder(exported))
    model = builder(weights=None, num_classes=len(exported.loaded.class_names))
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model.eval()(images)


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
        lambda e, out: f"the official main.py --finetune {out}; here checkpoint={out} or finetune.checkpoint={out}",
    ),
    "timm": Format(
        official_to_timm,
        lambda e, path: export_timm(e.model, path, e.timm_name),
        _read_timm,
        "timm",
        (".pth", ".pt", ".bin", ".safetensors"),
        _load_timm,
    ),
    "hf": Format(
        official_to_hf,
        lambda e, path: export_hf(e.model, path, e.loaded.class_names),
        _read_hf,
        "transformers",
        (),
        lambda e, out: f"transformers.AutoModelForImageClassification.from_pretrained({str(out)!r})",
    ),
    "torchvision": Format(
        official_to_torchvision,
        lambda e, path: export_torchvision(e.model, path),
        _read_torchvision,
        "torchvision",
        (".pth", ".pt"),
        lambda e, out: (
            f"model = torchvision.models.{_torchvision_builder(e)}(weights=None, num_classes={len(e.loaded.class_names)}); "
            f"model.load_state_dict(torch.load({str(out)!r}))"
        ),
    ),
    "safetensors": Format(
        _accept_any,
        lambda e, path: export_safetensors(e.model, path),
        _read_ours,
        "convnext_train's loader",
        (".safetensors",),
        lambda e, out: f"safetensors.torch.load_file({str(out)!r}) (official names); here checkpoint={out}",
    ),
    "onnx": Format(
        _accept_rgb,
        _write_onnx,
        lambda e, path, images: OnnxModel.load(path)(images)[0],
        "ONNX Runtime",
        (".onnx",),
        lambda e, out: f"python predict.py backend=onnxruntime checkpoint={out} images=<folder>",
    ),
}


PRETRAINING_FORMAT = "fcmae"  # not a classifier's format: the whole autoencoder, for the official code


def export_pretraining(cfg: DictConfig) -> Path:
    """An FCMAE checkpoint of ours -> the official release's layout (weights/export.py's export_fcmae)."""
    checkpoint = read_checkpoint(cfg.checkpoint, trusted=cfg.trust_checkpoint)
    ours = state_dict_from_checkpoint(checkpoint, use_ema=cfg.use_ema)
    if detect_format(ours) != "fcmae":
        raise UserError(
            f"format=fcmae takes an FCMAE pre-training checkpoint (train.py experiment=fcmae); {cfg.checkpoint} "
            f"is a classifier's: choose one of format={', '.join(FORMATS)}"
        )
    out = Path(cfg.out).expanduser().resolve()
    try:
        export_fcmae(ours, out)
    except OSError as error:
        raise UserError(f"cannot write out={out}: {error.strerror or error}; nothing was written") from error
    print(f"wrote {out} (format=fcmae: the official ConvNeXt-V2 release layout); read back bit for bit")
    print(f"load it with: the official main_finetune.py --finetune {out}; here finetune.checkpoint={out}")
    return out


def run(cfg: DictConfig) -> Path:
    _check(cfg)
    if cfg.format == PRETRAINING_FORMAT:
        return export_pretraining(cfg)
    loaded = load_command_model(cfg)
    fmt = FORMATS[cfg.format]
    weights = loaded.model.state_dict()
    reason = fmt.refusal(weights)
    if reason is not None:
        can = [name for name, other in FORMATS.items() if other.refusal(weights) is None]
        raise UserError(
            f"format={cfg.format} cannot take {loaded.variant} ({reason}); it can go to format={', '.join(can)}"
        )
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
        try:
            difference = _write_and_check(fmt, exported, out, images, ours, tolerance, cfg.overwrite)
        except OSError as error:  # a read-only or missing folder, a name taken by a folder, ...
            raise UserError(f"cannot write out={out}: {error.strerror or error}; nothing was written") from error
    print(
        f"wrote {out} (format={cfg.format}, {loaded.variant}, {exported.precision}); read back by {fmt.library}: "
        f"largest logit difference {difference:.2e} (tolerance {tolerance:.0e} x largest logit)"
    )
    print("load it with: " + fmt.how_to_load(exported, out))
    return out


def _write_and_check(
    fmt: Format,
    exported: Exported,
    out: Path,
    images: torch.Tensor,
    ours: torch.Tensor,
    tolerance: float,
    overwrite: bool,
) -> float:
    """Write into a private directory beside `out`, read back, compare, then rename into place: every
    file the export made (ONNX's `<out>.data` beside a model over 2 GiB too), `out` itself last, so a
    reader never finds it without its data. Nothing is left on failure or interruption."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
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
        made = sorted(staging.iterdir(), key=lambda item: item.name == out.name)
        for item in made:  # appeared while exporting?
            if (out.parent / item.name).exists() and not overwrite:
                raise UserError(f"out={out.parent / item.name} exists: choose another out=, or add overwrite=true")
        for item in made:
            _replace(item, out.parent / item.name)
        stale = out.with_name(out.name + ".data")  # an earlier, larger export's weights
        if fmt is FORMATS["onnx"] and stale.exists() and not (staging / stale.name).exists():
            stale.unlink()
        return difference
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(source: Path, target: Path) -> None:
    if not (target.is_dir() and not target.is_symlink()):
        os.replace(source, target)
        return
    aside = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside, target)  # the old export back where it was
        raise
    shutil.rmtree(aside)


# An existing directory that overwrite=true may replace: what an earlier `format=hf` export wrote.
_EXPORT_DIRECTORY_FILES = (".json", ".safetensors", ".bin", ".md", ".txt")


def _check(cfg: DictConfig) -> None:
    problems = []
    for key in ("checkpoint", "format", "out"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            problems.append(f"set {key}=")
    if problems:
        raise UserError("invalid export config: " + "; ".join(problems) + f" (format= one of {', '.join(FORMATS)})")
    if cfg.format not in (*FORMATS, PRETRAINING_FORMAT):
        raise UserError(
            f"format={cfg.format} is not a format we write: choose one of {', '.join((*FORMATS, PRETRAINING_FORMAT))}"
        )
    out = Path(cfg.out).expanduser().resolve()
    suffixes = FORMATS[cfg.format].suffixes if cfg.format in FORMATS else (".pt", ".pth")
    if suffixes and out.suffix not in suffixes:
        problems.append(f"out={cfg.out}: format={cfg.format} writes a {' or '.join(suffixes)} file")
    if not isinstance(cfg.overwrite, bool):
        problems.append(f"overwrite={cfg.overwrite}: must be true or false")
    elif out.exists() and not cfg.overwrite:
        problems.append(f"out={cfg.out} exists: choose another out=, or add overwrite=true")
    elif out.exists() and out.is_dir() != (not suffixes):
        problems.append(
            f"out={cfg.out} is a {'directory' if out.is_dir() else 'file'}: format={cfg.format} writes a "
            f"{'file' if suffixes else 'directory'} there; choose another out="
        )
    elif out.is_dir() and not _an_earlier_export(out, Path(cfg.checkpoint).expanduser().resolve()):
        problems.append(
            f"out={cfg.out} holds more than an earlier export (folders, or files other than "
            f"{', '.join(_EXPORT_DIRECTORY_FILES)}, or the checkpoint): overwrite=true replaces the whole "
            "directory, so choose another out="
        )
    if cfg.precision not in TOLERANCE:
        problems.append(f"precision={cfg.precision}: must be one of {', '.join(TOLERANCE)}")
    elif cfg.precision != "fp32" and cfg.format != "onnx":
        problems.append(f"precision={cfg.precision} is for format=onnx; weight files are written as trained")
    if cfg.img_size is not None and not (isinstance(cfg.img_size, int) and cfg.img_size > 0):
        problems.append(f"img_size={cfg.img_size}: must be null or a positive integer")
    if cfg.crop_pct is not None and not (isinstance(cfg.crop_pct, (int, float)) and 0 < cfg.crop_pct <= 1):
        problems.append(f"crop_pct={cfg.crop_pct}: must be null or in (0, 1]")
    if cfg.opset is not None and not (cfg.format == "onnx" and isinstance(cfg.opset, int) and cfg.opset >= 18):
        problems.append(
            f"opset={cfg.opset}: format=onnx only, and 18 or later (the exporter's range); null: its default"
        )
    if cfg.tolerance is not None and not (isinstance(cfg.tolerance, (int, float)) and cfg.tolerance > 0):
        problems.append(f"tolerance={cfg.tolerance}: must be null or a positive number")
    if problems:
        raise UserError("invalid export config: " + "; ".join(problems))


def _an_earlier_export(directory: Path, checkpoint: Path) -> bool:
    """Only files an export writes, and neither the checkpoint nor the directory this runs from inside."""
    inside = (Path.cwd(), checkpoint)
    if any(path == directory or directory in path.parents for path in inside):
        return False
    return all(item.is_file() and item.suffix in _EXPORT_DIRECTORY_FILES for item in directory.iterdir())


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """The Hydra app, here rather than in cli.py with the others because `python -m` runs this module
    (cli.py's `convnext-export` calls it): cli.py importing it and it importing cli.py would be a cycle."""
    run(cfg)


if __name__ == "__main__":
    main()
