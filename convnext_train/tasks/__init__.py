"""What a training run computes, behind one seam: the task.

The trainer and the step (engine.py) know how to run micro-batches, accumulate, step the optimizer,
evaluate on a schedule and keep the best checkpoint; the task says what one micro-batch's loss is
and what an evaluation reports:

- `loss(forward, images, targets)`: the micro-batch's training loss (called inside autocast);
- `evaluate(model, loader, ...)`: the scores of one pass over the validation loader, summed over
  every process, with `images` (how many were scored) and, where the loader skips unreadable
  files, `skipped_images`; `loss` among them is logged as `val_loss`;
- `metric`, `higher_is_better`: the score `best.pt` follows; `summary_keys`: the scores summary.json
  keeps; `describe(row)`: the line printed after an evaluation;
- `sample_target`: None (the batches carry the data's labels), or what the loaders put in the labels'
  place for each sample, drawn from the sample's own seed (FCMAE's masks);
- `write_figures(run_dir)`: the pictures of the last evaluation, written into the run directory.

Classification (the papers' supervised training: Mixup/CutMix, soft-target cross-entropy, top-1/top-5)
is `classification.py`; FCMAE pre-training (ConvNeXt V2's masked autoencoder) `masked_modeling.py`.
`task:` in the config picks one from `TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from convnext_train.errors import UserError
from convnext_train.tasks.classification import Classification
from convnext_train.tasks.masked_modeling import MaskedImageModeling


class Task(Protocol):
    metric: str
    higher_is_better: bool
    summary_keys: tuple[str, ...]
    sample_target: Callable[[int], torch.Tensor] | None

    def loss(self, forward: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def evaluate(
        self,
        model: nn.Module,
        loader,
        *,
        device: torch.device,
        autocast: Callable,
        memory_format: torch.memory_format,
        lockstep_shape: tuple | None = None,
    ) -> dict[str, Any]: ...

    def describe(self, row: dict[str, Any]) -> str: ...

    def write_figures(self, run_dir: Path) -> list[Path]: ...


TASKS: dict[str, Callable[[DictConfig], Task]] = {
    "classification": Classification.from_config,
    "fcmae": MaskedImageModeling.from_config,
}


def build_task(cfg: DictConfig) -> Task:
    if cfg.task not in TASKS:
        raise UserError(f"task={cfg.task}: must be one of {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg)
