"""What every task's evaluation shares: the validation batches on the device, in lockstep under FSDP."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from convnext_train.distributed import all_reduce_sum


def summed_over_processes(*values: torch.Tensor | float, device: torch.device) -> list[float]:
    """Each value (a device scalar or a number) summed over every process, in float64: one all-reduce."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    return all_reduce_sum(stacked).tolist()


def evaluation_batches(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    autocast: Callable,
    memory_format: torch.memory_format,
    lockstep_shape: tuple | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The loader's batches `(images, targets, replaced)` with images and targets on the device,
    `model` in eval mode: what every task's evaluation iterates.

    `lockstep_shape`: the model's forward is a collective (FSDP), so every process must call it as
    often as the one with the most batches; after its own, a process runs unscored forwards of this
    shape until it has.
    """
    model.eval()
    idle_forwards = 0
    if lockstep_shape is not None:  # agreed before the first forward: collectives must pair up
        most = torch.tensor(len(loader), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        idle_forwards = int(most) - len(loader)
    for images, targets, replaced in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        yield images, targets.to(device, non_blocking=True), replaced
    with torch.no_grad():
        for _ in range(idle_forwards):
            with autocast():
                model(torch.zeros(lockstep_shape, device=device).to(memory_format=memory_format))
