"""What eval.py and predict.py share: the model a checkpoint holds, built without being told which it
is, with its class names and the preprocessing size it was trained at; and how such a model is run
(`Inference`: device, precision, memory layout, batch size, decoding workers).

The architecture comes, first to last, from `model=` on the command line, our training checkpoint's
saved `config`, or the weights' own shapes: `weights.loading.Architecture` reads the model class and
size off the official layout (which every supported format converts to) and finds the conf/model
config that has them, the same reading that load_weights checks every model against. The class
count is the head's. An explicit `model=` that does not fit names the one that does, before it is
built, rather than the tensors that differ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from convnext_train import configs
from convnext_train.data.transforms import EvalPreprocessing
from convnext_train.errors import UserError
from convnext_train.models import build_model
from convnext_train.runtime import autocast
from convnext_train.weights import CheckpointError, load_weights, read_checkpoint, state_dict_from_checkpoint
from convnext_train.weights.layouts import to_official
from convnext_train.weights.loading import Architecture

DEFAULT_IMG_SIZE, DEFAULT_CROP_PCT = 224, 0.875  # the paper's, for checkpoints that do not say


@dataclass(frozen=True)
class Inference:
    """How eval.py and predict.py run a model: where, at which precision (autocast) and memory
    layout, in batches of what size, with how many processes decoding images."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True
    batch_size: int = 100
    num_workers: int = 0

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        return autocast(self.precision, self.device.type)

    def prepare(self, model: nn.Module) -> nn.Module:
        """`model` on the device, in the memory layout, in eval mode."""
        return model.to(device=self.device, memory_format=self.memory_format).eval()


@dataclass
class CheckpointModel:
    model: nn.Module  # on the CPU, weights loaded, in eval mode
    model_cfg: DictConfig  # what built it (num_classes set): for GMACs and the like
    variant: str  # the conf/model name, or the class name when no config has this size
    class_names: list[str]
    img_size: int | None  # what it was trained at, when the checkpoint says
    crop_pct: float | None

    def preprocessing(self, img_size: int | None = None, crop_pct: float | None = None) -> EvalPreprocessing:
        """The evaluation preprocessing at the size and crop given, else the checkpoint's, else the paper's."""
        return EvalPreprocessing(
            img_size or self.img_size or DEFAULT_IMG_SIZE, crop_pct or self.crop_pct or DEFAULT_CROP_PCT
        )


def load_checkpoint_model(
    path: str | os.PathLike,
    model_cfg: DictConfig | None,
    *,
    chosen_variant: str | None = None,
    num_classes: int | None = None,
    use_ema: bool = False,
    trusted: bool = False,
) -> CheckpointModel:
    """The model in checkpoint `path`; `model_cfg` is the `model=` chosen on the command line (None:
    take the checkpoint's) and `chosen_variant` its name; `num_classes` the class count given (None:
    the head's)."""
    checkpoint = read_checkpoint(path, trusted=trusted)
    weights = to_official(state_dict_from_checkpoint(checkpoint, use_ema=use_ema))
    if "head.weight" not in weights:
        raise CheckpointError(
            f"{path} has no classifier head (head.weight): it is a pre-training checkpoint; fine-tune it first "
            "(train.py finetune.checkpoint=...), or export an FCMAE one to the official layout with format=fcmae."
        )
    head_classes = weights["head.weight"].shape[0]
    if num_classes is not None and num_classes != head_classes:
        raise CheckpointError(
            f"{path} has a {head_classes}-class head but data.num_classes={num_classes}; "
            f"set data.num_classes={head_classes}, or leave it out to take the checkpoint's."
        )
    shape = Architecture.of(weights)
    fits = shape.variant() if shape is not None else None
    saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), Mapping) else {}

    if model_cfg is not None:
        _refuse_other_architecture(path, model_cfg, chosen_variant, fits, shape)
        cfg, variant = model_cfg.copy(), chosen_variant or _class_name(model_cfg)
    elif isinstance(saved.get("model"), Mapping):
        cfg = OmegaConf.create(dict(saved["model"]))
        variant = fits or _class_name(cfg)
    elif fits is not None:
        cfg, variant = configs.load("model", fits), fits
    elif shape is not None:
        raise UserError(
            f"cannot tell which model {path} holds ({shape}, which no model= config has): pass {shape.overrides()}"
        )
    else:
        raise UserError(
            f"cannot tell which model {path} holds (its weights are not named as a ConvNeXt's): pass model=<variant>"
        )
    cfg.num_classes = head_classes
    model = build_model(cfg)
    load_weights(model, checkpoint, use_ema=use_ema)
    hf = checkpoint.get("hf_config") or {}
    img_size = saved.get("data", {}).get("img_size") or hf.get("image_size")
    return CheckpointModel(
        model=model.eval(),
        model_cfg=cfg,
        variant=variant,
        class_names=class_names(checkpoint, head_classes),
        img_size=img_size,
        crop_pct=saved.get("aug", {}).get("crop_pct"),
    )


def load_command_model(cfg: DictConfig) -> CheckpointModel:
    """The model of predict's or export's command line: `checkpoint=`, `model=` only when it was given
    there (their configs default to none), `use_ema=`, `trust_checkpoint=`."""
    chosen = HydraConfig.get().runtime.choices.get("model")
    return load_checkpoint_model(
        cfg.checkpoint,
        cfg.model if chosen else None,
        chosen_variant=chosen,
        use_ema=cfg.use_ema,
        trusted=cfg.trust_checkpoint,
    )


def class_names(checkpoint: Mapping[str, Any], count: int) -> list[str]:
    """The names a training run stored (`class_names`), or config.json's id2label, or "class <i>"."""
    names = checkpoint.get("class_names")
    if not names and (checkpoint.get("hf_config") or {}).get("id2label"):
        id2label = checkpoint["hf_config"]["id2label"]
        names = [id2label.get(str(i), id2label.get(i)) for i in range(count)]
    if names and len(names) == count and all(isinstance(name, str) for name in names):
        return list(names)
    return [f"class {i}" for i in range(count)]


def _refuse_other_architecture(path, model_cfg, chosen_variant, fits, shape) -> None:
    """One line naming the variant that fits, before the chosen one is built for real; the rest
    (a size no config names, another class count) is load_weights' to say, as for every caller."""
    with_meta = OmegaConf.merge(model_cfg, {"num_classes": 1})
    with torch.device("meta"):
        ours = Architecture.of(build_model(with_meta).state_dict())
    if fits is None or ours == shape:
        return
    chosen = chosen_variant or _class_name(model_cfg)
    raise CheckpointError(
        f"this checkpoint ({path}) is a {fits}, a different architecture than model={chosen} (its tensor shapes "
        f"differ): add model={fits}, or leave model= out to take the checkpoint's."
    )


def _class_name(model_cfg: Mapping[str, Any]) -> str:
    return str(model_cfg.get("_target_", "model")).rsplit(".", 1)[-1]
