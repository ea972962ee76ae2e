"""A run's checkpoints: where they live, which to keep, which to resume from.

`<run_dir>/checkpoints/` holds `step_<N>.pt` (the newest `keep_last` of them), `last.pt` (the
newest), `best.pt` and `best_ema.pt`. `last`/`best` are hard links to a step file, so keeping them
costs no space and each appears atomically. A newest checkpoint that is truncated or corrupt (a
machine died mid-copy, a disk filled up) is skipped with a warning for the previous valid one.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnext_train.atomic import DiskFullError
from convnext_train.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from convnext_train.errors import UserError


class RunCheckpoints:
    def __init__(self, directory: Path, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)

    def step_files(self) -> list[Path]:
        """Step checkpoints, newest first."""
        return sorted(self.directory.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)

    def save(self, checkpoint: dict[str, Any]) -> Path:
        path = self.directory / f"step_{checkpoint['step']:09d}.pt"
        try:
            save_checkpoint(checkpoint, path)
        except DiskFullError as error:
            raise UserError(self._disk_full_message(error)) from error
        self._link("last.pt", path)
        for old in self.step_files()[self.keep_last :]:
            old.unlink(missing_ok=True)
        return path

    def _disk_full_message(self, error: DiskFullError) -> str:
        complete = self.step_files()  # the failed file is gone: these are all whole
        if complete:
            size = complete[0].stat().st_size / 2**20
            kept = (
                f"The last checkpoint, {complete[0].name} ({size:.0f} MB), is intact: the same command resumes from it"
            )
        else:
            kept = "No checkpoint of this run was written before"
        return (
            f"no space left on the device to write checkpoint {error.path} ({error.free_bytes / 2**20:.0f} MB free there). "
            f"{kept}. Free some space (or keep fewer step checkpoints: trainer.keep_last, now {self.keep_last}), then run it again."
        )

    def mark_best(self, name: str, path: Path) -> None:
        self._link(name, path)

    def _link(self, name: str, target: Path) -> None:
        tmp = self.directory / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.link(target, tmp)
        os.replace(tmp, self.directory / name)

    def latest(self) -> dict[str, Any] | None:
        """The newest readable checkpoint, or None for a fresh run. The step files come first: a job
        killed between writing one and linking `last.pt` to it leaves `last.pt` a checkpoint behind."""
        candidates = self.step_files()
        last = self.directory / "last.pt"
        if last.exists() and not any(os.path.samefile(last, path) for path in candidates):
            candidates.append(last)  # its step file is gone (removed by hand): still a checkpoint
        for path in candidates:
            try:
                return read_checkpoint(path)
            except CheckpointError as error:
                warnings.warn(f"skipping unreadable checkpoint {path}: {error}", stacklevel=2)
        return None


def rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from, as plain Python values (bytes, ints): they load with
    `torch.load(weights_only=True)` and travel through `all_gather_object` unchanged."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "pos": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gauss,
        },
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _as_tuples(value):
    # Pickle round trips keep tuples, but be strict: random.setstate rejects lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
