"""One optimizer step of the recipe: a pure function of the parts it is given (`parts.TrainParts`).
What a micro-batch's loss is, and what an evaluation scores, is the task's (convnext_train/tasks);
the epoch loop that calls them is the trainer's.

No host synchronisation inside a step: losses stay on the device in a `LossWindow` and are read
when the trainer logs (and before a checkpoint is written, so a non-finite loss never reaches a
checkpoint). Reading it is where the ranks agree on a non-finite loss, so that all of them stop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from convnext_train.distributed import Processes, describe_rank, gather_objects
from convnext_train.errors import UserError
from convnext_train.optim import set_lr
from convnext_train.parts import TrainParts


def optimizer_step(parts: TrainParts, batches: Iterator, window: LossWindow, step: int) -> float:
    """Optimizer step `step` of the recipe: `parts.accumulation` micro-batches of forward and
    backward, then the AdamW update at lr(step) and the EMA update. Returns the lr it used."""
    lr = parts.lr_at(step)
    set_lr(parts.optimizer, lr)
    for micro in range(parts.accumulation):
        images, targets, replaced = next(batches)
        window.skipped_images += int(replaced.sum())  # a CPU tensor: no device sync
        images = images.to(parts.device, non_blocking=True, memory_format=parts.memory_format)
        targets = targets.to(parts.device, non_blocking=True)
        # Gradients are all-reduced across processes once per step, on the last micro-batch.
        with parts.no_sync() if micro < parts.accumulation - 1 else contextlib.nullcontext():
            with parts.autocast():
                loss = parts.task.loss(parts.forward, images, targets)
            parts.scaler.scale(loss / parts.accumulation).backward()
        window.add(loss.detach(), step)
    if parts.clip_grad:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), parts.clip_grad)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.sync_buffers()  # before the EMA averages them: BatchNorm's statistics, the same on every rank
    if parts.ema is not None:
        parts.ema.update(parts.model)
    return lr


class LossWindow:
    """Training losses since the last log, summed on the device; remembers the first step whose
    loss was not finite without a host sync per step.

    Reading it (`read_and_reset`, `raise_if_non_finite`) is a collective under several processes:
    every rank reads at the same step (the trainer's log steps, and before each save)."""

    def __init__(self, device: torch.device, step: int, processes: Processes | None = None):
        self.processes = processes or Processes()  # None: one process
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.skipped_images = 0  # unreadable files replaced under data.skip_corrupt
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.since = time.perf_counter()
        self.since_step = step

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.total += loss.float()
        self.count += 1
        new_bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(new_bad, torch.full_like(self.first_bad_step, step + 1), self.first_bad_step)

    def raise_if_non_finite(self) -> None:
        """Every rank raises the same NonFiniteLoss, naming the first bad step and the rank that saw
        it, when any rank's loss was non-finite. Under DDP a rank whose loss was still finite at that
        step gets the NaN gradients through the all-reduce and goes non-finite a step later: raising
        on the bad rank alone would leave it waiting in the next step's collectives until
        trainer.dist_timeout_minutes.

        The ranks agree on the CPU-side control group, where the stop and save decisions are made
        (distributed.py): the host reads the window here anyway, and a rank that hangs instead of
        arriving is named within the loop's timeout, which a device collective on the NCCL group
        cannot do (the host would block in a CUDA sync until NCCL's watchdog ends the job unnamed)."""
        steps = gather_objects(int(self.first_bad_step), self.processes)  # the read's host sync
        bad = {rank: step for rank, step in enumerate(steps) if step >= 0}
        if not bad:
            return
        first = min(bad.values())
        ranks = [rank for rank, step in bad.items() if step == first]
        where = f"at step {first}"
        if self.processes.distributed:
            others = len(ranks) - 1
            also = f" and {others} other rank{'s' * (others > 1)}" if others else ""
            where = f"on {describe_rank(ranks[0])}{also} {where}"
        raise NonFiniteLoss(
            f"the training loss became non-finite {where}; the run stopped and the last checkpoint before it "
            "is kept. Lower optimizer.lr, set trainer.clip_grad, or use trainer.precision=bf16 instead of fp16"
        )

    def read_and_reset(self, step: int) -> dict:
        """Mean loss and throughput of the window (one host sync), after `raise_if_non_finite`."""
        self.raise_if_non_finite()
        elapsed = time.perf_counter() - self.since
        result = {
            "loss": self.total.item() / max(self.count, 1),
            "steps": step - self.since_step,
            "seconds": elapsed,
            "skipped_images": self.skipped_images,
        }
        self.total.zero_()
        self.count = 0
        self.skipped_images = 0
        self.since, self.since_step = time.perf_counter(), step
        return result


class NonFiniteLoss(UserError):
    pass
