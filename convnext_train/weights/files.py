"""Checkpoint files: reading one onto the CPU (safe by default) and saving one atomically.

What a file holds is not looked at here beyond what reading it needs: the weights inside are found by
`loading.py` and renamed by `layouts.py`. A new way to read belongs in `read_checkpoint`, which also
takes two kinds of directory: our sharded training checkpoints (`sharded.py`, marked by DCP's
`.metadata`) and Hugging Face model directories (`hf_directory.py`), and refuses other directories.
"""

from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from convnext_train.atomic import write_atomically
from convnext_train.weights.errors import CheckpointError
from convnext_train.weights.hf_directory import is_hf_directory, read_hf_directory, resolve_hub_cache
from convnext_train.weights.sharded import UnsafeMetadata, is_sharded_checkpoint, read_sharded

try:  # numpy >= 2 moved `numpy.core` to `numpy._core`
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:
    from numpy.core.multiarray import scalar as _numpy_scalar

__all__ = ["read_checkpoint", "save_checkpoint"]


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
# Harmless data classes that real training checkpoints pickle next to the weights: timm's train.py
# and the official ConvNeXt main.py store their argparse `args`; other scripts store metrics as
# numpy scalars (rebuilt from a dtype and raw bytes, so they cannot run code).
_NUMPY_SCALAR_DTYPES = {type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
_SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    _numpy_scalar,
    (_numpy_scalar, "numpy.core.multiarray.scalar"),  # the name numpy 1.x wrote into pickles
    np.dtype,
    *_NUMPY_SCALAR_DTYPES,
]

# torch files from before PyTorch 1.6 are a stream of pickles that starts with this magic number.
_LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False, mmap: bool = False) -> dict:
    """Read a `.safetensors` or torch checkpoint, a sharded checkpoint directory, or a Hugging Face model
    directory (`save_pretrained`'s, or the hub cache's; its files each read as here), onto the CPU.

    Torch files are unpickled with `weights_only=True` plus the allow-list above, because a pickle
    can run arbitrary code. `trusted=True` (`eval.trust_checkpoint=true`, `finetune.trust_checkpoint=true`) lifts that restriction
    for files whose source you trust. `mmap=True` maps a torch file's tensors instead of reading
    them: a resume reads only what it loads, and the processes of a node share the page cache.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Checkpoint file {path} does not exist; check the path and that the download finished.")
    if path.is_dir() and not is_sharded_checkpoint(path):
        # A DCP directory is ours (its `.metadata` says so); anything else may be a Hugging Face one.
        path = resolve_hub_cache(path)
        if not is_hf_directory(path):
            raise CheckpointError(
                f"Checkpoint path {path} is a directory but neither a Hugging Face model directory (config.json "
                "and model.safetensors or pytorch_model.bin) nor a sharded checkpoint (.metadata); pass the "
                "weights file inside it instead."
            )
        return read_hf_directory(path, lambda file: read_checkpoint(file, trusted=trusted, mmap=mmap))
    try:
        if path.is_dir():
            return read_sharded(path, lambda meta: _read_torch_file(meta, trusted, mmap=False), trusted=trusted)
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        return _read_torch_file(path, trusted, mmap)
    except CheckpointError:
        raise
    except UnsafeMetadata as error:
        raise CheckpointError(_unsafe_message(f"Checkpoint directory {path}", f" ({error.global_name})")) from None
    except PermissionError as error:
        raise CheckpointError(
            f"Checkpoint file {path} cannot be read ({error.strerror}); fix its permissions."
        ) from None
    except Exception as error:  # noqa: BLE001
        # Damaged data surfaces as many types (SafetensorError, RuntimeError, OSError, EOFError,
        # UnpicklingError, struct.error, IndexError, ...); the cause stays chained for debugging.
        raise CheckpointError(
            f"Checkpoint file {path} is truncated or corrupt; download it again or use an older checkpoint."
        ) from error


def _read_torch_file(path: Path, trusted: bool, mmap: bool) -> dict:
    if trusted:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except (ModuleNotFoundError, AttributeError) as error:
            raise CheckpointError(
                f"Checkpoint file {path} pickles Python objects from code that is not installed here "
                f"({error}); re-save it as a plain state dict where that code exists."
            ) from error
    else:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError:
                if not _is_intact_torch_file(path):
                    raise  # reported as truncated or corrupt by the caller
                raise CheckpointError(_unsafe_message(f"Checkpoint file {path}", _unsafe_globals_note(path))) from None
    # `torch.save(model)` pickles the whole module; only its weights are needed.
    if isinstance(loaded, nn.Module):
        return loaded.state_dict()
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"Checkpoint file {path} holds a {type(loaded).__name__}, not a dict of weights; save the model's "
            "state_dict() (or a dict containing it) instead."
        )
    return dict(loaded)


def _unsafe_message(what: str, globals_note: str) -> str:
    return (
        f"{what} contains pickled Python objects{globals_note} that could run arbitrary code when loaded; if "
        "you trust its source, set eval.trust_checkpoint=true for eval.py, finetune.trust_checkpoint=true for "
        "train.py (trusted=True in Python)."
    )


def _is_intact_torch_file(path: Path) -> bool:
    """After `weights_only` refused a file: True when the file is undamaged, so the refusal is about what
    it contains rather than about corruption."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None  # every member's CRC matches
        except Exception:  # noqa: BLE001 - any failure to read the archive means it is damaged
            return False
    # The legacy format: the magic number, then pickles of the protocol version, system info and data.
    # pickletools only parses opcodes, it runs nothing, so this checks their structure safely.
    with path.open("rb") as file:
        if file.read(len(_LEGACY_TORCH_MAGIC)) != _LEGACY_TORCH_MAGIC:
            return False
        try:
            for _ in range(3):
                for _ in pickletools.genops(file):
                    pass
        except Exception:  # noqa: BLE001 - a pickle that does not parse is damaged
            return False
    return True


def _unsafe_globals_note(path: Path) -> str:
    """' (e.g. posix.system)': what the pickle would import, so the user can judge it; '' when unknown."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only zip-format files can be inspected; the note is optional
        return ""
    return f" ({', '.join(names[:5])})" if names else ""


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` to `path` atomically: a crash or error mid-write never leaves a partial file there.

    `.safetensors` takes a flat name -> tensor dict; any other suffix is written with `torch.save`.
    """
    path = Path(path)
    # Validated before touching the disk.
    tensors = _flat_tensor_dict(obj, path) if path.suffix == ".safetensors" else None
    if tensors is not None:
        # transformers 4.x `from_pretrained` refuses safetensors files without this metadata.
        write_atomically(path, lambda file: file.write(safetensors.torch.save(tensors, metadata={"format": "pt"})))
    else:
        write_atomically(path, lambda file: torch.save(obj, file))


def _flat_tensor_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(value, Tensor) for value in obj.values()):
        raise CheckpointError(
            f"Cannot save {path}: a .safetensors file holds only a flat name -> tensor dict; save training "
            "checkpoints (optimizer, epoch, ...) with a .pth suffix instead."
        )
    return {name: tensor.detach().cpu().contiguous() for name, tensor in obj.items()}
