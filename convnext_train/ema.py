"""The recipe's EMA of the weights: after every optimizer step, ema = decay * ema + (1 - decay) * w.

The same update as timm's `ModelEmaV3` without warmup (what the official code's `ModelEma` does),
written here because timm's EMA keeps a deep copy of the module, and an FSDP2-sharded module
refuses to be deep-copied. This one keeps only the tensors, shaped like the model's own (whole
tensors, or each rank's shard under FSDP), and is evaluated and saved by swapping its values into
the model for a moment: one code path for one process, DDP and FSDP, and no second module in memory.
For sharded checkpoints, `state_dict` names the same tensors like the model's state dict, as
DTensors over this rank's shards under FSDP: `torch.distributed.checkpoint` then saves and loads
them in place, resharding across world sizes like the model's own weights.

Buffers are part of the EMA as in timm's `ModelEmaV3`: floating-point ones (BatchNorm's running
mean and variance, in the roadmap's BatchNorm steps) are averaged like the weights, so the EMA model
evaluates with statistics that followed its own training; integer ones (BatchNorm's batch counter)
are copied, so that an EMA state dict loads strictly into the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class WeightEma:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [t.detach().clone() for t in _averaged(model)]
        self.counters = [b.detach().clone() for _, b in _named_counters(model)]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self.shadow, _averaged(model), 1.0 - self.decay)
        for copy, (_, counter) in zip(self.counters, _named_counters(model), strict=True):
            copy.copy_(counter)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The averaged tensors by the model's names; views of the EMA's own storage (loading into
        them loads the EMA). Under FSDP each is a DTensor of this rank's shard, placed like the
        model's parameter."""
        named = {}
        for (name, tensor), shadow in zip(_named_averaged(model), self.shadow, strict=True):
            if isinstance(tensor, DTensor):
                shadow = DTensor.from_local(
                    shadow,
                    tensor.device_mesh,
                    tensor.placements,
                    run_check=False,
                    shape=tensor.shape,
                    stride=tensor.stride(),
                )
            named[name] = shadow
        named |= {name: copy for (name, _), copy in zip(_named_counters(model), self.counters, strict=True)}
        return named

    @contextmanager
    @torch.no_grad()
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` holding the EMA weights inside the block (to evaluate or save them), its own
        weights again after. Whatever the block does to the weights is kept as the new EMA."""
        tensors = _averaged(model)
        trained = [t.detach().clone() for t in tensors]
        torch._foreach_copy_(tensors, self.shadow)
        try:
            yield model
        finally:
            torch._foreach_copy_(self.shadow, tensors)
            torch._foreach_copy_(tensors, trained)


def _named_averaged(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters and floating-point buffers, in a fixed order (integer buffers such as
    BatchNorm's counter are copied instead: `_named_counters`)."""
    buffers = [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    return [*model.named_parameters(), *buffers]


def _named_counters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, b) for name, b in model.named_buffers() if not b.is_floating_point()]


def _averaged(model: nn.Module) -> list[torch.Tensor]:
    """Of an FSDP-sharded tensor, this rank's shard: a view of the parameter's own storage, which
    the in-place updates write through."""
    return [t.to_local() if isinstance(t, DTensor) else t.data for _, t in _named_averaged(model)]
