"""Files that appear whole or not at all: checkpoints, summaries, rewritten logs.

The bytes go to a temporary file in the target's directory (so `os.replace` is a same-filesystem
rename), are flushed to disk, and only then replace the target; on any error the temporary file is
removed and the old target is untouched. Readers and a restarted job see the old file or the new
one, never half of one.

A full disk (or quota) becomes `DiskFullError`, a `UserError` that names the file and the space free.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from convnext_train.errors import UserError, out_of_space


class DiskFullError(UserError):
    """No space (or no quota) left for a file; the file there before, if any, is untouched."""

    def __init__(self, path: Path):
        self.path = path
        self.free_bytes = shutil.disk_usage(path.parent).free
        super().__init__(
            f"no space left on the device to write {path} ({self.free_bytes / 2**20:.0f} MB free there); "
            "free some space or write somewhere else. Nothing was overwritten."
        )


def write_atomically(
    path: Path, write: Callable[[BinaryIO], object], before_rename: Callable[[], object] = lambda: None
) -> None:
    """`write` fills the file; `before_rename` runs once it is complete and synced, before it takes
    `path`'s name (a companion file that must not appear without it, or after it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with open(), not tempfile.mkstemp, so the file gets the umask's permissions rather
    # than mkstemp's private 0600, which the target would inherit.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        before_rename()
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if out_of_space(error) is not None:
            raise DiskFullError(path) from error
        raise
    fsync_path(path.parent)  # the rename itself


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk: without it a power cut can lose a
    rename, or leave a complete name on incomplete contents."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def process_alive(pid: int) -> bool:
    """Whether a process of this machine still runs: a temporary file named after a live writer's pid
    is that writer's, not an abandoned one (the data writers sweep the others)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
