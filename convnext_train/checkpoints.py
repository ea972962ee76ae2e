"""Checkpoint files: safe reading, atomic saving, and conversion between parameter layouts.

Our models use the official facebookresearch parameter names, so the official release loads as-is.
timm and Hugging Face `transformers` name (and sometimes shape) the same tensors differently; this
module converts both ways so that any of the three loads with `strict=True`, and exports to both.

Sections: errors, reading, saving, extracting the weights, layouts (timm, Hugging Face), loading,
Hugging Face export.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from convnext_train.atomic import write_atomically
from convnext_train.errors import UserError

try:  # numpy >= 2 moved `numpy.core` to `numpy._core`
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:
    from numpy.core.multiarray import scalar as _numpy_scalar

__all__ = [
    "CheckpointError",
    "detect_format",
    "export_hf",
    "hf_to_official",
    "load_weights",
    "official_to_hf",
    "official_to_timm",
    "read_checkpoint",
    "save_checkpoint",
    "state_dict_from_checkpoint",
    "timm_to_official",
    "to_official",
]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
class CheckpointError(UserError):
    """A checkpoint cannot be used; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
# Harmless data classes that real training checkpoints pickle next to the weights: timm's train.py
# and the official ConvNeXt main.py store their argparse `args`; other scripts store metrics as
# numpy scalars (rebuilt from a dtype and raw bytes, so they cannot run code).
_NUMPY_SCALAR_DTYPES = {type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
_SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    _numpy_scalar,
    (_numpy_scalar, "numpy.core.multiarray.scalar"),  # the name numpy 1.x wrote into pickles
    np.dtype,
    *_NUMPY_SCALAR_DTYPES,
]

# torch files from before PyTorch 1.6 are a stream of pickles that starts with this magic number.
_LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> dict:
    """Read a `.safetensors` or torch checkpoint onto the CPU.

    Torch files are unpickled with `weights_only=True` plus the allow-list above, because a pickle
    can run arbitrary code. `trusted=True` (`eval.trust_checkpoint=true`, `finetune.trust_checkpoint=true`) lifts that restriction
    for files whose source you trust.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint file {path} does not exist; check the path and that the download finished.")
    if path.is_dir():
        raise CheckpointError(f"Checkpoint path {path} is a directory; pass the weights file inside it instead.")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        return _read_torch_file(path, trusted)
    except CheckpointError:
        raise
    except PermissionError as error:
        raise CheckpointError(
            f"Checkpoint file {path} cannot be read ({error.strerror}); fix its permissions."
        ) from None
    except Exception as error:  # noqa: BLE001
        # Damaged data surfaces as many types (SafetensorError, RuntimeError, OSError, EOFError,
        # UnpicklingError, struct.error, IndexError, ...); the cause stays chained for debugging.
        raise CheckpointError(
            f"Checkpoint file {path} is truncated or corrupt; download it again or use an older checkpoint."
        ) from error


def _read_torch_file(path: Path, trusted: bool) -> dict:
    if trusted:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as error:
            raise CheckpointError(
                f"Checkpoint file {path} pickles Python objects from code that is not installed here "
                f"({error}); re-save it as a plain state dict where that code exists."
            ) from error
    else:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                if not _is_intact_torch_file(path):
                    raise  # reported as truncated or corrupt by the caller
                raise CheckpointError(
                    f"Checkpoint file {path} contains pickled Python objects{_unsafe_globals_note(path)} "
                    "that could run arbitrary code when loaded; if you trust its source, set "
                    "eval.trust_checkpoint=true for eval.py, finetune.trust_checkpoint=true for train.py "
                    "(trusted=True in Python)."
                ) from None
    # `torch.save(model)` pickles the whole module; only its weights are needed.
    if isinstance(loaded, nn.Module):
        return loaded.state_dict()
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"Checkpoint file {path} holds a {type(loaded).__name__}, not a dict of weights; save the model's "
            "state_dict() (or a dict containing it) instead."
        )
    return dict(loaded)


def _is_intact_torch_file(path: Path) -> bool:
    """After `weights_only` refused a file: True when the file is undamaged, so the refusal is about what
    it contains rather than about corruption."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None  # every member's CRC matches
        except Exception:  # noqa: BLE001 - any failure to read the archive means it is damaged
            return False
    # The legacy format: the magic number, then pickles of the protocol version, system info and data.
    # pickletools only parses opcodes, it runs nothing, so this checks their structure safely.
    with path.open("rb") as file:
        if file.read(len(_LEGACY_TORCH_MAGIC)) != _LEGACY_TORCH_MAGIC:
            return False
        try:
            for _ in range(3):
                for _ in pickletools.genops(file):
                    pass
        except Exception:  # noqa: BLE001 - a pickle that does not parse is damaged
            return False
    return True


def _unsafe_globals_note(path: Path) -> str:
    """' (e.g. posix.system)': what the pickle would import, so the user can judge it; '' when unknown."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only zip-format files can be inspected; the note is optional
        return ""
    return f" ({', '.join(names[:5])})" if names else ""


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` to `path` atomically: a crash or error mid-write never leaves a partial file there.

    `.safetensors` takes a flat name -> tensor dict; any other suffix is written with `torch.save`.
    """
    path = Path(path)
    # Validated before touching the disk.
    tensors = _flat_tensor_dict(obj, path) if path.suffix == ".safetensors" else None
    if tensors is not None:
        # transformers 4.x `from_pretrained` refuses safetensors files without this metadata.
        write_atomically(path, lambda file: file.write(safetensors.torch.save(tensors, metadata={"format": "pt"})))
    else:
        write_atomically(path, lambda file: torch.save(obj, file))


def _flat_tensor_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(value, Tensor) for value in obj.values()):
        raise CheckpointError(
            f"Cannot save {path}: a .safetensors file holds only a flat name -> tensor dict; save training "
            "checkpoints (optimizer, epoch, ...) with a .pth suffix instead."
        )
    return {name: tensor.detach().cpu().contiguous() for name, tensor in obj.items()}


# --------------------------------------------------------------------------------------------------
# Extracting the weights from a checkpoint
# --------------------------------------------------------------------------------------------------
# Where each kind of checkpoint keeps its weights: ours and the official release use `model` /
# `model_ema`; timm's train.py uses `state_dict` / `state_dict_ema`.
_MODEL_KEYS = ("model", "state_dict")
_EMA_KEYS = ("model_ema", "state_dict_ema")


def state_dict_from_checkpoint(obj: Mapping[str, Any], *, use_ema: bool = False) -> dict[str, Tensor]:
    """The model weights in a training checkpoint, release file or plain state dict.

    Prefixes added by wrappers are removed: `module.` (DistributedDataParallel, DataParallel, timm's
    EMA) and `_orig_mod.` (torch.compile).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"A checkpoint must be a dict, got a {type(obj).__name__}; pass a state dict or a checkpoint dict."
        )
    if use_ema:
        weights = next((obj[key] for key in _EMA_KEYS if obj.get(key) is not None), None)
        if weights is None:
            raise CheckpointError(
                f"use_ema was requested but the checkpoint has no EMA weights (its keys: {_preview(obj)}); "
                "load it without use_ema, or use a checkpoint saved with EMA enabled."
            )
    else:
        weights = next((obj[key] for key in _MODEL_KEYS if isinstance(obj.get(key), Mapping)), obj)
    is_state_dict = isinstance(weights, Mapping) and all(isinstance(value, Tensor) for value in weights.values())
    if not is_state_dict or not weights:
        raise CheckpointError(
            f"The checkpoint holds no model weights: expected a state dict or a dict with 'model' or "
            f"'state_dict', found keys {_preview(obj)}."
        )
    return {_strip_wrapper_prefixes(name): tensor for name, tensor in weights.items()}


def _strip_wrapper_prefixes(name: str) -> str:
    name = name.replace("_orig_mod.", "")  # torch.compile may wrap the model or any submodule
    while name.startswith("module."):
        name = name.removeprefix("module.")
    return name


def _preview(names: Mapping[str, Any] | list, limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(map(str, names[:limit]))
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


# --------------------------------------------------------------------------------------------------
# Layouts: renaming rules shared by both directions
# --------------------------------------------------------------------------------------------------
# A rule pairs an official name template with the other layout's, e.g.
# ("stages.{i}.{j}.dwconv.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"); {p} is `weight` or `bias`,
# any other placeholder a number. Rules are tried in order; a name no rule matches is kept, so that
# load_weights reports it as an unexpected key.
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_Rules = list[tuple[re.Pattern[str], str]]


def _template_pattern(template: str) -> re.Pattern[str]:
    pieces = _PLACEHOLDER.split(template)  # literal, placeholder, literal, ..., literal
    regex = ""
    for index, piece in enumerate(pieces):
        if index % 2 == 0:
            regex += re.escape(piece)
        else:
            regex += rf"(?P<{piece}>weight|bias)" if piece == "p" else rf"(?P<{piece}>\d+)"
    return re.compile(regex)


def _compile_rules(pairs: list[tuple[str, str]]) -> tuple[_Rules, _Rules]:
    """(official -> other, other -> official) rules from (official template, other template) pairs."""
    to_other = [(_template_pattern(official), other) for official, other in pairs]
    to_official = [(_template_pattern(other), official) for official, other in pairs]
    return to_other, to_official


def _rename(name: str, rules: _Rules) -> str:
    for pattern, template in rules:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return name


def _reject_isotropic(state_dict: Mapping[str, Tensor], target: str) -> None:
    if "stem.weight" in state_dict or any(name.startswith("blocks.") for name in state_dict):
        raise CheckpointError(
            f"This is an isotropic ConvNeXt checkpoint, which has no {target} equivalent; keep it in the "
            "official format."
        )


# --------------------------------------------------------------------------------------------------
# timm (`timm.models.convnext.ConvNeXt`)
# --------------------------------------------------------------------------------------------------
_TIMM_TO, _TIMM_FROM = _compile_rules(
    [
        ("downsample_layers.0.{m}.{p}", "stem.{m}.{p}"),
        ("downsample_layers.{i}.{m}.{p}", "stages.{i}.downsample.{m}.{p}"),
        ("stages.{i}.{j}.dwconv.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"),
        ("stages.{i}.{j}.norm.{p}", "stages.{i}.blocks.{j}.norm.{p}"),
        ("stages.{i}.{j}.pwconv1.{p}", "stages.{i}.blocks.{j}.mlp.fc1.{p}"),
        ("stages.{i}.{j}.pwconv2.{p}", "stages.{i}.blocks.{j}.mlp.fc2.{p}"),
        ("stages.{i}.{j}.gamma", "stages.{i}.blocks.{j}.gamma"),
        ("stages.{i}.{j}.grn.gamma", "stages.{i}.blocks.{j}.mlp.grn.weight"),
        ("stages.{i}.{j}.grn.beta", "stages.{i}.blocks.{j}.mlp.grn.bias"),
        ("norm.{p}", "head.norm.{p}"),
        ("head.{p}", "head.fc.{p}"),
    ]
)
_TIMM_MLP_WEIGHT = re.compile(r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]\.weight")


def timm_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm names and shapes -> official ones.

    timm's small models (atto..nano) set `conv_mlp=True`: their MLP weights are 1x1 convolutions
    [out, in, 1, 1], which become the official Linear's [out, in]. timm keeps GRN parameters as (C,),
    the official code as (1, 1, 1, C).
    """
    converted = {}
    for name, tensor in state_dict.items():
        official_name = _rename(name, _TIMM_FROM)
        if official_name.endswith((".pwconv1.weight", ".pwconv2.weight")):
            tensor = tensor.flatten(1)
        elif official_name.endswith((".grn.gamma", ".grn.beta")):
            tensor = tensor.reshape(1, 1, 1, -1)
        converted[official_name] = tensor
    return converted


def official_to_timm(state_dict: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Official names and shapes -> timm ones.

    Pass the timm `model` when it uses `conv_mlp=True`: its MLP weights are then reshaped to its 1x1
    convolution shapes (a state dict alone does not say which of the two forms the target uses).
    """
    _reject_isotropic(state_dict, "timm")
    target_shapes = {} if model is None else {name: tensor.shape for name, tensor in model.state_dict().items()}
    converted = {}
    for name, tensor in state_dict.items():
        timm_name = _rename(name, _TIMM_TO)
        if timm_name.endswith((".mlp.grn.weight", ".mlp.grn.bias")):
            tensor = tensor.reshape(-1)
        elif _TIMM_MLP_WEIGHT.fullmatch(timm_name) and timm_name in target_shapes:
            # Same element count: the 2-D <-> 1x1-conv case; anything else is a real mismatch that
            # the target's load_state_dict should report.
            if tensor.numel() == target_shapes[timm_name].numel():
                tensor = tensor.reshape(target_shapes[timm_name])
        converted[timm_name] = tensor
    return converted


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers (`ConvNextForImageClassification`, `ConvNextV2ForImageClassification`)
# --------------------------------------------------------------------------------------------------
# Names below the backbone prefix (`convnext.` or `convnextv2.`); the classifier sits outside it.
_HF_TO, _HF_FROM = _compile_rules(
    [
        ("downsample_layers.0.0.{p}", "embeddings.patch_embeddings.{p}"),
        ("downsample_layers.0.1.{p}", "embeddings.layernorm.{p}"),
        ("downsample_layers.{i}.{m}.{p}", "encoder.stages.{i}.downsampling_layer.{m}.{p}"),
        ("stages.{i}.{j}.dwconv.{p}", "encoder.stages.{i}.layers.{j}.dwconv.{p}"),
        ("stages.{i}.{j}.norm.{p}", "encoder.stages.{i}.layers.{j}.layernorm.{p}"),
        ("stages.{i}.{j}.pwconv1.{p}", "encoder.stages.{i}.layers.{j}.pwconv1.{p}"),
        ("stages.{i}.{j}.pwconv2.{p}", "encoder.stages.{i}.layers.{j}.pwconv2.{p}"),
        ("stages.{i}.{j}.gamma", "encoder.stages.{i}.layers.{j}.layer_scale_parameter"),
        ("stages.{i}.{j}.grn.gamma", "encoder.stages.{i}.layers.{j}.grn.weight"),
        ("stages.{i}.{j}.grn.beta", "encoder.stages.{i}.layers.{j}.grn.bias"),
        ("norm.{p}", "layernorm.{p}"),
        ("head.{p}", "classifier.{p}"),
    ]
)
_HF_BACKBONE_PREFIX = re.compile(r"^convnext(v2)?\.")


def hf_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face names -> official ones (the shapes are the same, GRN included)."""
    return {_rename(_HF_BACKBONE_PREFIX.sub("", name), _HF_FROM): tensor for name, tensor in state_dict.items()}


def official_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official names -> those of `ConvNextForImageClassification`, or of the V2 class when the
    weights have GRN."""
    _reject_isotropic(state_dict, "Hugging Face")
    prefix = "convnextv2." if _is_v2(state_dict) else "convnext."
    converted = {}
    for name, tensor in state_dict.items():
        hf_name = _rename(name, _HF_TO)
        converted[hf_name if hf_name.startswith("classifier.") else prefix + hf_name] = tensor
    return converted


def _is_v2(state_dict: Mapping[str, Tensor]) -> bool:
    return any(name.endswith(".grn.gamma") for name in state_dict)


# --------------------------------------------------------------------------------------------------
# Loading into our models
# --------------------------------------------------------------------------------------------------
_HF_MARKER = re.compile(r"(convnext(v2)?\.)?(embeddings|encoder)\.")
_TIMM_MARKER = re.compile(r"stem\.\d+\.|stages\.\d+\.(blocks|downsample)\.|head\.(fc|norm)\.")


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """The layout of a state dict's names: "hf", "timm", "fcmae" or "official".

    Anything not recognisably timm or Hugging Face counts as official: loading it then reports exactly
    which names differ, which says more than refusing to guess.
    """
    # Before Hugging Face's: a bare HF model's names start with `encoder.` too (`encoder.stages.`).
    if any(name == "mask_token" or name.startswith("encoder.downsample_layers.") for name in state_dict):
        return "fcmae"
    if any(_HF_MARKER.match(name) for name in state_dict):
        return "hf"
    if any(_TIMM_MARKER.match(name) for name in state_dict):
        return "timm"
    return "official"


# --------------------------------------------------------------------------------------------------
# ConvNeXt V2 FCMAE pre-training (the official `convnextv2_*_fcmae.pt` release)
# --------------------------------------------------------------------------------------------------
# The FCMAE encoder is a sparse (MinkowskiEngine) ConvNeXt V2 under `encoder.`; beside it sit the
# decoder, the mask token and the projection/prediction layers, which fine-tuning drops. Sparse
# modules store convolutions as `kernel` tensors of shape (k*k, in, out), or (k*k, C) depthwise,
# with the kernel's two spatial axes in the opposite order; LayerNorm and Linear weights one module
# deeper (`.ln.`, `.linear.`); biases and GRN parameters as (1, C). Only the encoder's blocks and
# downsampling layers exist: the final norm and the head are trained from scratch when fine-tuning.
FCMAE_DROPPED = ("decoder", "mask_token", "proj", "pred")
FCMAE_MISSING = ("norm.", "head.")  # not in the encoder; fine-tuning initialises them


def fcmae_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        if any(part in name for part in FCMAE_DROPPED):
            continue
        parts = name.removeprefix("encoder.").split(".")
        if parts[-1] == "kernel":
            parts[-1] = "weight"
            if value.ndim == 3:  # (k*k, in, out) -> (out, in, k, k)
                taps, in_dim, out_dim = value.shape
                size = math.isqrt(taps)
                value = value.permute(2, 1, 0).reshape(out_dim, in_dim, size, size).transpose(3, 2)
            else:  # depthwise (k*k, C) -> (C, 1, k, k)
                taps, dim = value.shape
                size = math.isqrt(taps)
                value = value.permute(1, 0).reshape(dim, 1, size, size).transpose(3, 2)
        elif len(parts) >= 2 and parts[-2] in ("ln", "linear"):
            del parts[-2]
        name = ".".join(parts)
        if ".grn." in name:
            value = value.reshape(1, 1, 1, -1)
        elif parts[-1] == "bias":
            value = value.reshape(-1)
        out[name] = value.contiguous()
    return out


def to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> official names and shapes."""
    converters = {"hf": hf_to_official, "timm": timm_to_official, "fcmae": fcmae_to_official, "official": dict}
    return converters[detect_format(state_dict)](state_dict)


def load_weights(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    use_ema: bool = False,
    trusted: bool = False,
) -> None:
    """Load a checkpoint (a path, or a dict already read) of any supported layout into `model`, strictly.

    `trusted` applies when `checkpoint` is a path; see `read_checkpoint`.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint, trusted=trusted)
    state_dict = to_official(state_dict_from_checkpoint(checkpoint, use_ema=use_ema))
    _check_fits(model, state_dict)
    model.load_state_dict(state_dict, strict=True)


def load_pretrained(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    use_ema: bool = False,
    trusted: bool = False,
) -> bool:
    """Start fine-tuning from a checkpoint of any supported layout: every weight must fit, except a
    classifier head for another number of classes (ImageNet-22K -> 1K, say), which keeps the
    model's fresh initialisation, as the official fine-tuning does; an FCMAE pre-training checkpoint
    (no head, no final norm) leaves those initialised too. Returns whether the head was."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint, trusted=trusted)
    raw = state_dict_from_checkpoint(checkpoint, use_ema=use_ema)
    state_dict = to_official(raw)
    fresh = model.state_dict()
    head_differs = any(
        k in state_dict and state_dict[k].shape != fresh[k].shape for k in fresh if k.startswith("head.")
    )
    keep_fresh = ("head.",) if head_differs else ()
    if detect_format(raw) == "fcmae":
        keep_fresh = FCMAE_MISSING
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(keep_fresh)}
    state_dict |= {k: v for k, v in fresh.items() if k.startswith(keep_fresh)}
    _check_fits(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return "head." in keep_fresh


def _check_fits(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Raise a readable CheckpointError instead of load_state_dict's wall of text."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    mismatched = [
        f"{name} (checkpoint {list(state_dict[name].shape)}, model {list(tensor.shape)})"
        for name, tensor in expected.items()
        if name in state_dict and state_dict[name].shape != tensor.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    findings = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
    problems = [f"{label}: {_preview(names, limit=5)}" for label, names in findings.items() if names]
    raise CheckpointError(
        f"The checkpoint is for a different architecture than this {type(model).__name__} "
        f"({'; '.join(problems)}); choose the model config the checkpoint was trained with."
    )


# --------------------------------------------------------------------------------------------------
# Hugging Face export
# --------------------------------------------------------------------------------------------------
def export_hf(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Write `model` as a directory that `ConvNextForImageClassification.from_pretrained` (or the V2
    class, for ConvNeXt V2) loads: `config.json` and `model.safetensors`.

    The architecture is read off the weights, so any of our hierarchical models can be exported.
    """
    state_dict = model.state_dict()
    _reject_isotropic(state_dict, "Hugging Face")
    try:
        from transformers import ConvNextConfig, ConvNextV2Config
    except ImportError:
        raise CheckpointError(
            "export_hf needs the transformers package; install it with `pip install transformers`."
        ) from None

    stages = range(4)
    # The stem is the first downsampling layer, conv then norm; the others are norm then conv.
    convolutions = ["downsample_layers.0.0.weight"] + [f"downsample_layers.{i}.1.weight" for i in stages[1:]]
    settings = dict(
        num_channels=state_dict["downsample_layers.0.0.weight"].shape[1],
        hidden_sizes=[state_dict[name].shape[0] for name in convolutions],
        # Block names are `stages.<stage>.<block>.<...>`: count the distinct block indices per stage.
        depths=[len({name.split(".")[2] for name in state_dict if name.startswith(f"stages.{i}.")}) for i in stages],
        num_labels=state_dict["head.weight"].shape[0],
        # Our final LayerNorm uses the official eps; transformers defaults to 1e-12.
        layer_norm_eps=1e-6,
    )
    if _is_v2(state_dict):
        config = ConvNextV2Config(architectures=["ConvNextV2ForImageClassification"], **settings)
    else:
        # The value only decides whether layer scale exists; the exported weights replace it.
        has_layer_scale = any(re.fullmatch(r"stages\.\d+\.\d+\.gamma", name) for name in state_dict)
        config = ConvNextConfig(
            architectures=["ConvNextForImageClassification"],
            layer_scale_init_value=1e-6 if has_layer_scale else 0.0,
            **settings,
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_checkpoint(official_to_hf(state_dict), out_dir / "model.safetensors")
