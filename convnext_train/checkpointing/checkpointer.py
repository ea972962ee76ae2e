"""The Checkpointer: the one owner of a run's checkpoints (see the package docstring)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from convnext_train import preemption
from convnext_train.atomic import DiskFullError
from convnext_train.checkpointing.background import Background, staged
from convnext_train.checkpointing.layout import META_FILE, CheckpointDir, Entry, resolve_format, step_name
from convnext_train.checkpointing.lock import RunLock
from convnext_train.checkpointing.recipe import check_class_names, check_recipe
from convnext_train.checkpointing.report import SaveReport, measure_peak_rss
from convnext_train.checkpointing.state import ShardedState, Stateful
from convnext_train.distributed import Agreement, Processes, broadcast_from_main
from convnext_train.errors import UserError, out_of_space
from convnext_train.weights import CheckpointError, read_checkpoint, save_checkpoint
from convnext_train.weights.sharded import SafePlanner, SafeReader

# meta.pt of a sharded checkpoint lists the parts whose tensors are in its shards.
SHARDED_PARTS = "sharded_parts"


class NonFiniteWeights(UserError):
    pass


class TrainStateLike(Protocol):
    step: int
    epoch: int

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Decision:
    save: bool
    stop: bool


class Checkpointer:
    """Built before any compute: takes the run directory's lock, sweeps what a killed job left,
    finds the checkpoint to resume from and checks its recipe against the current config. Then
    `track` the run's parts once, `load_latest`, and in the loop `poll` after every optimizer step
    and `save` when it says so (and at every epoch end); `finish` at the end."""

    def __init__(self, run_dir: Path, cfg: DictConfig, processes: Processes, *, ignored_keys: Sequence[str]):
        c = cfg.checkpoint
        self.processes = processes
        self.directory = CheckpointDir(Path(run_dir) / "checkpoints", keep_last=c.keep_last)
        self.format = resolve_format(c.format, cfg.trainer.strategy, processes.world_size)
        self.async_save = bool(c.async_save)
        self.every_seconds = 60 * c.every_minutes
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.seed = cfg.trainer.seed
        self.signals = preemption.install()
        self.lock = RunLock(Path(run_dir))
        self._agreement = Agreement(processes, 2)  # [stop requested, save due]
        self._cached: dict[str, Any] | None = None  # rank 0's read of the latest checkpoint
        self._pending = None  # a sharded save in flight: (Background, temporary, step, links)
        self._parts: dict[str, Any] = {}
        self.class_names: list[str] | None = None
        self._last_save_time = time.monotonic()
        found, problem = None, None
        if processes.is_main:
            try:
                found = self._open(cfg, ignored_keys)
            except UserError as error:
                problem = error
        shared = broadcast_from_main((found, None if problem is None else str(problem)), processes)
        if problem is not None or shared[1] is not None:
            self.close()
            raise problem if problem is not None else UserError(shared[1])
        self.resume_entry: Entry | None = None if shared[0] is None else Entry(shared[0][0], Path(shared[0][1]))
        self.changes: dict[str, tuple] = {} if shared[0] is None else shared[0][2]

    def _open(self, cfg: DictConfig, ignored_keys: Sequence[str]):
        """Rank 0's part of opening the run directory; the others wait for its outcome."""
        self.lock.acquire()
        if not self.directory.directory.is_dir():
            return None
        removed, published = self.directory.sweep_temporaries()
        if removed:
            print(f"removed {removed} temporary file(s) a killed job left in {self.directory.directory}", flush=True)
        for entry in published:
            print(f"published {entry.path}: a whole checkpoint a job saved but died before publishing", flush=True)
        if published and published[-1] == self.directory.entries()[0]:
            self.directory.link("last", published[-1])
        latest = self.directory.latest()
        if latest is None:
            return None
        entry, self._cached = latest
        changes = check_recipe(
            self._cached["config"],
            self.config,
            ignored=ignored_keys,
            allowed=list(cfg.checkpoint.allow_changes or []),
            where=f"the checkpoint {entry.path} (step {self._cached['step']})",
        )
        return entry.step, str(entry.path), changes

    # ----------------------------------------------------------------------------------------------
    # The run's parts
    # ----------------------------------------------------------------------------------------------
    def track(self, parts: Mapping[str, Stateful], *, class_names: Sequence[str] | None = None) -> None:
        """The run's stateful parts by name (the names are the checkpoint's keys; state.py), restored in
        this order: the weights before the optimizer state that refers to them. `train_state` must be
        among them, with the `step` and `epoch` a checkpoint is named and described by. `class_names`:
        what each output index means (the data's, e.g. ImageFolder's folders), saved in every
        checkpoint for eval.py and predict.py; None leaves the key out."""
        if "train_state" not in parts:
            raise ValueError("the tracked parts must include `train_state` (its step names each checkpoint)")
        self._parts = dict(parts)
        self.class_names = None if class_names is None else list(class_names)

    @property
    def _train_state(self) -> TrainStateLike:
        return self._parts["train_state"]

    def load_latest(self) -> bool:
        """Restore every tracked part from the checkpoint found at start-up; False for a fresh run."""
        entry = self.resume_entry
        if entry is None:
            return False
        meta = self._cached if self._cached is not None else self.directory.read(entry)
        self._cached = None
        check_class_names(meta.get("class_names"), self.class_names, entry.path)
        try:
            if entry.sharded:
                self._load_sharded(entry, meta)
            for name, part in self._parts.items():
                if name not in meta:
                    if not (entry.sharded and isinstance(part, ShardedState)):
                        print(f"{entry.path} has no {name}: it starts afresh", flush=True)
                elif isinstance(part, ShardedState) and not entry.sharded:
                    part.load_full_state_dict(meta[name])
                elif not isinstance(part, ShardedState):
                    part.load_state_dict(meta[name])
        except (KeyError, RuntimeError, ValueError, TypeError, AssertionError, CheckpointException) as error:
            raise CheckpointError(
                f"the run directory's checkpoint {entry.path} does not fit this config ({_short(error)}); "
                "use another hydra.run.dir or move its checkpoints/ away to start afresh"
            ) from error
        self._last_save_time = time.monotonic()
        return True

    def _sharded_parts(self) -> dict[str, ShardedState]:
        return {name: part for name, part in self._parts.items() if isinstance(part, ShardedState)}

    def _load_sharded(self, entry: Entry, meta: dict[str, Any]) -> None:
        """The sharded parts the directory holds (meta.pt lists them), read by every rank into its own
        shards in place; a part the directory lacks starts afresh (said once, by `load_latest`)."""
        saved = set(meta.get(SHARDED_PARTS, ()))
        for name in self._sharded_parts().keys() - saved:
            print(f"{entry.path} has no {name}: it starts afresh", flush=True)
        state = {name: part.state_dict() for name, part in self._sharded_parts().items() if name in saved}
        # Watched like a save (see `_save_sharded`): every rank reads, with the slow-work timeout.
        load = Background(
            self.processes,
            lambda: dcp.load(
                state,
                storage_reader=SafeReader(entry.path),
                planner=SafePlanner(),
                process_group=self.processes.checkpointing,
                no_dist=not self.processes.distributed,
            ),
            what="a checkpoint load",
        )
        load.wait()
        for name, values in state.items():
            self._parts[name].load_state_dict(values)

    # ----------------------------------------------------------------------------------------------
    # The loop's calls
    # ----------------------------------------------------------------------------------------------
    def poll(self) -> Decision:
        """After every optimizer step: save now (the clock, a stop request)? Stop after it? Every
        rank gets the same answer at the same step without a host sync (distributed.Agreement): a
        request or the clock is acted on one step after it was seen. After a `save` decision the
        caller calls `save` (or skips it for a save that follows anyway, the epoch end's)."""
        if not self.processes.distributed:
            requested = self.signals.requested
            return Decision(save=requested or self._clock_due(), stop=requested)
        stop, due = self._agreement.receive()
        if not (stop or due):
            self._send_flags()  # a save sends its own, once it is done
        return Decision(save=stop or due, stop=stop)

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop, agreed now (a blocking collective: epoch ends, start-up)."""
        if not self.processes.distributed:
            return self.signals.requested
        return self._agreement.settle([self.signals.requested, False])[0]

    def _clock_due(self) -> bool:
        return time.monotonic() - self._last_save_time >= self.every_seconds

    def _send_flags(self) -> None:
        # Rank 0's clock decides when to save; any rank's stop request counts.
        self._agreement.send([self.signals.requested, self.processes.is_main and self._clock_due()])

    @property
    def stop_signal(self) -> str:
        return self.signals.signal_name or "a stop request on another rank"

    def save(self, *, best: Sequence[str] = ()) -> SaveReport:
        """Write a checkpoint of the tracked parts at the train state's step (every rank calls it).
        `best`: link names (`best`, `best_ema`) to point at it."""
        self._agreement.receive()  # flags sent before a save are about the time before it
        self._finish_pending()  # first: an async save of good weights is published whatever comes next
        self._refuse_non_finite()
        started = time.perf_counter()
        self._last_save_time = time.monotonic()  # the interval runs from save to save start
        _, peak = measure_peak_rss(lambda: self._save(list(best)))
        if self.processes.distributed:
            self._send_flags()
        return SaveReport(step=self._train_state.step, seconds=time.perf_counter() - started, peak_rss_mb=peak)

    def finish(self) -> None:
        """Publish an async save still in flight (every rank calls it, at the end of training or a
        stop). After an error, `close` alone runs: a whole async save is then published by the next
        job's start (`CheckpointDir.sweep_temporaries`)."""
        if self.processes.distributed:
            self._agreement.receive()
        self._finish_pending()

    def close(self) -> None:
        """Release the run directory (no collectives: safe after an error)."""
        self.lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _refuse_non_finite(self) -> None:
        """A finite loss can still leave non-finite weights behind (the update after it diverged):
        such weights must never replace the last good checkpoint. Each rank checks its own shards."""
        parts = self._sharded_parts()
        finite = torch.stack(
            [torch.stack([torch.isfinite(t).all() for t in part.local_tensors()]).all() for part in parts.values()]
        ).to(torch.int32)
        if self.processes.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        bad = [name for name, ok in zip(parts, finite.tolist(), strict=True) if not ok]
        if bad:
            raise NonFiniteWeights(
                f"the {', '.join(bad)} became non-finite by step {self._train_state.step}; the run stopped and the "
                "last checkpoint before it is kept. Lower optimizer.lr or set trainer.clip_grad"
            )

    def _meta(self) -> dict[str, Any]:
        """What a checkpoint says about itself, for the run's resume and for readers (eval.py)."""
        return {
            "step": self._train_state.step,
            "epoch": self._train_state.epoch,
            "config": self.config,
            # In a sharded checkpoint this goes to meta.pt, which reading the directory (and so
            # `consolidate`) merges into the one dict: the names survive every layout.
            **({"class_names": self.class_names} if self.class_names is not None else {}),
        }

    def _small_states(self) -> dict[str, Any]:
        """The small parts' state dicts (collectives: every rank's RNG state is gathered)."""
        return {name: part.state_dict() for name, part in self._parts.items() if not isinstance(part, ShardedState)}

    def _save(self, best: list[str]) -> None:
        step = self._train_state.step
        self._save_sharded(step, best) if self.format == "dcp" else self._save_full(step, best)

    def _save_full(self, step: int, best: list[str]) -> None:
        # Collectives (gathers under FSDP): every rank takes part, in the parts' order; rank 0 receives
        # the whole tensors, keyed by parameter name (the optimizer's too).
        states = {
            name: part.full_state_dict() if isinstance(part, ShardedState) else part.state_dict()
            for name, part in self._parts.items()
        }
        outcome = None
        if self.processes.is_main:
            checkpoint = {**states, **self._meta()}
            try:
                self._publish_links(self.directory.write_full(checkpoint, step), best)
            except UserError as error:
                outcome = error
            except OSError as error:
                outcome = UserError(
                    f"could not link the checkpoint of step {step} in {self.directory.directory}: {error}"
                )
        self._shared_outcome(outcome)

    def _save_sharded(self, step: int, best: list[str]) -> None:
        state = {name: part.state_dict() for name, part in self._sharded_parts().items()}
        meta = {**self._small_states(), **self._meta(), SHARDED_PARTS: list(state)}
        temporary = self.directory.sharded_temporary(step)
        problem = None
        if self.processes.is_main:
            shutil.rmtree(temporary, ignore_errors=True)  # an earlier attempt at this step that failed
            try:  # meta.pt first: the directory is published only when everything is in it
                save_checkpoint(meta, temporary / META_FILE)
            except DiskFullError as error:
                shutil.rmtree(temporary, ignore_errors=True)
                problem = self.directory.disk_full_message(self.directory.directory / step_name(step), error.free_bytes)
        if (problem := broadcast_from_main(problem, self.processes)) is not None:
            raise UserError(problem)
        if self.async_save:
            state = staged(state)
        # On a thread, synchronous or not (background.py): a rank that hangs in the save is
        # then named within trainer.dist_timeout_minutes, not the checkpointing group's slow-work
        # timeout. That is also why async saves do not go through dcp.async_save: its executor's
        # thread, blocked on a hung rank, would hold the process's exit for as long.
        save = Background(
            self.processes,
            lambda: dcp.save(
                state,
                checkpoint_id=temporary,
                process_group=self.processes.checkpointing,
                no_dist=not self.processes.distributed,
            ),
            what="a checkpoint save",
        )
        self._pending = (save, temporary, step, best)
        if not self.async_save:
            self._finish_pending()

    def _finish_pending(self) -> None:
        """Wait for the save in flight and publish it. A rank named meanwhile (RankUnresponsive)
        leaves its temporary directory for the next start's sweep: it was never completed."""
        if self._pending is None:
            return
        save, temporary, step, best = self._pending
        self._pending = None
        try:
            save.wait()
        except CheckpointException as error:
            self._shared_outcome(self._failed_sharded(error, step) if self.processes.is_main else None)
        self._publish_sharded(temporary, step, best)

    def _publish_sharded(self, temporary: Path, step: int, best: list[str]) -> None:
        outcome = None
        if self.processes.is_main:
            try:
                self._publish_links(self.directory.publish_sharded(temporary, step), best)
            except OSError as error:
                outcome = UserError(f"could not publish the checkpoint {temporary}: {error}")
        self._shared_outcome(outcome)

    def _failed_sharded(self, error: CheckpointException, step: int) -> UserError:
        """Rank 0: remove the partial directory; the message for every rank."""
        shutil.rmtree(self.directory.sharded_temporary(step), ignore_errors=True)
        final = self.directory.directory / step_name(step)
        for failure, _trace in error.failures.values():
            if out_of_space(failure) is not None:
                free = shutil.disk_usage(self.directory.directory).free
                return UserError(self.directory.disk_full_message(final, free))
        rank, (failure, _trace) = next(iter(error.failures.items()))
        return UserError(f"writing the checkpoint {final} failed on rank {rank}: {failure}")

    def _publish_links(self, entry: Entry, best: list[str]) -> None:
        self.directory.link("last", entry)
        for name in best:
            self.directory.link(name, entry)
        self.directory.prune()

    def _shared_outcome(self, outcome: UserError | None) -> None:
        """Rank 0's outcome (None: written, or the error) on every rank: all stop together."""
        shared = broadcast_from_main(None if outcome is None else str(outcome), self.processes)
        if outcome is not None:
            raise outcome
        if shared is not None:
            raise UserError(shared)


def consolidate(source: Path, target: Path) -> None:
    """A sharded checkpoint directory -> one full checkpoint file (what eval.py, fine-tuning and the
    release formats read; a run resumes from either), in one process."""
    save_checkpoint(read_checkpoint(source), target)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
