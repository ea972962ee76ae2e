"""What is wrong with one config, collected and reported as one line: each problem names its key and
value and what is accepted (`data.order=randm: must be one of random, quasi_random`). The trainer's,
eval.py's and every data source's checks add to the same collector, before any compute."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from convnext_train.errors import UserError


class Problems:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.found: list[str] = []

    def require(self, ok: bool, key: str, message: str) -> None:
        """`key` is dotted from the config's root (`trainer.epochs`)."""
        if not ok:
            self.found.append(f"{key}={self.value(key)}: {message}")

    def value(self, key: str) -> Any:
        node = self.cfg
        for part in key.split("."):
            node = node[part]
        return node

    def raise_if_any(self) -> None:
        if self.found:
            raise UserError("invalid config: " + "; ".join(self.found))


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
