"""The run's stateful parts as the Checkpointer sees them: named objects with `state_dict()` /
`load_state_dict()` (torchtitan's `Stateful`), handed over as one mapping where the trainer builds
them. A new part is one more entry there; the Checkpointer saves and restores each by its name,
which is also its key in the checkpoint file (`model`, `model_ema`, `optimizer`, ...).

Two kinds:
- small parts (the grad scaler, the train state, every rank's RNG streams, the data's reading layout
  where the source has one): their state dict goes
  into the file (full checkpoints) or meta.pt (sharded ones) as it is;
- `ShardedState` parts (the weights, their EMA, the optimizer): tensors that FSDP shards across
  ranks. `state_dict()` gives views of this rank's own storage (DTensors under FSDP), which
  `torch.distributed.checkpoint` writes and reads in place; `full_state_dict()` gathers whole tensors
  keyed by parameter name onto rank 0's CPU (a collective: every rank calls it) for a full file, and
  `load_full_state_dict` scatters such a dict back into shards. Either kind of checkpoint therefore
  resumes under any strategy and number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from convnext_train.distributed import Processes, gather_objects
from convnext_train.ema import WeightEma
from convnext_train.parallelize import is_sharded, reshard
from convnext_train.runtime import reseed_per_rank, restore_rng_state, rng_state


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ShardedState(Stateful, Protocol):
    def full_state_dict(self) -> dict[str, Any]: ...
    def load_full_state_dict(self, state: dict[str, Any]) -> None: ...
    def local_tensors(self) -> Iterator[torch.Tensor]: ...  # this rank's values, for the finiteness check


# --------------------------------------------------------------------------------------------------
# Sharded parts
# --------------------------------------------------------------------------------------------------
class ModelState:
    """The weights (and floating-point buffers) of the model, sharded in place under FSDP."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        reshard(self.model)
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)

    def full_state_dict(self) -> dict[str, Any]:
        reshard(self.model)
        return get_model_state_dict(self.model, options=_options(self.model, saving=True))

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        reshard(self.model)
        # The loader rewrites the dict's values in place (into shards); keep the caller's intact.
        set_model_state_dict(self.model, dict(state), options=_options(self.model, saving=False))

    def local_tensors(self) -> Iterator[torch.Tensor]:
        return (_local(p) for p in self.model.parameters())


class OptimizerState:
    """AdamW's moments and step counts, keyed by parameter name (not by position), sharded like
    the parameters under FSDP."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        # The state-dict helpers create a missing optimizer state with a zero-lr step, which the
        # optimizer skips when gradients are present; between steps there are none anyway.
        self.optimizer.zero_grad(set_to_none=True)
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)

    def full_state_dict(self) -> dict[str, Any]:
        reshard(self.model)
        return get_optimizer_state_dict(self.model, self.optimizer, options=_options(self.model, saving=True))

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        reshard(self.model)
        self.optimizer.zero_grad(set_to_none=True)  # see state_dict
        options = _options(self.model, saving=False)
        set_optimizer_state_dict(self.model, self.optimizer, _copy_nested(state), options=options)

    def local_tensors(self) -> Iterator[torch.Tensor]:
        for values in self.optimizer.state.values():
            yield from (_local(v) for v in values.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


class EmaState:
    """The EMA of the weights, named like the model's state dict. Sharded checkpoints write and
    read the EMA's own storage in place; full ones swap it into the model for the gather."""

    def __init__(self, ema: WeightEma, model: nn.Module):
        self.ema, self.model = ema, model

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # After a sharded load `state` holds the EMA's own tensors already (copying them onto
        # themselves is harmless); any other dict of the same names is copied in.
        for name, target in self.ema.state_dict(self.model).items():
            _local(target).copy_(_local(state[name]))

    def full_state_dict(self) -> dict[str, Any]:
        with self.ema.swapped_into(self.model):
            weights = ModelState(self.model).full_state_dict()
            if not is_sharded(self.model):
                # Unsharded, the state dict holds the model's own tensors, which get the trained
                # weights back when the block ends (under FSDP they are fresh CPU copies already).
                weights = {name: tensor.clone() for name, tensor in weights.items()}
        return weights

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        with self.ema.swapped_into(self.model):
            ModelState(self.model).load_full_state_dict(state)

    def local_tensors(self) -> Iterator[torch.Tensor]:
        return iter(self.ema.shadow)


# --------------------------------------------------------------------------------------------------
# Small parts
# --------------------------------------------------------------------------------------------------
class RngStreams:
    """Every rank's random number generators (drop path, Mixup: `runtime.rng_state`). Saving gathers
    them from all ranks (a collective); a resume on as many processes continues each rank's own
    stream. On another number of processes they cannot continue one to one: each rank then takes a
    stream derived from (seed, rank, the resumed step), so no rank replays draws it made before."""

    def __init__(self, processes: Processes, seed: int, step: Callable[[], int]):
        self.processes, self.seed, self.step = processes, seed, step

    def state_dict(self) -> dict[str, Any]:
        return {"per_rank": gather_objects(rng_state(), self.processes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        per_rank = state["per_rank"]
        if len(per_rank) == self.processes.world_size:
            restore_rng_state(per_rank[self.processes.rank])
        else:
            reseed_per_rank(self.seed, self.processes, resumed_at_step=self.step())


# --------------------------------------------------------------------------------------------------
# FSDP's full state dicts
# --------------------------------------------------------------------------------------------------
def _options(model: nn.Module, *, saving: bool) -> StateDictOptions:
    """Whole tensors keyed by parameter name: unsharded they are already; under FSDP gathered to
    rank 0's CPU when saving (the other ranks get empty dicts), scattered from every rank's copy
    of the whole dict when loading."""
    if not is_sharded(model):
        return StateDictOptions()
    return StateDictOptions(full_state_dict=True, cpu_offload=saving)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.detach()


def _copy_nested(value):
    if isinstance(value, dict):
        return {k: _copy_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_nested(v) for v in value]
    return value
