"""Checkpoint files: safe reading, atomic saving, and conversion between parameter layouts.

Our models use the official facebookresearch parameter names, so the official release loads as-is.
timm and Hugging Face `transformers` name (and sometimes shape) the same tensors differently; this
package converts both ways so that any of the three loads with `strict=True`, and exports to both.
ConvNeXt V2's FCMAE pre-training checkpoints load too, for fine-tuning. Reading is safe by default:
a torch file may only unpickle tensors and a few harmless types unless it is trusted.

Modules, each importing only those before it:
- `errors`: CheckpointError, the one-line error everything here raises;
- `sharded`: a sharded training checkpoint (a torch.distributed.checkpoint directory) read whole;
- `files`: reading a file or such a directory onto the CPU (safe unpickling) and saving one atomically;
- `layouts`: the timm, Hugging Face and FCMAE layouts, to and from the official one, and detecting them;
- `weights`: finding the weights in a checkpoint and loading them into our models;
- `export`: writing a model as a Hugging Face `from_pretrained` directory.

Everything is imported from here (`from convnext_train.checkpoints import load_weights`).
"""

from __future__ import annotations

from convnext_train.checkpoints.errors import CheckpointError
from convnext_train.checkpoints.export import export_hf
from convnext_train.checkpoints.files import read_checkpoint, save_checkpoint
from convnext_train.checkpoints.layouts import (
    FCMAE_DROPPED,
    FCMAE_MISSING,
    detect_format,
    fcmae_to_official,
    hf_to_official,
    official_to_hf,
    official_to_timm,
    timm_to_official,
    to_official,
)
from convnext_train.checkpoints.weights import load_pretrained, load_weights, state_dict_from_checkpoint

__all__ = [
    "FCMAE_DROPPED",
    "FCMAE_MISSING",
    "CheckpointError",
    "detect_format",
    "export_hf",
    "fcmae_to_official",
    "hf_to_official",
    "load_pretrained",
    "load_weights",
    "official_to_hf",
    "official_to_timm",
    "read_checkpoint",
    "save_checkpoint",
    "state_dict_from_checkpoint",
    "timm_to_official",
    "to_official",
]
