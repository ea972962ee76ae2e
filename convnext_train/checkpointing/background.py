"""Work that takes long on every rank (a sharded save or load: every rank writes or reads its
shards), run on a thread of its own and watched by heartbeats, so that a rank that hangs inside it is
named within `trainer.dist_timeout_minutes` while one that only writes slowly is waited for.

Why a thread: a blocked gloo collective cannot be interrupted (not even by `abort`), and the
checkpointing group has the slow-work timeout, since a healthy rank may write slowly. So the work runs
on a daemon thread, each rank beats through the rendezvous store from another one while it is in
flight, and the main thread waits in a loop that watches the peers' beats (rank 0 every other rank's,
the others rank 0's). A rank that writes slowly keeps beating (its threads run while the writing one
waits on the disk); a stopped process (SIGSTOP, a frozen VM), one deadlocked holding the GIL, or one
that never started the work falls silent, and a peer silent for the short timeout is named
(`RankUnresponsive`). The work is then abandoned on its thread, which holds neither `shutdown` nor
the interpreter's exit, and a save's temporary directory is left for the next start's sweep. What no
beat can tell from slow writing, a rank stuck in a write of its own that releases the GIL (a hung file
server, a GPU hang in the copy to the host), is bounded by the slow-work timeout.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from convnext_train.distributed import BEAT_KEY, Processes, RankUnresponsive, stopped_responding, store

T = TypeVar("T")
_beats = itertools.count(1)  # this process's beats: each one a new value, so that peers see it change


class Background(Generic[T]):
    """`work` (collectives of the checkpointing group, every rank writing or reading: `dcp.save`,
    `dcp.load`) started on a thread of its own; `wait` for its result on the main thread, now (a
    synchronous save, a load) or later (an async save, at the next save). Every rank calls both. See
    the module docstring for why.

    Under several processes the thread is a daemon: after a peer is named, the work stays blocked
    in gloo until the slow-work timeout, and neither `shutdown` nor the interpreter's exit may wait
    for it. This rank beats from its start until `wait` returns: through an async save's training
    too, so that rank 0's slow work there (closing W&B before the last `finish`) is not silence. One
    process has nothing to watch and nothing to block on: its thread is an ordinary one, which the
    exit waits for, so that an async save still writes whole after an error."""

    def __init__(self, processes: Processes, work: Callable[[], T], what: str):
        self.processes = processes
        self.what = what
        self._result: T | None = None
        self._error: BaseException | None = None
        self._heartbeats = _Heartbeats(processes, what) if processes.distributed else None
        if self._heartbeats is not None:
            self._heartbeats.start()
        # The current CUDA device is per thread: a new one starts on device 0, where DCP's copy to the
        # host would make its streams (and a CUDA context on every rank's behalf).
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self._thread = threading.Thread(target=self._run, args=(work, device), name=what, daemon=processes.distributed)
        self._thread.start()

    def _run(self, work: Callable[[], T], device: int | None) -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            self._result = work()
        except BaseException as error:  # noqa: BLE001 - DCP's CheckpointException is a BaseException: re-raised by `wait`
            self._error = error

    def wait(self) -> T:
        """The work's result, or its exception; RankUnresponsive naming a peer that fell silent for
        `trainer.dist_timeout_minutes` meanwhile (the work is then abandoned on its thread)."""
        try:
            while self._heartbeats is not None and self._thread.is_alive():
                self._heartbeats.check()
                self._thread.join(self._heartbeats.interval)
            self._thread.join()
        finally:
            if self._heartbeats is not None:
                self._heartbeats.stop()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class _Heartbeats:
    """This rank's beats (a daemon thread: it runs while the main thread waits or trains, and stops
    only when the whole process does) and its watch of the peers', through the rendezvous store.
    Rank 0 watches every other rank, the others watch rank 0 (a silent one is named by whoever
    watches it, and that rank's exit ends the job), so the store serves O(world) reads a beat, not
    O(world^2). A peer's beat is compared with its last value on this rank's own clock: no two hosts'
    clocks are compared."""

    def __init__(self, processes: Processes, what: str):
        self.processes = processes
        self.what = what
        self.store = store()
        self.timeout = processes.timeout.total_seconds()
        self.interval = min(self.timeout / 10, 5.0)  # a few beats a timeout; at most every 5 s: cheap at scale
        self.peers = [rank for rank in range(processes.world_size) if rank != 0] if processes.is_main else [0]
        self.heard: dict[int, tuple[bytes, float]] = {}  # peer -> (its last beat, when it changed)
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._beat, name=f"{self.what}: heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _beat(self) -> None:
        key = BEAT_KEY.format(self.processes.rank)
        while True:
            try:
                self.store.set(key, str(next(_beats)))
            except RuntimeError:  # the store is gone: `check` says so on the main thread
                return
            if self._stopped.wait(self.interval):
                return

    def check(self) -> None:
        """RankUnresponsive naming the peers whose beat has not changed for the short timeout."""
        now = time.monotonic()
        try:
            beats = self.store.multi_get([BEAT_KEY.format(peer) for peer in self.peers])
        except RuntimeError as error:  # DistStoreError: the store's host (rank 0 under SLURM) is gone or stopped
            raise RankUnresponsive(
                f"rank {self.processes.rank}: {self.what} lost the rendezvous store: rank 0 or the launcher is gone"
            ) from error
        silent = []
        for peer, beat in zip(self.peers, beats, strict=True):
            last = self.heard.get(peer)
            if last is None or last[0] != beat:
                self.heard[peer] = (beat, now)  # watched from the first look: a full timeout to start beating
            elif now - last[1] > self.timeout:
                silent.append(peer)
        if silent:
            how = (
                f"{self.what} heard nothing from it for {self.timeout / 60:g} min "
                "(trainer.dist_timeout_minutes; its process is stopped or hung)"
            )
            raise RankUnresponsive(stopped_responding(silent, how))


def staged(state: dict[str, Any]) -> dict[str, Any]:
    """A CPU copy of the state for an async save to write while training changes the original: what
    dcp.async_save stages, here on the caller's thread before the save's thread starts (dcp.async_save's
    own executor thread, blocked on a hung rank, would hold the process's exit).
    BlockingAsyncStager: in every torch since 2.4."""
    return BlockingAsyncStager(cache_staged_state_dict=False).stage(state)
