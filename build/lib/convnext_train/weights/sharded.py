"""Sharded checkpoints (`torch.distributed.checkpoint` directories), read safely.

A training run under FSDP writes one such directory per checkpoint (convnext_train/checkpointing):
every rank's shards in `*.distcp` files, DCP's `.metadata`, and our `meta.pt` with what is not a
tensor (step, config, RNG states...). Read whole, it is the same dict as a full checkpoint file,
so eval.py, fine-tuning and `consolidate` take either.

Why this is written here and not left to DCP's reader: DCP unpickles `.metadata` with plain
`pickle.load` and the non-tensor values with `torch.load(weights_only=False)`, so a directory from
an untrusted source could run code when read. `SafeReader` and `SafePlanner` allow only the classes
DCP's metadata is made of and load values with `weights_only=True`; the training loop's own resume
uses them too. `trusted=True` takes DCP's own.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

META_FILE = "meta.pt"
METADATA_FILE = ".metadata"

# What DCP's `.metadata` pickles (checked against what torch >= 2.6 writes): its own dataclasses,
# torch.Size and dtypes, the checkpoint's path. Anything else is refused, and so is any dotted
# name: the unpickler would follow `metadata.os.system` to a function from a permitted module.
_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_CLASSES = {
    *(
        (_METADATA, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
}


class UnsafeMetadata(pickle.UnpicklingError):
    """The metadata names a global outside DCP's own: what an untrusted file could use to run code."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_CLASSES
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafeMetadata(module, name)
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` unpickled through the allow-list above."""

    refused: UnsafeMetadata | None = None  # DCP turns the error into an assertion; kept here for the message

    def read_metadata(self, *args: Any, **kwargs: Any):
        with open(Path(self.path) / METADATA_FILE, "rb") as file:
            try:
                metadata = _MetadataUnpickler(file).load()
            except UnsafeMetadata as error:
                self.refused = error
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _SafeBytes:
    """Non-tensor values (optimizer param groups) loaded with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class SafePlanner(_SafeBytes, DefaultLoadPlanner):
    """For `dcp.load` into existing tensors (a resume)."""


class _SafeEmptyPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    pass


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file()


def read_sharded(path: Path, read_meta: Callable[[Path], dict], *, trusted: bool = False) -> dict[str, Any]:
    """Every tensor of the directory, whole, keyed as in a full checkpoint, plus its meta.pt
    (read by `read_meta`, the safe reader of torch files)."""
    tensors: dict[str, Any] = {}
    reader, planner = (
        (FileSystemReader(path), _EmptyStateDictLoadPlanner()) if trusted else (SafeReader(path), _SafeEmptyPlanner())
    )
    # What torch's own dcp_to_torch_save does, without writing a file: an empty state dict that the
    # planner fills from the metadata (the public `load` needs the tensors allocated beforehand).
    try:
        _load_state_dict(tensors, storage_reader=reader, planner=planner, no_dist=True)
    except CheckpointException as error:  # a BaseException, wrapping what went wrong on each rank
        if getattr(reader, "refused", None) is not None:
            raise reader.refused from None
        raise next(iter(error.failures.values()))[0] from error
    meta = read_meta(path / META_FILE) if (path / META_FILE).is_file() else {}
    return {**meta, **tensors}
