"""Hugging Face model directories: what `save_pretrained` writes, or a snapshot of the hub's cache,
read as one checkpoint dict (`{"model": weights, "hf_config": config.json}`).

A directory holds `config.json` and its weights in one of four layouts, taken in this order (the
order `from_pretrained` prefers): `model.safetensors`, a sharded `model.safetensors.index.json`,
`pytorch_model.bin`, a sharded `pytorch_model.bin.index.json`; an index maps every tensor name to
the shard file that holds it. The hub's cache keeps each repository as
`models--<org>--<name>/{blobs,refs,snapshots}`: `snapshots/<commit>/` is such a directory (of links
into `blobs/`), and `refs/main` names the commit the repository directory itself stands for.

Why this is read here rather than by `transformers`: `from_pretrained` builds a `transformers` model
(our models are not one) and may go to the network; huggingface_hub's cache helpers take a repository
id and a cache root, not the path a user passes. What is left is a few documented file names, so the
files themselves are read by `files.read_checkpoint`, safely (`.bin` through its restricted unpickler),
and never with a hub name: nothing here touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub.constants import (
    CONFIG_NAME,
    PYTORCH_WEIGHTS_NAME,
    SAFETENSORS_INDEX_FILE,
    SAFETENSORS_SINGLE_FILE,
)

from convnext_train.weights.errors import CheckpointError

__all__ = ["is_hf_directory", "read_hf_directory", "resolve_hub_cache"]

PYTORCH_INDEX_FILE = f"{PYTORCH_WEIGHTS_NAME}.index.json"
# In the order of preference: safetensors before pickles, one file before shards of the same kind.
WEIGHT_FILES = (SAFETENSORS_SINGLE_FILE, SAFETENSORS_INDEX_FILE, PYTORCH_WEIGHTS_NAME, PYTORCH_INDEX_FILE)


def resolve_hub_cache(path: Path) -> Path:
    """A hub-cache repository directory (`models--<org>--<name>`) -> the snapshot its `refs/main` names;
    any other path is returned as it is."""
    ref = path / "refs" / "main"
    if not (path / "snapshots").is_dir() or not ref.is_file():
        return path
    snapshot = path / "snapshots" / ref.read_text().strip()
    if not snapshot.is_dir():
        raise CheckpointError(
            f"{ref} names the snapshot {snapshot.name}, which is not in {path / 'snapshots'}; download the model "
            "again, or pass one of the snapshot directories there."
        )
    return snapshot


def is_hf_directory(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() or any((path / name).is_file() for name in WEIGHT_FILES)


def read_hf_directory(path: Path, read_file: Callable[[Path], dict]) -> dict[str, Any]:
    """The weights of a `save_pretrained` directory, and its config.json (empty when there is none).

    `read_file` reads one weights file (the package's safe reader).
    """
    found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if found is None:
        raise CheckpointError(
            f"Hugging Face model directory {path} has no weights: expected one of {', '.join(WEIGHT_FILES)} beside "
            f"its {CONFIG_NAME}; finish the download, or pass the weights file itself."
        )
    weights = _read_index(found, read_file) if found.name.endswith(".index.json") else read_file(found)
    return {"model": weights, "hf_config": _read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}}


def _read_index(index: Path, read_file: Callable[[Path], dict]) -> dict:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map; download the model again.")
    weights: dict = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index} lists the shard {shard}, which is missing; download the model again.")
        weights.update(read_file(index.parent / shard))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise CheckpointError(
            f"{index} maps {len(missing)} tensors ({', '.join(missing[:3])}, ...) to shards that do not hold them; "
            "download the model again."
        )
    return weights


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read as JSON ({error}); download the model again.") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a JSON {type(loaded).__name__}, not an object; download the model again.")
    return loaded
