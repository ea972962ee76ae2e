"""Data parallelism, applied to the model from outside it, and what it changes for the trainer.

`parallelize` applies, in this fixed order:
1. activation checkpointing: the model's own `grad_checkpointing` flag (per stage, set at build
   time, as timm and the official code do), so nothing to wrap here;
2. `torch.compile`, under FSDP of each shard unit in place (`nn.Module.compile`: the parameter
   names, and so the checkpoints, stay the plain model's), before sharding as torchtitan does;
3. the data-parallel strategy across processes:
   - `ddp`: DistributedDataParallel (broadcasts rank 0's weights, all-reduces gradients);
     torch.compile then wraps the DDP module, whose graph it splits at the gradient buckets;
   - `fsdp`: FSDP2 `fully_shard` of each stage (the isotropic model: each block), then of the
     root, with a bf16 mixed-precision policy on the GPU when `trainer.precision=bf16`
     (bf16 weights and activations in the forward, gradients reduced in fp32). Every rank
     holds 1/world of the weights, gradients and AdamW state.

BatchNorm (the roadmap's ResNet-like steps): each process normalises with its own batch's statistics,
as torchvision's ResNet recipes do under DDP; `sync_bn=True` converts every BatchNorm to SyncBatchNorm
(statistics over the global micro-batch; torch runs it on GPUs only). The running statistics, which
evaluation uses, are averaged over the processes after every optimizer step (`Parallel.sync_buffers`):
the same on every rank, the same under DDP and FSDP (FSDP2 does not broadcast buffers as DDP does), and
in every checkpoint, so a resumed run goes on as the uninterrupted one.

What it means for checkpoints is the Checkpointer's (convnext_train/checkpointing/state.py): a
full file gathers whole tensors keyed by parameter name, a sharded directory has every rank write
its own shards; either resumes under either strategy and any number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from convnext_train.distributed import Processes

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Parallel:
    forward: nn.Module  # what the training step calls
    no_sync: Callable[[], contextlib.AbstractContextManager]  # skip the gradient reduction inside
    sync_buffers: Callable[[], None]  # after each optimizer step: every rank's running statistics averaged


def parallelize(
    model: nn.Module,
    processes: Processes,
    device: torch.device,
    *,
    strategy: str,
    precision: str,
    compile_model: bool,
    sync_bn: bool = False,
) -> Parallel:
    """Wrap `model` (already on `device`) for training; under FSDP the model itself is sharded
    in place, so the caller keeps using `model` for the optimizer, EMA and checkpoints."""
    if sync_bn and processes.distributed:
        # In place below the root (a model is never a bare BatchNorm), so `model` stays the caller's.
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sync_buffers = running_stats_averager(model) if processes.distributed and not sync_bn else lambda: None
    if strategy == "fsdp" and processes.distributed:
        # FSDP2 shards contiguous parameters only, and its all-gathers return them contiguous anyway;
        # channels-last inputs still make the convolutions run channels-last.
        model.to(memory_format=torch.contiguous_format)
        if compile_model:
            for unit in shard_units(model):
                unit.compile()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        mixed = {"mp_policy": policy} if device.type == "cuda" and precision == "bf16" else {}
        for unit in shard_units(model):
            fully_shard(unit, **mixed)
        fully_shard(model, **mixed)
        return Parallel(forward=model, no_sync=lambda: _fsdp_no_sync(model), sync_buffers=sync_buffers)
    forward, no_sync = model, contextlib.nullcontext
    if processes.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Not rank 0's buffers before every forward: `sync_buffers` averages them after each step.
            broadcast_buffers=False,
        )
        forward, no_sync = ddp, ddp.no_sync
    if compile_model:
        forward = torch.compile(forward)
    return Parallel(forward=forward, no_sync=no_sync, sync_buffers=sync_buffers)


def running_stats_averager(model: nn.Module) -> Callable[[], None]:
    """A function that averages the model's floating-point buffers (BatchNorm's running mean and
    variance) over the processes, in one all-reduce (timm's `distribute_bn` issues one per buffer); a
    no-op for models without them (ConvNeXt). Integer buffers (BatchNorm's step counter) are the same
    on every rank already."""
    if not any(b.is_floating_point() for b in model.buffers()):
        return lambda: None

    @torch.no_grad()
    def average() -> None:
        # Looked up at each call: wrapping (FSDP) may move buffers into new tensors after this is made.
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat, op=dist.ReduceOp.AVG if flat.is_cuda else dist.ReduceOp.SUM)
        if not flat.is_cuda:  # gloo has no AVG
            flat /= dist.get_world_size()
        parts = flat.split([b.numel() for b in buffers])
        torch._foreach_copy_(buffers, [part.view_as(b) for part, b in zip(parts, buffers, strict=True)])

    return average


def shard_units(model: nn.Module) -> list[nn.Module]:
    """FSDP's units: each stage of a hierarchical ConvNeXt (ours or timm's), each block of an
    isotropic one, the units a model names itself (FCMAE: encoder stages and decoder). A unit's
    weights are gathered just before it runs and freed after."""
    if hasattr(model, "shard_units"):
        return model.shard_units()
    if hasattr(model, "stages"):
        return list(model.stages)
    if hasattr(model, "blocks"):
        return list(model.blocks)
    raise ValueError(f"{type(model).__name__} has neither `stages` nor `blocks` to shard")


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    # Gradients accumulate unsharded on every rank and are reduce-scattered on the last micro-batch.
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit back in its sharded state. An evaluation forward (no backward) can leave
    the root's weights gathered; writing new values into the shards (the EMA swap) must not be
    shadowed by a stale gathered copy."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
