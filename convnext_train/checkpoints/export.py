"""Export to Hugging Face `transformers`: a directory that `from_pretrained` loads.

The names come from `layouts.official_to_hf`; what is added here is the model's config, read off the
weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

from convnext_train.checkpoints.errors import CheckpointError
from convnext_train.checkpoints.files import save_checkpoint
from convnext_train.checkpoints.layouts import _is_v2, _reject_isotropic, official_to_hf

__all__ = ["export_hf"]


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
