"""Exports, one function per layout: the official release's file, timm's state dict, a Hugging Face
`transformers` directory that `from_pretrained` loads, a torchvision state dict that
`torchvision.models.convnext_<size>(weights=None)` loads strictly, the official names in a
safetensors file, and an FCMAE pre-training in the official release's sparse layout.

The names come from `layouts`; what is added here is what each library needs beside the names: the
config for Hugging Face, the tensor shapes of timm's named model (its small sizes use 1x1
convolutions where the others use Linear layers). `python -m convnext_train.export` writes these
files and reads each back with its library (convnext_train/export.py).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from convnext_train.atomic import write_atomically
from convnext_train.weights.errors import CheckpointError
from convnext_train.weights.files import save_checkpoint
from convnext_train.weights.layouts import (
    architecture,
    fcmae_from_release,
    fcmae_to_release,
    has_layer_scale,
    is_v2,
    official_to_hf,
    official_to_timm,
    official_to_torchvision,
    reject_other_networks,
)

__all__ = [
    "export_fcmae",
    "export_hf",
    "export_official",
    "export_safetensors",
    "export_timm",
    "export_torchvision",
    "timm_class_arguments",
    "timm_model",
]


def export_official(model: nn.Module, path: str | os.PathLike) -> None:
    """The facebookresearch release's layout: `{"model": state_dict}` in a torch file, which the
    official main.py's `--finetune` and `--resume` read (and every loader here)."""
    save_checkpoint({"model": model.state_dict()}, path)


def export_safetensors(model: nn.Module, path: str | os.PathLike) -> None:
    """The official names in a safetensors file: tensors only, nothing to unpickle."""
    save_checkpoint(model.state_dict(), Path(path))


def timm_model(state_dict, timm_name: str | None, device: str = "meta") -> tuple[nn.Module, str | None]:
    """The timm model these official-layout weights are, and its timm name: `timm.create_model(timm_name)`
    when timm has a name for the variant and its tensors are these (its shapes are the ones users load
    into), else timm's ConvNeXt class built to the same depths, dims and layer scale (and no name).
    On the meta device unless `device` says otherwise."""
    reject_other_networks(state_dict, "timm")
    num_classes = state_dict["head.weight"].shape[0]
    in_chans = state_dict["downsample_layers.0.0.weight"].shape[1]
    with torch.device(device):
        if timm_name is not None:
            named = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
            converted = official_to_timm(state_dict, named)
            if {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in named.state_dict().items()}:
                return named, timm_name
        model = timm.models.convnext.ConvNeXt(
            num_classes=num_classes, in_chans=in_chans, **timm_class_arguments(state_dict)
        )
        return model, None


def timm_class_arguments(state_dict) -> dict:
    """The size and block arguments of timm's ConvNeXt class for these official-layout weights."""
    depths, dims = architecture(state_dict)
    return {
        "depths": depths,
        "dims": dims,
        "use_grn": is_v2(state_dict),
        "ls_init_value": 1e-6 if has_layer_scale(state_dict) else None,
    }


def export_timm(model: nn.Module, path: str | os.PathLike, timm_name: str | None) -> None:
    """timm's names and shapes (`timm_model`'s), `.pth` or `.safetensors`: `timm.create_model(timm_name,
    num_classes=..., pretrained=True, pretrained_cfg_overlay=dict(file=path))` loads it."""
    state_dict = model.state_dict()
    save_checkpoint(official_to_timm(state_dict, timm_model(state_dict, timm_name)[0]), path)


def export_hf(model: nn.Module, out_dir: str | os.PathLike, class_names: list[str] | None = None) -> None:
    """Write `model` as a directory that `ConvNextForImageClassification.from_pretrained` (or the V2
    class, for ConvNeXt V2) loads: `config.json` and `model.safetensors`.

    The architecture is read off the weights, so any of our hierarchical models can be exported;
    `class_names` become config.json's id2label (and so the pipeline's labels).
    """
    state_dict = model.state_dict()
    reject_other_networks(state_dict, "Hugging Face")
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
    if class_names is not None:
        settings["id2label"] = dict(enumerate(class_names))
        settings["label2id"] = {name: i for i, name in enumerate(class_names)}
    if is_v2(state_dict):
        config = ConvNextV2Config(architectures=["ConvNextV2ForImageClassification"], **settings)
    else:
        # The value only decides whether layer scale exists; the exported weights replace it.
        config = ConvNextConfig(
            architectures=["ConvNextForImageClassification"],
            layer_scale_init_value=1e-6 if has_layer_scale(state_dict) else 0.0,
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


def export_fcmae(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """`models.FCMAE`'s weights as the official `convnextv2_*_fcmae.pt` (`{"model": ...}`, MinkowskiEngine
    shapes, decoder included), which the official main_finetune.py reads. The bytes are read back
    before they are written (atomically), and must give every tensor bit for bit."""
    release = io.BytesIO()
    torch.save({"model": fcmae_to_release(state_dict)}, release)
    back = fcmae_from_release(torch.load(io.BytesIO(release.getvalue()), weights_only=True)["model"])
    if back.keys() != state_dict.keys() or not all(torch.equal(back[k], state_dict[k]) for k in state_dict):
        raise CheckpointError("the FCMAE release layout did not read back bit for bit; nothing was written")
    write_atomically(Path(path), lambda file: file.write(release.getvalue()))
