"""Image classification as the papers train and score it: Mixup/CutMix on the micro-batch and the
soft-target (or label-smoothed) cross-entropy of timm's recipe; top-1/top-5 accuracy and the mean
cross-entropy over the validation images, summed over every process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from convnext_train.data.transforms import mixup_fn, train_loss
from convnext_train.errors import UserError
from convnext_train.tasks.evaluation import evaluation_batches, summed_over_processes


class Classification:
    metric = "top1"
    higher_is_better = True
    summary_keys = ("top1", "top5")
    sample_target = None  # the batches carry the data's labels

    def __init__(self, criterion: nn.Module, mixup: Callable | None):
        self.criterion, self.mixup = criterion, mixup

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Classification:
        return cls(train_loss(cfg.aug), mixup_fn(cfg.aug, cfg.data.num_classes))

    def loss(self, forward: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mixup is not None:  # element-wise and in place: autocast leaves it in fp32
            images, targets = self.mixup(images, targets)
        return self.criterion(forward(images), targets)

    def evaluate(self, model: nn.Module, loader, **how) -> dict[str, Any]:
        return evaluate(model, loader, **how)

    def write_figures(self, run_dir: Path) -> list[Path]:
        return []

    def describe(self, row: dict[str, Any]) -> str:
        text = f"top-1 {row['top1']:.2f}%  top-5 {row['top5']:.2f}%"
        if "top1_ema" in row:
            text += f"  EMA top-1 {row['top1_ema']:.2f}%"
        return text


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    autocast: Callable,
    memory_format: torch.memory_format,
    lockstep_shape: tuple | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy over the loader's images, with the
    image count and how many unreadable ones were replaced; every process's shard counts."""
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = skipped = 0
    batches = evaluation_batches(
        model, loader, device=device, autocast=autocast, memory_format=memory_format, lockstep_shape=lockstep_shape
    )
    for images, targets, replaced in batches:
        skipped += int(replaced.sum())
        with autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        count += targets.numel()
    # Each process scored its own shard; the sums over all of them are the whole set's.
    totals = summed_over_processes(correct1, correct5, loss_sum, count, skipped, device=device)
    correct1_all, correct5_all, loss_all, count_all, skipped_all = totals
    if count_all == 0:
        raise UserError("the validation set is empty: put images under <data.root>/<data.val_split>/<class>/")
    return {
        "top1": 100.0 * correct1_all / count_all,
        "top5": 100.0 * correct5_all / count_all,
        "loss": loss_all / count_all,
        "images": int(count_all),
        "skipped_images": int(skipped_all),
    }
