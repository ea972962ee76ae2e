"""Our models' weights from a checkpoint: found inside it, converted to the official layout, and
loaded strictly, with a one-line error when they do not fit.

`load_weights` is for evaluation (every tensor must fit); `load_pretrained` starts fine-tuning
(a head for another class count, or FCMAE's missing head and norm, keep their initialisation).
Whatever the format, the converted weights are checked against the model first (`Architecture`):
a checkpoint of another family or size says which `model=` it is, rather than listing the tensors
that differ; the list is for what else can differ (layer scale, input channels).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from torch import Tensor, nn

from convnext_train import configs
from convnext_train.weights.errors import CheckpointError
from convnext_train.weights.files import read_checkpoint
from convnext_train.weights.layouts import (
    FCMAE_MISSING,
    architecture,
    detect_format,
    fcmae_from_release,
    fcmae_to_official,
    is_isotropic,
    is_v2,
    to_official,
)

__all__ = ["Architecture", "load_pretrained", "load_weights", "state_dict_from_checkpoint"]


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
    if _is_fcmae(model):
        _load_fcmae(model, state_dict_from_checkpoint(checkpoint, use_ema=use_ema), decoder_required=True)
        return
    state_dict = to_official(state_dict_from_checkpoint(checkpoint, use_ema=use_ema))
    _check_same_model(model, state_dict, classes=True)
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
    if _is_fcmae(model):  # continuing pre-training: the decoder too, where the checkpoint has one
        _load_fcmae(model, raw, decoder_required=False)
        return False
    state_dict = to_official(raw)
    _check_same_model(model, state_dict, classes=False)
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


def _is_fcmae(model: nn.Module) -> bool:
    """An FCMAE (models/fcmae.py), told by its names: weights/ knows layouts, not model classes."""
    return detect_format(model.state_dict()) == "fcmae"


def _load_fcmae(model: nn.Module, raw: Mapping[str, Tensor], *, decoder_required: bool) -> None:
    """Into an FCMAE: an FCMAE checkpoint (the official sparse release or ours) whole; or, unless
    `decoder_required`, any other checkpoint's encoder (a V2 classifier's), the decoder fresh."""
    fresh = model.state_dict()
    if detect_format(raw) == "fcmae":
        state_dict = fcmae_from_release(raw)
    elif decoder_required:
        raise CheckpointError("The checkpoint is not an FCMAE one (it has no decoder); the model is an FCMAE.")
    else:
        encoder = {k: v for k, v in to_official(raw).items() if not k.startswith(FCMAE_MISSING)}
        state_dict = {f"encoder.{k}": v for k, v in encoder.items()}
        state_dict |= {k: v for k, v in fresh.items() if not k.startswith("encoder.")}
    _check_same_encoder(fresh, state_dict)
    _check_fits(model, state_dict)
    model.load_state_dict(state_dict, strict=True)


def _check_same_encoder(ours: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> None:
    """One line naming the model= whose encoder the checkpoint's is, when it is another size."""
    _check_same_architecture(
        fcmae_to_official(theirs), fcmae_to_official(ours), "The checkpoint's encoder is", "the model's is"
    )


def _check_same_architecture(theirs: Mapping[str, Tensor], ours: Mapping[str, Tensor], holds: str, is_: str) -> None:
    """One line naming the `model=` that fits when official-layout weights `theirs` are another
    family or size than `ours`: "<holds> <theirs>, but <is_> <ours>; <fix>"."""
    their_shape, our_shape = Architecture.of(theirs), Architecture.of(ours)
    if their_shape is not None and our_shape is not None and their_shape != our_shape:
        variant = their_shape.variant()
        fix = f"use model={variant}" if variant else f"no model= config has that size: pass {their_shape.overrides()}"
        raise CheckpointError(f"{holds} {their_shape}, but {is_} {our_shape}; {fix}.")


def _check_same_model(model: nn.Module, state_dict: Mapping[str, Tensor], *, classes: bool) -> None:
    """One line naming the `model=` that fits when the (official-layout) weights are for another
    family or size than `model`; with `classes`, one naming data.num_classes when only the head's
    class count differs (fine-tuning re-initialises the head instead)."""
    ours = model.state_dict()
    _check_same_architecture(state_dict, ours, "The checkpoint holds", "the model is")
    if classes and "head.weight" in state_dict and "head.weight" in ours:
        count, ours_count = state_dict["head.weight"].shape[0], ours["head.weight"].shape[0]
        if count != ours_count:
            raise CheckpointError(
                f"The checkpoint has a {count}-class head but the model {ours_count} classes; set "
                f"data.num_classes={count} (or fine-tune from it with finetune.checkpoint, which re-initialises the head)."
            )


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
# Which model a set of weights is for
# --------------------------------------------------------------------------------------------------
# Our model classes (a conf/model config's `_target_`, last part) as a message names them.
_FAMILIES = {"ConvNeXt": "a ConvNeXt", "ConvNeXtV2": "a ConvNeXt V2", "ConvNeXtIsotropic": "an isotropic ConvNeXt"}


@dataclass
class Architecture:
    """The model class and size arguments that official-layout weights were made by: what a
    conf/model config must say for them to load. Read off the tensors, so every format (ours, the
    official release, timm, torchvision, Hugging Face, FCMAE) is judged alike once converted."""

    target: str  # the class in `_target_`: "ConvNeXt", "ConvNeXtV2" or "ConvNeXtIsotropic"
    size: tuple[tuple[str, Any], ...]  # its size arguments in order: depths, dims (isotropic: depth, dim)

    @classmethod
    def of(cls, state_dict: Mapping[str, Tensor]) -> Architecture | None:
        """None when the names are not those of our models (another network, or a partial file):
        then only the tensor-by-tensor comparison can say what differs."""
        try:
            if is_isotropic(state_dict):
                blocks = {name.split(".")[1] for name in state_dict if name.startswith("blocks.")}
                return cls("ConvNeXtIsotropic", (("depth", len(blocks)), ("dim", state_dict["stem.weight"].shape[0])))
            depths, dims = architecture(state_dict)
        except KeyError:
            return None
        return cls("ConvNeXtV2" if is_v2(state_dict) else "ConvNeXt", (("depths", depths), ("dims", dims)))

    def __str__(self) -> str:
        sizes = " and ".join(f"{key} {value}" for key, value in self.size)
        return f"{_FAMILIES[self.target]} with {sizes}"

    def variant(self) -> str | None:
        """The conf/model config of this class and size, if there is one."""
        return next(iter(self._configs(same_size=True)), None)

    def overrides(self) -> str:
        """The command-line words that build this architecture from a config of its class."""
        example = next(iter(self._configs(same_size=False)), "<variant>")
        sizes = " ".join(f"model.{key}={_override_value(value)}" for key, value in self.size)
        return f"model={example} {sizes}"

    def _configs(self, *, same_size: bool):
        for name in configs.options("model"):
            cfg = OmegaConf.to_container(configs.load("model", name))
            if str(cfg.get("_target_", "")).rsplit(".", 1)[-1] != self.target:
                continue
            if not same_size or all(cfg.get(key) == value for key, value in self.size):
                yield name


def _override_value(value: Any) -> str:
    # No spaces, so that the override is one shell word: model.depths=[3,3,9,3].
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)
