"""Expected failures caused by what the user gave us (a path, a config value, a checkpoint).

They are reported as one line that says what is wrong and how to fix it, with exit code 2 and no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

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

    return wrapper  # type: ignore[return-value]


def one_line(error: UserError) -> str:
    """The user's message alone. A DataLoader worker re-raises its error in the main process with the
    worker's traceback folded into the message; the original message is its last line."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
