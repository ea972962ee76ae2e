"""The recipe's EMA of the weights: after every optimizer step, ema = decay * ema + (1 - decay) * w.

The same update as timm's `ModelEmaV3` without warmup (what the official code's `ModelEma` does),
written here because timm's EMA keeps a deep copy of the module, and an FSDP2-sharded module
refuses to be deep-copied. This one keeps only the tensors, shaped like the model's own (whole
tensors, or each rank's shard under FSDP), and is evaluated and saved by swapping its values into
the model for a moment: one code path for one process, DDP and FSDP, and no second module in memory.
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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self.shadow, _averaged(model), 1.0 - self.decay)

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


def _averaged(model: nn.Module) -> list[torch.Tensor]:
    """The parameters and floating-point buffers, in a fixed order (integer buffers such as
    BatchNorm's counter are not averaged; ConvNeXt has none). Of an FSDP-sharded tensor, this
    rank's shard: a view of the parameter's own storage, which the in-place updates write through."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    return [t.to_local() if isinstance(t, DTensor) else t.data for t in tensors]
