"""Processes and devices: one trainer, three launchers, and timeouts that mean something.

- `python train.py ...`: one process.
- `torchrun --nproc_per_node=N train.py ...`: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
- SLURM `srun train.py ...` (one task per GPU, no torchrun): SLURM_PROCID / SLURM_NTASKS /
  SLURM_LOCALID; the master is the job's first node, the port derived from the job id.

NCCL on GPUs, gloo on the CPU. Two timeouts, because two kinds of waiting exist:
- `trainer.dist_timeout_minutes` bounds the collectives of the step loop, where every rank does the
  same work: a rank that stops responding (dead, hung, stuck in I/O) ends the job after this long,
  and the error names it (`unresponsive_ranks`, read from the rendezvous store, which outlives a hung
  rank's main thread). It also bounds a rank's silence inside a sharded save (heartbeats, below).
  Tested with gloo. Under NCCL this needs the host to time out in Python (in
  `Agreement.receive`, at the next step boundary); NCCL's own watchdog, a minute later, ends the job
  without the name when the host is blocked in a CUDA sync first.
- `trainer.slow_work_timeout_minutes` bounds the waits for rank 0's legitimately long work (scanning
  ImageNet's 1.28M files, writing a multi-GB checkpoint, starting W&B): the other ranks wait in a
  collective of a separate gloo group (`wait_for_main`, `broadcast_from_main`), never inside a
  training collective, whose short timeout would fire on a healthy job. Rank 0 itself arrives last
  at those waits, the others being there already, so its side of the same group has the short
  timeout: a gloo timeout is each process's own, and a rank that hangs while rank 0 saves is
  named within `trainer.dist_timeout_minutes`, not after the slow-work hour.

Besides the training group, `init_processes` creates three CPU-side gloo groups: `control` (stop and
save decisions, a non-finite loss on any rank: small values every rank shares; the short timeout
everywhere), `slow_work` (the waits for rank 0 above) and `checkpointing` (`torch.distributed.checkpoint`
saves and loads, where every rank writes its shards: the slow-work timeout everywhere, since a healthy
rank may write slowly; a save or load runs on a thread of its own, so it cannot share a group with the
main thread's collectives).

A rank that hangs inside such a save (or load) is still named within `trainer.dist_timeout_minutes`:
the work runs on a thread and every rank beats through the rendezvous store meanwhile
(checkpointing/background.py says how).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from convnext_train.errors import UserError

# Under NCCL a timed-out collective is ended by NCCL's own watchdog, which cannot say which rank is
# missing; the training group's timeout is set this much later than ours so that our check (on the
# CPU-side control group, `Agreement`) can fire first and name the rank.
NCCL_TIMEOUT_SLACK = timedelta(minutes=1)
_RANK_KEY = "convnext/rank/{}"
_RESPONSIVE_KEY = "convnext/responsive/{}"
# A rank's heartbeat while a sharded save is in flight (checkpointing/background.py); the first is
# written at start-up, so that a peer's is there to read from the first look.
BEAT_KEY = "convnext/beat/{}"


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout: timedelta = timedelta(minutes=10)  # trainer.dist_timeout_minutes
    control: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    slow_work: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    checkpointing: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)

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


def init_processes(device_type: str, timeout_minutes: float, slow_work_timeout_minutes: float = 60) -> Processes:
    launched = launch_environment()
    timeout = timedelta(minutes=timeout_minutes)
    if not launched.distributed:
        return Processes(timeout=timeout)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(launched.local_rank)
        try:
            dist.init_process_group(
                backend,
                rank=launched.rank,
                world_size=launched.world_size,
                timeout=timeout + NCCL_TIMEOUT_SLACK if backend == "nccl" else timeout,
            )
        except (RuntimeError, ValueError) as error:
            raise UserError(f"could not join the process group of {launched.world_size} processes: {error}") from error
    slow = timedelta(minutes=slow_work_timeout_minutes)
    processes = Processes(
        launched.rank,
        launched.world_size,
        launched.local_rank,
        timeout=timeout,
        control=dist.new_group(backend="gloo", timeout=timeout),
        slow_work=dist.new_group(backend="gloo", timeout=timeout if launched.rank == 0 else slow),
        checkpointing=dist.new_group(backend="gloo", timeout=slow),
    )
    # Who is who, for the message that names a rank that stopped responding; a first beat, so that
    # every rank's key exists before anyone watches it (reading a missing key would block).
    store().set(_RANK_KEY.format(processes.rank), json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    store().set(BEAT_KEY.format(processes.rank), "0")
    return processes


def device_for(processes: Processes, device_type: str) -> torch.device:
    return torch.device("cuda", processes.local_rank) if device_type == "cuda" else torch.device("cpu")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def store() -> dist.Store:
    # The default group's rendezvous store (torchrun's agent, or rank 0's TCPStore under SLURM): a
    # server thread that answers while a rank's main thread is stuck.
    return dist.distributed_c10d._get_default_store()


# --------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(value, processes: Processes) -> list:
    """`value` of every rank, in rank order (all ranks call it; small picklable values)."""
    if not processes.distributed:
        return [value]
    values = [None] * processes.world_size
    with naming_the_unresponsive(processes):
        dist.all_gather_object(values, value, group=processes.control)
    return values


def broadcast_from_main(value, processes: Processes):
    """Rank 0's `value` on every rank (all ranks call it; small picklable values). Also a wait for
    rank 0's slow work before it (writing a checkpoint, say): the others wait here with the
    slow-work timeout, not in a training collective; rank 0 waits for them with the short one."""
    if not processes.distributed:
        return value
    values = [value]
    with naming_the_unresponsive(processes):
        dist.broadcast_object_list(values, src=0, group=processes.slow_work)
    return values[0]


def wait_for_main(processes: Processes) -> None:
    """A barrier after rank 0's slow work (see the module docstring)."""
    if processes.distributed:
        with naming_the_unresponsive(processes):
            dist.barrier(group=processes.slow_work)


@contextmanager
def main_process_first(processes: Processes):
    """Rank 0 runs the block first (writing a dataset generated on first use, scanning a tree); the
    others run it after, when its results are on disk. They wait with the slow-work timeout."""
    if not processes.is_main:
        wait_for_main(processes)
    yield
    if processes.is_main:
        wait_for_main(processes)


class Agreement:
    """Flags that every rank agrees on, without a host sync or a wait in the step.

    Every rank `send`s its flags at the same point of the loop: that starts an all-reduce (MAX: any
    rank's flag counts) on the CPU-side control group in the background. At the next such point
    every rank `receive`s the result, which has long finished by then: so every rank acts on the
    same flags at the same step, one step after they were raised. `settle` is the blocking form,
    for the places that are collective anyway (the end of an epoch, start-up); it takes in a result
    still pending. One process needs none of this: the callers decide at once.
    """

    def __init__(self, processes: Processes, size: int):
        self.processes = processes
        self.size = size
        self._pending: tuple[torch.Tensor, dist.Work] | None = None

    def send(self, flags: list[bool]) -> None:
        if self._pending is not None:
            raise RuntimeError("Agreement.send: the previous flags were not received")
        tensor = torch.tensor(flags, dtype=torch.uint8)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.processes.control, async_op=True)
        self._pending = (tensor, work)

    def receive(self) -> list[bool]:
        """The agreed flags of the last `send`; all False when nothing was sent since."""
        if self._pending is None:
            return [False] * self.size
        tensor, work = self._pending
        self._pending = None
        self._wait(work)
        return [bool(v) for v in tensor.tolist()]

    def settle(self, flags: list[bool]) -> list[bool]:
        """The pending flags OR these, agreed now."""
        tensor = torch.tensor([a or b for a, b in zip(self.receive(), flags, strict=True)], dtype=torch.uint8)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.processes.control, async_op=True)
        self._wait(work)
        return [bool(v) for v in tensor.tolist()]

    def _wait(self, work: dist.Work) -> None:
        with naming_the_unresponsive(self.processes):
            work.wait(timeout=self.processes.timeout)


# --------------------------------------------------------------------------------------------------
# Naming a rank that stopped responding
# --------------------------------------------------------------------------------------------------
class RankUnresponsive(UserError):
    """Some rank stopped taking part in the job's collectives; the message names it."""


@contextmanager
def naming_the_unresponsive(processes: Processes):
    """A collective in the block that times out raises RankUnresponsive naming the missing rank."""
    try:
        yield
    except RuntimeError as error:
        raise_if_timeout(error, processes)
        raise


def is_timeout(error: BaseException) -> bool:
    # gloo: "Timed out waiting 600000ms for recv operation"; Work.wait: "Operation timed out!"
    return isinstance(error, RuntimeError) and "timed out" in str(error).lower()


def raise_if_timeout(error: BaseException, processes: Processes) -> None:
    """After a collective timed out on this rank: raise RankUnresponsive naming the ranks that did
    not answer (every healthy rank times out at about the same moment and answers)."""
    if not (processes.distributed and is_timeout(error)):
        return
    try:
        missing = unresponsive_ranks(processes, grace=min(processes.timeout, timedelta(minutes=1)))
    except Exception:  # noqa: BLE001 - the store itself is gone (rank 0 died under SLURM): say so below
        missing = None
    waited = f"a collective waited {_waited(error, processes)} for"
    if missing is None:
        who = "the rendezvous store is unreachable too: rank 0 or the launcher is gone"
        raise RankUnresponsive(f"rank {processes.rank}: {waited} the other ranks and {who}") from error
    if not missing:
        raise RankUnresponsive(
            f"rank {processes.rank}: {waited} a peer, yet every rank answers now: a network stall or a rank "
            "briefly stuck in I/O; the last checkpoint is intact and the same command resumes from it"
        ) from error
    raise RankUnresponsive(stopped_responding(missing, f"{waited} it (hung, dead, or stuck in I/O)")) from error


def stopped_responding(missing: list[int], how: str) -> str:
    names = ", ".join(describe_rank(rank) for rank in missing)
    return (
        f"{names} stopped responding: {how}; the job stops. "
        "The last checkpoint is intact and the same command resumes from it"
    )


def _waited(error: BaseException, processes: Processes) -> str:
    """How long the timed-out collective waited, and the setting that says so: gloo's message has
    the milliseconds; a wait for slow work (rank 0's scan or save) has the longer timeout."""
    found = re.search(r"(\d+)\s*ms", str(error))
    minutes = int(found.group(1)) / 60_000 if found else processes.timeout.total_seconds() / 60
    if minutes > processes.timeout.total_seconds() / 60 * 1.01:
        return f"{minutes:g} min (trainer.slow_work_timeout_minutes)"
    return f"{minutes:g} min (trainer.dist_timeout_minutes)"


def unresponsive_ranks(processes: Processes, grace: timedelta) -> list[int]:
    """The ranks that do not check in within `grace`, through the rendezvous store (this rank
    checks in too: the others may be asking at the same time)."""
    rendezvous = store()
    rendezvous.set(_RESPONSIVE_KEY.format(processes.rank), "1")
    waiting = {rank for rank in range(processes.world_size) if rank != processes.rank}
    deadline = time.monotonic() + grace.total_seconds()
    while waiting and time.monotonic() < deadline:
        waiting = {rank for rank in waiting if not rendezvous.check([_RESPONSIVE_KEY.format(rank)])}
        time.sleep(0.2)
    return sorted(waiting)


def describe_rank(rank: int) -> str:
    """A rank as messages name it, `rank 3 (pid 4242 on node7)` (read from the rendezvous store)."""
    try:
        info = json.loads(store().get(_RANK_KEY.format(rank)))
        return f"rank {rank} (pid {info['pid']} on {info['host']})"
    except Exception:  # noqa: BLE001 - the description is a courtesy
        return f"rank {rank}"
