"""Exports: a Hugging Face `transformers` directory that `from_pretrained` loads, and a torchvision
state dict that `torchvision.models.convnext_<size>(weights=None)` loads strictly.

The names come from `layouts.official_to_hf` / `official_to_torchvision`; what is added here for
Hugging Face is the model's config, read off the weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

from convnext_train.weights.errors import CheckpointError
from convnext_train.weights.files import save_checkpoint
from convnext_train.weights.layouts import (
    _reject_isotropic,
    architecture,
    is_v2,
    official_to_hf,
    official_to_torchvision,
)

__all__ = ["export_hf", "export_torchvision"]


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

    depths, dims = architecture(state_dict)
    settings = dict(
        num_channels=state_dict["downsample_layers.0.0.weight"].shape[1],
        hidden_sizes=dims,
        depths=depths,
        num_labels=state_dict["head.weight"].shape[0],
        # Our final LayerNorm uses the official eps; transformers defaults to 1e-12.
        layer_norm_eps=1e-6,
    )
    if is_v2(state_dict):
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


def export_torchvision(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model`'s weights as a torchvision ConvNeXt state dict (`.pth`, or `.safetensors`):
    `torchvision.models.convnext_tiny(weights=None, num_classes=...)` (small, base, large) loads it with
    `strict=True`. Only our V1 T, S, B and L have a torchvision equivalent; others are refused."""
    save_checkpoint(official_to_torchvision(model.state_dict()), path)
