"""Weight formats: reading any checkpoint file safely, saving one atomically, and converting between
the parameter layouts of the official release, timm, Hugging Face, torchvision and FCMAE.

This package knows files and layouts, never a training run: the run's own checkpoints (resume, the
lock, retention, sharded saves) are `convnext_train/checkpointing`'s, which reads and writes its
files through this package.

Our models use the official facebookresearch parameter names, so the official release loads as-is.
timm, Hugging Face `transformers` and torchvision name (and sometimes shape) the same tensors
differently; this package converts both ways so that any of them loads with `strict=True`, and
exports to each. Hugging Face model directories (`save_pretrained`'s, the hub cache's) load as they
are. ConvNeXt V2's FCMAE pre-training checkpoints load too, for fine-tuning. Reading is safe by
default: a torch file may only unpickle tensors and a few harmless types unless it is trusted.

Modules, each importing only those before it:
- `errors`: CheckpointError, the one-line error everything here raises;
- `sharded`: a sharded training checkpoint (a torch.distributed.checkpoint directory) read whole;
- `hf_directory`: a Hugging Face model directory (config.json, weights whole or sharded) read whole;
- `files`: reading a file or such a directory onto the CPU (safe unpickling) and saving one atomically;
- `layouts`: the timm, Hugging Face, torchvision and FCMAE layouts, to and from the official one, and
  detecting them;
- `loading`: finding the weights in a checkpoint and loading them into our models;
- `export`: writing a model in each layout: official, timm, Hugging Face directory, torchvision, safetensors.

Everything is imported from here (`from convnext_train.weights import load_weights`).
"""

from __future__ import annotations

from convnext_train.weights.errors import CheckpointError
from convnext_train.weights.export import (
    export_fcmae,
    export_hf,
    export_official,
    export_safetensors,
    export_timm,
    export_torchvision,
    timm_class_arguments,
    timm_model,
)
from convnext_train.weights.files import read_checkpoint, save_checkpoint
from convnext_train.weights.layouts import (
    FCMAE_DROPPED,
    FCMAE_MISSING,
    detect_format,
    fcmae_to_official,
    hf_to_official,
    official_to_hf,
    official_to_timm,
    official_to_torchvision,
    timm_to_official,
    to_official,
    torchvision_to_official,
)
from convnext_train.weights.loading import load_pretrained, load_weights, state_dict_from_checkpoint

__all__ = [
    "FCMAE_DROPPED",
    "FCMAE_MISSING",
    "CheckpointError",
    "detect_format",
    "export_hf",
    "export_official",
    "export_safetensors",
    "export_timm",
    "export_fcmae",
    "export_torchvision",
    "fcmae_to_official",
    "hf_to_official",
    "load_pretrained",
    "load_weights",
    "official_to_hf",
    "official_to_timm",
    "official_to_torchvision",
    "read_checkpoint",
    "save_checkpoint",
    "state_dict_from_checkpoint",
    "timm_class_arguments",
    "timm_model",
    "timm_to_official",
    "to_official",
    "torchvision_to_official",
]
