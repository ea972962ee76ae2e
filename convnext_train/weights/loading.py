"""Our models' weights from a checkpoint: found inside it, converted to the official layout, and
loaded strictly, with a one-line error when they do not fit.

`load_weights` is for evaluation (every tensor must fit); `load_pretrained` starts fine-tuning
(a head for another class count, or FCMAE's missing head and norm, keep their initialisation).
A Hugging Face directory's config.json is checked against the model first, so that a checkpoint of
another size says which `model=` it is rather than listing the tensors that differ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from convnext_train import configs
from convnext_train.weights.errors import CheckpointError
from convnext_train.weights.files import read_checkpoint
from convnext_train.weights.layouts import FCMAE_MISSING, architecture, detect_format, is_v2, to_official

__all__ = ["load_pretrained", "load_weights", "state_dict_from_checkpoint", "variant_named"]


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
# Loading into our models
# --------------------------------------------------------------------------------------------------
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
    _check_hf_config(model, checkpoint, labels=True)
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
    _check_hf_config(model, checkpoint, labels=False)
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
# A Hugging Face directory's config.json against the model
# --------------------------------------------------------------------------------------------------
_FAMILIES = {"convnext": "ConvNeXt", "convnextv2": "ConvNeXt V2"}


def _check_hf_config(model: nn.Module, checkpoint: Mapping[str, Any], *, labels: bool) -> None:
    """One line naming the `model=` that fits when config.json describes another family, depth or width;
    with `labels`, also when its class count is not the model's (fine-tuning replaces the head)."""
    config = (checkpoint.get("hf_config") if isinstance(checkpoint, Mapping) else None) or {}
    if config.get("model_type") not in _FAMILIES:
        return  # not a ConvNeXt config (or none): the weights' own names will say what differs
    family = _FAMILIES[config["model_type"]]
    depths, dims = list(config.get("depths", [])), list(config.get("hidden_sizes", []))
    ours = model.state_dict()
    shape = architecture(ours)
    same_family = shape is not None and is_v2(ours) == (config["model_type"] == "convnextv2")
    if not same_family or shape != (depths, dims):
        this = (
            "an isotropic ConvNeXt"
            if shape is None
            else f"a {_FAMILIES['convnextv2' if is_v2(ours) else 'convnext']} with depths {shape[0]}, dims {shape[1]}"
        )
        variant = variant_named(config["model_type"], depths, dims)
        fix = (
            f"use model={variant}"
            if variant
            else f"no conf/model config has that size: pass a {family} model= with model.depths={depths} "
            f"model.dims={dims}"
        )
        raise CheckpointError(
            f"config.json describes a {family} with depths {depths} and hidden_sizes {dims}, but the model is "
            f"{this}; {fix}."
        )
    classes = ours["head.weight"].shape[0]
    # transformers writes the class count as the id2label table; older configs say num_labels.
    num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", classes)
    if labels and num_labels != classes:
        raise CheckpointError(
            f"config.json has {num_labels} labels but the model {classes} classes; set data.num_classes={num_labels} "
            "(or fine-tune from it with finetune.checkpoint, which re-initialises the head)."
        )


def variant_named(model_type: str, depths: list[int], dims: list[int]) -> str | None:
    """The conf/model config of this family and size, if there is one."""
    target = "ConvNeXtV2" if model_type == "convnextv2" else "ConvNeXt"
    for name in configs.options("model"):
        cfg = configs.load("model", name)
        same_size = list(cfg.get("depths", [])) == depths and list(cfg.get("dims", [])) == dims
        if same_size and cfg.get("_target_", "").rsplit(".", 1)[-1] == target:
            return name
    return None
