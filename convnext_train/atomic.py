"""Files that appear whole or not at all: checkpoints, summaries, rewritten logs.

The bytes go to a temporary file in the target's directory (so `os.replace` is a same-filesystem
rename), are flushed to disk, and only then replace the target; on any error the temporary file is
removed and the old target is untouched. Readers and a restarted job see the old file or the new
one, never half of one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with open(), not tempfile.mkstemp, so the file gets the umask's permissions rather
    # than mkstemp's private 0600, which the target would inherit.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable: without this, a power cut can lose the new directory entry."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
