"""Expected failures caused by what the user gave us (a path, a config value, a checkpoint).

They are reported as one line that says what is wrong and how to fix it, with exit code 2 and no
traceback; anything else is a bug and keeps its traceback. A full disk is the user's to fix too,
wherever it happens (a checkpoint, a log line, a .beton file): one line, exit code 2.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Bad input: the message is shown to the user as is."""


def exit_on_user_error(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT_CODE)
        except Exception as error:
            full = out_of_space(error)
            if full is None:
                raise
            what = "disk quota exceeded" if full.errno == errno.EDQUOT else "no space left on the device"
            where = f" to write {full.filename}" if full.filename else ""
            print(f"error: {what}{where}; free some space or write somewhere else", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper  # type: ignore[return-value]


def out_of_space(error: BaseException | None) -> OSError | None:
    """The full-disk (or quota) OSError behind `error`: itself, or one it was raised from or while
    handling (torch.save reports a failed write as a RuntimeError from its zip writer, with the
    OSError only in the context). None for any other error."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def one_line(error: UserError) -> str:
    """The user's message alone. A DataLoader worker re-raises its error in the main process with the
    worker's traceback folded into the message; the original message is its last line."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
