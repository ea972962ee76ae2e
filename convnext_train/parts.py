"""The parts one optimizer step of the recipe is made of, built from the config in one place, so
that the trainer and the benchmark train exactly the same way.

    parts = build_parts(cfg, model, processes, device, steps_per_epoch=1251)
    lr = engine.optimizer_step(parts, batches, window, step)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn

from convnext_train.distributed import Processes
from convnext_train.ema import WeightEma
from convnext_train.optim import build_optimizer
from convnext_train.parallelize import parallelize
from convnext_train.runtime import autocast
from convnext_train.schedule import cosine_lr
from convnext_train.tasks import Task, build_task


@dataclass
class TrainParts:
    model: nn.Module  # the module itself (sharded in place under FSDP): optimizer, EMA, checkpoints
    forward: nn.Module  # what the step calls: the model, DDP-wrapped and compiled as asked
    no_sync: Callable[[], contextlib.AbstractContextManager]  # skip the gradient all-reduce
    sync_buffers: Callable[[], None]  # BatchNorm's running statistics averaged over the processes
    ema: WeightEma | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    task: Task  # what a micro-batch's loss is (classification: Mixup/CutMix and its cross-entropy)
    lr_at: Callable[[int], float]  # the recipe's lr at an optimizer step
    accumulation: int  # micro-batches per optimizer step on each process
    device: torch.device
    memory_format: torch.memory_format
    precision: str
    clip_grad: float | None

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device.type)


def build_parts(
    cfg: DictConfig,
    model: nn.Module,
    processes: Processes,
    device: torch.device,
    *,
    steps_per_epoch: int,
    task: Task | None = None,
) -> TrainParts:
    """`model` (freshly built, on the CPU) made ready to train with `cfg`'s recipe: on its device,
    wrapped by the strategy, with its EMA, optimizer, grad scaler, task (`cfg.task`'s unless given)
    and lr schedule."""
    t = cfg.trainer
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    parallel = parallelize(
        model,
        processes,
        device,
        strategy=t.strategy,
        precision=t.precision,
        compile_model=t.compile,
        sync_bn=t.sync_bn,
    )
    return TrainParts(
        model=model,
        forward=parallel.forward,
        no_sync=parallel.no_sync,
        sync_buffers=parallel.sync_buffers,
        # After wrapping: DDP has broadcast rank 0's weights (FSDP: each rank's shard of the same
        # seeded weights), so the EMA starts from them.
        ema=WeightEma(model, decay=cfg.ema.decay) if cfg.ema.enabled else None,
        optimizer=build_optimizer(model, cfg.optimizer, device.type),
        scaler=torch.amp.GradScaler(device.type, enabled=t.precision == "fp16"),
        task=task or build_task(cfg),
        lr_at=partial(
            cosine_lr,
            base_lr=peak_lr(cfg),
            min_lr=cfg.scheduler.min_lr,
            warmup_steps=round(cfg.scheduler.warmup_epochs * steps_per_epoch),
            total_steps=t.epochs * steps_per_epoch,
        ),
        accumulation=t.global_batch_size // (t.micro_batch_size * processes.world_size),
        device=device,
        memory_format=memory_format,
        precision=t.precision,
        clip_grad=t.clip_grad,
    )


def peak_lr(cfg: DictConfig) -> float:
    """`optimizer.lr` is the recipe's value at `lr_reference_batch`; it follows the global batch
    linearly only when `optimizer.scale_lr_with_batch` asks for it."""
    opt = cfg.optimizer
    if opt.scale_lr_with_batch:
        return opt.lr * cfg.trainer.global_batch_size / opt.lr_reference_batch
    return opt.lr
