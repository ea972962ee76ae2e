"""The one error of this package: a checkpoint that cannot be used, said in a line the user can act on.

Its own module because every other one raises it (reading, layout conversion, loading, export).
"""

from __future__ import annotations

from convnext_train.errors import UserError

__all__ = ["CheckpointError"]


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message says what is wrong and how to fix it."""
