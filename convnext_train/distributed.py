"""Processes and devices: one trainer, three launchers.

- `python train.py ...`: one process.
- `torchrun --nproc_per_node=N train.py ...`: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
- SLURM `srun train.py ...` (one task per GPU, no torchrun): SLURM_PROCID / SLURM_NTASKS /
  SLURM_LOCALID; the master is the job's first node, the port derived from the job id.

NCCL on GPUs, gloo on the CPU, with a timeout on every collective so that a dead rank takes the
job down instead of leaving the others waiting forever.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from convnext_train.errors import UserError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_environment() -> Processes:
    """Rank, world size and local rank from torchrun's or SLURM's variables (a single process when
    neither launched us). Under SLURM it also sets MASTER_ADDR/MASTER_PORT for env:// init."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Processes(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_STEP_ID") is not None:
        env.setdefault("MASTER_ADDR", _first_slurm_host(env["SLURM_JOB_NODELIST"]))
        env.setdefault("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000))
        return Processes(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Processes()


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def init_processes(device_type: str, timeout_minutes: float) -> Processes:
    processes = launch_environment()
    if processes.distributed and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(processes.local_rank)
        try:
            dist.init_process_group(
                backend,
                rank=processes.rank,
                world_size=processes.world_size,
                timeout=timedelta(minutes=timeout_minutes),
            )
        except (RuntimeError, ValueError) as error:
            raise UserError(f"could not join the process group of {processes.world_size} processes: {error}") from error
    return processes


def device_for(processes: Processes, device_type: str) -> torch.device:
    return torch.device("cuda", processes.local_rank) if device_type == "cuda" else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_process_first(processes: Processes):
    """Rank 0 runs the block first (writing a dataset generated on first use, say); the others
    run it after, when its results are on disk."""
    if not processes.is_main:
        barrier()
    yield
    if processes.is_main:
        barrier()


def gather_objects(value) -> list:
    """`value` of every rank, in rank order (all ranks call it)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_flags(*flags: bool) -> tuple[bool, ...]:
    """Rank 0's `flags` on every rank, so that all take the same branch around a collective."""
    if not dist.is_initialized():
        return flags
    values = list(flags)
    dist.broadcast_object_list(values, src=0)
    return tuple(bool(v) for v in values)
