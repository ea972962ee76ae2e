"""Resuming checks the recipe: the checkpoint's config against the one the job was started with.

A run resumed with another `optimizer.lr`, `trainer.epochs` or `trainer.global_batch_size` would be
two recipes in one run (the lr schedule and the steps per epoch change mid-run) with nothing to say
so. Every key counts except those that only say where the data lives, how chatty the run is or how
the same recipe is computed: the list Hydra keeps out of the run directory's name
(`hydra.job.config.override_dirname.exclude_keys` in conf/train.yaml), so that one list decides both
"is this the same run" questions. A listed key also covers the keys below it (`logger` covers
`logger.project`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from convnext_train.errors import UserError


class RecipeChanged(UserError):
    pass


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


ABSENT = _Absent()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _covered(key: str, names: Iterable[str]) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in names)


def recipe_changes(saved: Mapping[str, Any], current: Mapping[str, Any], ignored: Iterable[str]) -> dict[str, tuple]:
    """{key: (checkpoint's value, current value)} for every recipe key that differs."""
    before, now = flatten(saved), flatten(current)
    changes = {}
    for key in sorted(before.keys() | now.keys()):
        old, new = before.get(key, ABSENT), now.get(key, ABSENT)
        # 20 and 20.0 are one value; True and 1 are not.
        if not _covered(key, ignored) and (old != new or isinstance(old, bool) != isinstance(new, bool)):
            changes[key] = (old, new)
    return changes


def check_recipe(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    ignored: Iterable[str],
    allowed: Iterable[str],
    where: str,
) -> dict[str, tuple]:
    """The allowed changes; RecipeChanged (before any compute) for the others, one line per key."""
    allowed = list(allowed)
    known = flatten(saved).keys() | flatten(current).keys()
    unknown = [name for name in allowed if not any(_covered(key, [name]) for key in known)]
    if unknown:
        raise UserError(
            f"checkpoint.allow_changes names {', '.join(unknown)}, which is not a key of this config "
            "(give full dotted keys, e.g. checkpoint.allow_changes=[optimizer.lr,trainer.epochs])"
        )
    changes = recipe_changes(saved, current, ignored)
    refused = {key: values for key, values in changes.items() if not _covered(key, allowed)}
    if refused:
        lines = [f"  {key}: checkpoint {_show(old)}, now {_show(new)}" for key, (old, new) in refused.items()]
        raise RecipeChanged(
            f"{where} was trained with another recipe; resuming would mix two recipes in one run:\n"
            + "\n".join(lines)
            + "\nTo resume it, put the old values back; to resume with the new ones on purpose, add "
            f"checkpoint.allow_changes=[{','.join(refused)}]; to start afresh, use another hydra.run.dir"
        )
    return changes


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_class_names(saved: list[str] | None, now: list[str] | None, checkpoint: object) -> None:
    """data.root is not part of the recipe check, so another tree with as many classes would resume
    silently with each output index meaning another class: the class names are compared instead
    (when both the checkpoint and the data have them)."""
    if saved is None or now is None or saved == now:
        return
    if len(saved) != len(now):
        where = f"{len(saved)} classes, the data has {len(now)}"
    else:
        index = next(i for i, (a, b) in enumerate(zip(saved, now, strict=True)) if a != b)
        where = f"{saved[index]!r} as class {index}, the data has {now[index]!r} there"
    raise UserError(
        f"the checkpoint {checkpoint} was trained with {where}; resume on the same class folders, or start a "
        "new run from its weights (finetune.checkpoint=..., another hydra.run.dir)"
    )
