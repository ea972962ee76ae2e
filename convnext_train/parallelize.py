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

Checkpoints hold full, unsharded state dicts keyed by parameter name (`full_state_dicts`), the
same file whatever the strategy and world size, so a run saved under FSDP on 8 processes resumes
under DDP on 2, and eval.py and fine-tuning read it like any other. The price is one gather of
the weights and optimizer state to rank 0's CPU memory per checkpoint (for ConvNeXt V2-H, 660 M
parameters, about 8 GB), which a sharded `torch.distributed.checkpoint` directory would avoid
but which is small next to a checkpoint interval of minutes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from convnext_train.distributed import Processes

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Parallel:
    forward: nn.Module  # what the training step calls
    no_sync: Callable[[], contextlib.AbstractContextManager]  # skip the gradient reduction inside


def parallelize(
    model: nn.Module, processes: Processes, device: torch.device, *, strategy: str, precision: str, compile_model: bool
) -> Parallel:
    """Wrap `model` (already on `device`) for training; under FSDP the model itself is sharded
    in place, so the caller keeps using `model` for the optimizer, EMA and checkpoints."""
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
        return Parallel(forward=model, no_sync=lambda: _fsdp_no_sync(model))
    forward, no_sync = model, contextlib.nullcontext
    if processes.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        forward, no_sync = ddp, ddp.no_sync
    if compile_model:
        forward = torch.compile(forward)
    return Parallel(forward=forward, no_sync=no_sync)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """FSDP's units: each stage of a hierarchical ConvNeXt (ours or timm's), each block of an
    isotropic one. A unit's weights are gathered just before it runs and freed after."""
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


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """(model, optimizer) state dicts with whole tensors keyed by parameter name. Under FSDP a
    collective: rank 0 receives them on its CPU, the other ranks get empty dicts."""
    options = _options(model, saving=True)
    reshard(model)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return weights, optimizer_state


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict, optimizer_state: dict | None
) -> None:
    """Load what `full_state_dicts` produced (every rank passes the whole dicts), sharding it under
    FSDP. Either dict may come from any strategy and number of processes."""
    options = _options(model, saving=False)
    reshard(model)
    # The loaders rewrite the dicts' values in place (into shards); keep the caller's intact.
    set_model_state_dict(model, dict(weights), options=options)
    if optimizer is not None and optimizer_state is not None:
        # The loader first creates the optimizer's state with a zero-lr step, which it skips when
        # gradients are present (and then finds no state to shard into).
        optimizer.zero_grad(set_to_none=True)
        set_optimizer_state_dict(model, optimizer, _copy_nested(optimizer_state), options=options)


def all_finite(model: nn.Module) -> bool:
    """Whether every weight is finite on every rank (each rank checks its own shard)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).all().to(torch.int32)
    if dist.is_initialized() and is_sharded(model):
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _options(model: nn.Module, *, saving: bool) -> StateDictOptions:
    if not is_sharded(model):
        return StateDictOptions()  # whole tensors already; keys by name
    return StateDictOptions(full_state_dict=True, cpu_offload=saving)


def _copy_nested(value):
    if isinstance(value, dict):
        return {k: _copy_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_nested(v) for v in value]
    return value
