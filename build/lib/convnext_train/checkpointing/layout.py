"""A run's `checkpoints/` directory: which entries it holds, which to keep, which to resume from.

    step_000001234.pt     a full checkpoint: one file, written by rank 0 (checkpoint.format=full)
    step_000001234/       a sharded one: a torch.distributed.checkpoint directory, every rank's
                          shards plus meta.pt (step, epoch, config, RNG states...) (format=dcp)
    last.pt, best.pt, best_ema.pt    hard links to step files (no space, each appears atomically)
    last, best, best_ema             symbolic links to step directories (a directory has no hard links)

Both kinds appear whole or not at all: a file is written to a temporary name and renamed; a
directory is written under `.step_<N>.tmp/` and renamed once every rank's part and the metadata
are on disk. Temporaries left by a job killed mid-write are swept when the next job starts, except
a sharded one that is complete (an async save the job died before publishing): that one is
published. The newest `keep_last` entries are kept, and whatever `best`/`best_ema` point to.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnext_train.atomic import DiskFullError, fsync_path
from convnext_train.errors import UserError
from convnext_train.weights import CheckpointError, read_checkpoint, save_checkpoint
from convnext_train.weights.sharded import META_FILE, is_sharded_checkpoint

LINKS = ("last", "best", "best_ema")
FORMATS = ("auto", "full", "dcp")


def resolve_format(name: str, strategy: str, world_size: int) -> str:
    """`auto`: sharded (DCP) under FSDP on several processes, where a full file would gather the
    whole model and optimizer state into rank 0's memory; one full file otherwise."""
    if name != "auto":
        return name
    return "dcp" if strategy == "fsdp" and world_size > 1 else "full"


def step_name(step: int) -> str:
    return f"step_{step:09d}"


@dataclass(frozen=True)
class Entry:
    step: int
    path: Path

    @property
    def sharded(self) -> bool:
        return self.path.suffix != ".pt"

    @property
    def name(self) -> str:
        return self.path.name


class CheckpointDir:
    def __init__(self, directory: Path, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = keep_last

    # ----------------------------------------------------------------------------------------------
    # What is there
    # ----------------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Step checkpoints of either kind, newest first."""
        found = []
        for path in self.directory.glob("step_*"):
            stem = path.name.removesuffix(".pt")
            if stem[5:].isdigit() and (path.suffix == ".pt" or path.is_dir()):
                found.append(Entry(int(stem[5:]), path))
        return sorted(found, key=lambda e: (e.step, not e.sharded), reverse=True)

    def sweep_temporaries(self) -> tuple[int, list[Entry]]:
        """Remove what a job killed mid-write left behind (only under the run's lock: a live job's
        temporaries look the same), and publish the sharded checkpoints among them that are whole:
        DCP writes `.metadata` last, by a rename, once every rank's shards are on disk, and meta.pt
        was written before. (removed, published)."""
        removed, published = 0, []
        for path in sorted(self.directory.glob(".*.tmp")):
            stem = path.name[1:].removesuffix(".tmp")
            whole = stem[5:].isdigit() and is_sharded_checkpoint(path) and (path / META_FILE).is_file()
            if whole and not path.is_symlink():
                published.append(self.publish_sharded(path, int(stem[5:])))
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
            else:
                path.unlink(missing_ok=True)
                removed += 1
        return removed, published

    def latest(self) -> tuple[Entry, dict[str, Any]] | None:
        """The newest readable checkpoint and what it holds besides sharded tensors (a full file is
        memory-mapped: its tensors are read when used); None when there is none. The step entries
        come first: a job killed between writing one and linking `last` to it leaves `last` behind.
        Unreadable entries are skipped with a warning; when every one is unreadable, this raises
        instead of letting the run start again from step 0 over them."""
        candidates = self.entries()
        last = self.directory / "last.pt"
        if last.exists() and not any(os.path.samefile(last, entry.path) for entry in candidates):
            # Its step file is gone (removed by hand): still a checkpoint, in its place by its step.
            try:
                step = int(self.read(Entry(-1, last))["step"])
            except (CheckpointError, KeyError, TypeError, ValueError):
                step = -1
            candidates = sorted([*candidates, Entry(step, last)], key=lambda e: e.step, reverse=True)
        problems = []
        for entry in candidates:
            try:
                return entry, self.read(entry)
            except CheckpointError as error:
                warnings.warn(f"skipping unreadable checkpoint {entry.path}: {error}", stacklevel=2)
                problems.append(f"{entry.name} ({error})")
        if problems:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is unreadable: {'; '.join(problems)}. Restore one from a "
                "backup, or move the directory away to start this run afresh"
            )
        return None

    def read(self, entry: Entry) -> dict[str, Any]:
        """A full checkpoint's dict (memory-mapped), or a sharded one's meta.pt."""
        if not entry.sharded:
            return read_checkpoint(entry.path, mmap=True)
        if not is_sharded_checkpoint(entry.path):
            raise CheckpointError(f"{entry.path} has no .metadata file: it is not a whole sharded checkpoint")
        return read_checkpoint(entry.path / META_FILE)

    # ----------------------------------------------------------------------------------------------
    # Writing
    # ----------------------------------------------------------------------------------------------
    def write_full(self, checkpoint: dict[str, Any], step: int) -> Entry:
        path = self.directory / f"{step_name(step)}.pt"
        try:
            save_checkpoint(checkpoint, path)
        except DiskFullError as error:
            raise UserError(self.disk_full_message(error.path, error.free_bytes)) from error
        return Entry(step, path)

    def sharded_temporary(self, step: int) -> Path:
        return self.directory / f".{step_name(step)}.tmp"

    def publish_sharded(self, temporary: Path, step: int) -> Entry:
        """The complete directory under its final name, in one rename. The same step saved again (a
        job stopped at an epoch's last step saves it again at the epoch's end when resumed): the old
        one moves aside first, so that a kill at any moment leaves one whole directory there."""
        path = self.directory / step_name(step)
        old = self.directory / f".{step_name(step)}.old.tmp"
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(temporary, path)
        fsync_path(self.directory)
        shutil.rmtree(old, ignore_errors=True)
        return Entry(step, path)

    def link(self, name: str, entry: Entry) -> None:
        """`last`/`best`/`best_ema` -> `entry`, replaced atomically; the same name of the other kind
        (left by a run that switched formats) goes, so that there is one `last`."""
        if entry.sharded:
            link, other = self.directory / name, self.directory / f"{name}.pt"
            temporary = self.directory / f".{name}.tmp"
            temporary.unlink(missing_ok=True)
            os.symlink(entry.path.name, temporary)
        else:
            link, other = self.directory / f"{name}.pt", self.directory / name
            temporary = self.directory / f".{name}.pt.tmp"
            temporary.unlink(missing_ok=True)
            os.link(entry.path, temporary)
        os.replace(temporary, link)
        other.unlink(missing_ok=True)

    def prune(self) -> None:
        """Keep the newest `keep_last` entries and the directories a symbolic link points to."""
        pointed = {(self.directory / name).resolve() for name in LINKS if (self.directory / name).is_symlink()}
        for entry in self.entries()[self.keep_last :]:
            if entry.sharded:
                if entry.path.resolve() not in pointed:
                    shutil.rmtree(entry.path, ignore_errors=True)
            else:
                entry.path.unlink(missing_ok=True)  # best.pt keeps its own hard link
        for name in LINKS:  # a link whose directory was removed by hand
            link = self.directory / name
            if link.is_symlink() and not link.exists():
                link.unlink()

    def disk_full_message(self, what: Path, free_bytes: int) -> str:
        complete = self.entries()  # the failed one is gone (removed before this is called): these are whole
        if complete:
            kept = (
                f"The last checkpoint, {complete[0].name} ({_size_mb(complete[0].path):.0f} MB), is intact: "
                "the same command resumes from it"
            )
        else:
            kept = "No checkpoint of this run was written before"
        return (
            f"no space left on the device to write checkpoint {what} ({free_bytes / 2**20:.0f} MB free there). "
            f"{kept}. Free some space (or keep fewer step checkpoints: checkpoint.keep_last, now {self.keep_last}), "
            "then run it again."
        )


def _size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    return path.stat().st_size / 2**20
