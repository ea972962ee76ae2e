"""What training, evaluation and the benchmark share at run time: the device, the autocast of a
precision, and the seeding of every random number generator a step draws from.

Kept apart from the trainer so that eval.py and the bench use the trainer's exact settings without
importing it.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch

from convnext_train.distributed import Processes
from convnext_train.errors import UserError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is visible: use trainer.device=cpu or auto")
    return torch.device(name)


def prepare_device(device: torch.device) -> torch.device:
    """Settings every user of the device wants: on CUDA, cuDNN's autotuned convolution algorithms
    (the image size is fixed, so the search pays off from the first batches on)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The one autocast of `trainer.precision`: fp32 runs without one."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reseed_per_rank(seed: int, processes: Processes, *, resumed_at_step: int | None = None) -> None:
    """Each rank's own stream for drop path and Mixup. A fresh run: rank 0 goes on with the stream
    `seed` started (so one process reproduces a single-process run), the others take streams derived
    from (seed, rank). Resumed on another number of processes, the saved streams cannot continue one
    to one: every rank, 0 included, takes a stream derived from (seed, rank, step), so the run stays
    reproducible and no rank replays draws it made before."""
    if resumed_at_step is None and processes.rank == 0:
        return
    entropy = [seed, processes.rank] + ([] if resumed_at_step is None else [resumed_at_step])
    seed_everything(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from, as plain Python values (bytes, ints): they load with
    `torch.load(weights_only=True)` and travel through `all_gather_object` unchanged."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "pos": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gauss,
        },
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _as_tuples(value):
    # Pickle round trips keep tuples, but be strict: random.setstate rejects lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
