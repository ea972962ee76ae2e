"""One training epoch and one evaluation pass: the loop, readable top to bottom.

No host synchronisation inside a step: losses stay on the device and are read every
`trainer.log_every` steps (and before a checkpoint is written, so a non-finite loss never
reaches a checkpoint).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from convnext_train.distributed import all_reduce_sum
from convnext_train.errors import UserError
from convnext_train.optim import set_lr

if TYPE_CHECKING:
    from convnext_train.trainer import Run


def train_one_epoch(run: Run, epoch: int) -> None:
    """Optimizer steps of `epoch` from where `run.state` stands (mid-epoch after a resume)."""
    t, state = run.cfg.trainer, run.state
    first_step = state.step - epoch * run.steps_per_epoch
    run.train_start_at(epoch, first_step * run.samples_per_step_per_rank)
    run.forward.train()
    batches = iter(run.train_loader)
    window = LossWindow(run.device, state.step)
    progress = run.progress(epoch, first_step)
    for _ in range(first_step, run.steps_per_epoch):
        lr = optimizer_step(run, batches, window)
        progress.update()
        # The clock is read at log steps only: deciding to checkpoint is collective across ranks,
        # and log steps already synchronise with the device.
        if state.step % t.log_every == 0:
            run.log_training(window.read_and_reset(state.step), lr, progress)
            if run.checkpoint_due():
                run.save_checkpoint(epoch)
                if run.stopping:  # preempted: the checkpoint is written, leave now
                    break
    if window.count and not run.stopping:  # the epoch's last steps since the previous row
        run.log_training(window.read_and_reset(state.step), run.lr_at(state.step - 1), progress)
    window.raise_if_non_finite()
    progress.close()


def optimizer_step(run: Run, batches: Iterator, window: LossWindow) -> float:
    """One step of the recipe: `run.accumulation` micro-batches of forward and backward, then the
    AdamW update at lr(step) and the EMA update. Returns the lr it used."""
    lr = run.lr_at(run.state.step)
    set_lr(run.optimizer, lr)
    for micro in range(run.accumulation):
        images, targets, replaced = next(batches)
        window.skipped_images += int(replaced.sum())  # a CPU tensor: no device sync
        images = images.to(run.device, non_blocking=True, memory_format=run.memory_format)
        targets = targets.to(run.device, non_blocking=True)
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        # Gradients are all-reduced across processes once per step, on the last micro-batch.
        with run.no_sync() if micro < run.accumulation - 1 else contextlib.nullcontext():
            with run.autocast():
                loss = run.criterion(run.forward(images), targets)
            run.scaler.scale(loss / run.accumulation).backward()
        window.add(loss.detach(), run.state.step)
    if run.cfg.trainer.clip_grad:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.trainer.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    run.state.step += 1
    return lr


class LossWindow:
    """Training losses since the last log, summed on the device; remembers the first step whose
    loss was not finite without a host sync per step."""

    def __init__(self, device: torch.device, step: int):
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
        bad_step = int(self.first_bad_step)
        if bad_step >= 0:
            raise NonFiniteLoss(
                f"the training loss became non-finite at step {bad_step}; the run stopped and the last "
                "checkpoint before it is kept. Lower optimizer.lr, set trainer.clip_grad, or use "
                "trainer.precision=bf16 instead of fp16"
            )

    def read_and_reset(self, step: int) -> dict:
        """Mean loss and throughput of the window (one host sync)."""
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


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, *, device: torch.device, autocast, memory_format, lockstep_shape: tuple | None = None
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy over the loader's images.

    `lockstep_shape`: the model's forward is a collective (FSDP), so every process must call it as
    often as the one with the most batches; the others run unscored forwards of this shape.
    """
    model.eval()
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = skipped = idle_forwards = 0
    if lockstep_shape is not None:  # agreed before the first forward: collectives must pair up
        most = torch.tensor(len(loader), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        idle_forwards = int(most) - len(loader)
    for images, targets, replaced in loader:
        skipped += int(replaced.sum())
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        count += targets.numel()
    for _ in range(idle_forwards):
        with autocast():
            model(torch.zeros(lockstep_shape, device=device).to(memory_format=memory_format))
    # Each process scored its own shard; the sums over all of them are the whole set's.
    totals = all_reduce_sum(
        torch.stack(
            [
                correct1.double(),
                correct5.double(),
                loss_sum,
                torch.tensor(float(count), device=device, dtype=torch.float64),
                torch.tensor(float(skipped), device=device, dtype=torch.float64),
            ]
        )
    ).tolist()
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
