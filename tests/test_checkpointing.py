"""The Checkpointer's parts on their own: the run directory's lock (a real record lock, real processes), the
recipe check, the checkpoints directory (links, retention, temporaries, unreadable entries), a
sharded checkpoint read safely, and the agreement between ranks (real gloo processes)."""

from __future__ import annotations

import collections
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from convnext_train.checkpointing.layout import CheckpointDir
from convnext_train.checkpointing.lock import RunDirectoryInUse, RunLock
from convnext_train.checkpointing.recipe import RecipeChanged, check_recipe, recipe_changes
from convnext_train.errors import UserError
from convnext_train.weights import CheckpointError, read_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------
HOLD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from convnext_train.checkpointing.lock import RunLock
RunLock({run_dir!r}).acquire()
worker = os.fork()  # as a data-loader worker is: it outlives a SIGKILLed parent until it notices
if worker == 0:
    time.sleep(600)
    os._exit(0)
print("held", worker, flush=True)
time.sleep(600)
"""


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_holder_leaves_no_lock(tmp_path):
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO), run_dir=str(tmp_path))],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = None
    try:
        held, worker = holder.stdout.readline().split()
        assert held == "held"
        with pytest.raises(RunDirectoryInUse) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on {os.uname().nodename}, SLURM job 4242" in message
        assert "scancel 4242" in message and "hydra.run.dir" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the lock with the process: no stale lock to clean up by hand, and the worker
    # it forked, still alive, does not hold it either (a run restarted at once is not refused).
    try:
        assert Path(f"/proc/{worker}").exists()
        lock = RunLock(tmp_path)
        lock.acquire()
        holder_file = json.loads((tmp_path / "run.lock").read_text())
        assert holder_file["pid"] == os.getpid()
        lock.release()
    finally:
        if worker is not None:
            os.kill(int(worker), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# The recipe check
# --------------------------------------------------------------------------------------------------
SAVED = {
    "optimizer": {"lr": 0.004, "weight_decay": 0.05},
    "trainer": {"epochs": 300, "log_every": 50},
    "data": {"root": "/a", "img_size": 224},
    "logger": {"name": "none", "project": "x"},
    "aug": {"scale": [0.08, 1.0]},
}
IGNORED = ["data.root", "trainer.log_every", "logger"]


def changed(**edits) -> dict:
    config = {group: dict(values) for group, values in SAVED.items()}
    for key, value in edits.items():
        group, name = key.split("__")
        config[group][name] = value
    return config


def test_where_data_lives_and_how_chatty_the_run_is_are_not_the_recipe():
    now = changed(data__root="/b", trainer__log_every=1, logger__project="y", logger__name="wandb")
    now["optimizer"]["weight_decay"] = 5e-2  # the same value written another way
    assert recipe_changes(SAVED, now, IGNORED) == {}


def test_a_changed_recipe_is_refused_one_line_per_key_and_allowed_on_purpose():
    now = changed(optimizer__lr=0.002, trainer__epochs=100, aug__scale=[0.5, 1.0])
    now["optimizer"]["betas"] = [0.9, 0.95]
    with pytest.raises(RecipeChanged) as refused:
        check_recipe(SAVED, now, ignored=IGNORED, allowed=[], where="the checkpoint x (step 6)")
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("the checkpoint x (step 6) was trained with another recipe")
    assert lines[1:5] == [
        "  aug.scale: checkpoint [0.08, 1.0], now [0.5, 1.0]",
        "  optimizer.betas: checkpoint (not set), now [0.9, 0.95]",
        "  optimizer.lr: checkpoint 0.004, now 0.002",
        "  trainer.epochs: checkpoint 300, now 100",
    ]
    assert "checkpoint.allow_changes=[aug.scale,optimizer.betas,optimizer.lr,trainer.epochs]" in lines[5]
    allowed = ["aug", "optimizer.betas", "optimizer.lr", "trainer.epochs"]  # a group covers its keys
    changes = check_recipe(SAVED, now, ignored=IGNORED, allowed=allowed, where="x")
    assert changes["optimizer.lr"] == (0.004, 0.002) and len(changes) == 4
    with pytest.raises(RecipeChanged, match="trainer.epochs"):
        check_recipe(SAVED, now, ignored=IGNORED, allowed=["aug", "optimizer"], where="x")


def test_allow_changes_naming_no_key_is_refused():
    with pytest.raises(UserError, match="checkpoint.allow_changes names optimizer.lrr"):
        check_recipe(SAVED, SAVED, ignored=IGNORED, allowed=["optimizer.lrr"], where="x")


# --------------------------------------------------------------------------------------------------
# The checkpoints directory
# --------------------------------------------------------------------------------------------------
def small(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}}


def test_retention_keeps_the_newest_and_what_best_points_to(tmp_path):
    directory = CheckpointDir(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        entry = directory.write_full(small(step), step)
        directory.link("last", entry)
        if step == 1:
            directory.link("best", entry)
        directory.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "last.pt",
        "step_000000002.pt",
        "step_000000003.pt",
    ]
    assert read_checkpoint(tmp_path / "best.pt")["step"] == 1  # a hard link outlives its step file
    # Sharded entries: directories, linked by symbolic links; best's directory is kept.
    for step in (4, 5, 6):
        path = tmp_path / f".step_{step:09d}.tmp"
        path.mkdir()
        save_checkpoint(small(step), path / "meta.pt")
        entry = directory.publish_sharded(path, step)
        directory.link("last", entry)
        if step == 4:
            directory.link("best", entry)
        directory.prune()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "last", "step_000000004", "step_000000005", "step_000000006"]
    assert os.readlink(tmp_path / "last") == "step_000000006" and os.readlink(tmp_path / "best") == "step_000000004"


def test_temporaries_of_a_killed_job_are_swept_and_a_whole_unpublished_save_is_published(tmp_path):
    directory = CheckpointDir(tmp_path, keep_last=2)
    directory.write_full(small(1), 1)
    (tmp_path / ".step_000000002.pt.0123abcd.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".step_000000003.tmp").mkdir()
    (tmp_path / ".step_000000003.tmp" / "__0_0.distcp").write_bytes(b"a shard")  # no .metadata yet
    (tmp_path / ".last.tmp").symlink_to("step_000000003")
    # An async save that finished writing, the job dying before it renamed the directory into place.
    whole = tmp_path / ".step_000000004.tmp"
    dcp.save({"model": {"w": torch.ones(3)}}, checkpoint_id=whole, no_dist=True)
    save_checkpoint(small(4), whole / "meta.pt")
    removed, published = directory.sweep_temporaries()
    assert removed == 3 and [entry.name for entry in published] == ["step_000000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000001.pt", "step_000000004"]
    assert read_checkpoint(tmp_path / "step_000000004")["model"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_saving_a_sharded_step_again_replaces_it_whole(tmp_path):
    directory = CheckpointDir(tmp_path, keep_last=2)
    for value in (1, 2):
        temporary = directory.sharded_temporary(6)
        dcp.save({"model": {"w": torch.full((3,), float(value))}}, checkpoint_id=temporary, no_dist=True)
        save_checkpoint(small(6), temporary / "meta.pt")
        directory.link("last", directory.publish_sharded(temporary, 6))
    assert read_checkpoint(tmp_path / "last")["model"]["w"].tolist() == [2.0, 2.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "step_000000006"]


def test_an_orphaned_last_pt_takes_its_place_by_its_step(tmp_path):
    directory = CheckpointDir(tmp_path, keep_last=5)
    for step in (100, 200):
        directory.link("last", directory.write_full(small(step), step))
    (tmp_path / "step_000000200.pt").unlink()  # removed by hand; last.pt is the only copy of step 200
    directory.write_full(small(150), 150)
    assert directory.latest()[1]["step"] == 200


def test_when_every_checkpoint_is_unreadable_resuming_stops_instead_of_starting_over(tmp_path):
    directory = CheckpointDir(tmp_path, keep_last=5)
    for step in (1, 2):
        path = directory.write_full(small(step), step).path
        path.write_bytes(path.read_bytes()[:64])
    broken = tmp_path / "step_000000003"  # a sharded directory without its metadata
    broken.mkdir()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as refused:
        directory.latest()
    message = str(refused.value)
    assert "every checkpoint in" in message and "move the directory away" in message
    assert all(f"step_00000000{step}" in message for step in (1, 2, 3))
    assert CheckpointDir(tmp_path / "empty", keep_last=1).latest() is None


# --------------------------------------------------------------------------------------------------
# A sharded checkpoint from an untrusted source
# --------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_calling(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle of `module.name(argument)`, the dotted name written as it stands."""

    def text(value: str) -> bytes:
        data = value.encode()
        return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE

    return (
        b"\x80\x04" + text(module) + text(name) + b"\x93" + text(argument) + b"\x85R."
    )  # STACK_GLOBAL, TUPLE1, REDUCE


def test_a_hostile_sharded_checkpoint_is_refused_without_running_it(tmp_path):
    checkpoint = tmp_path / "step_000000001"
    dcp.save({"model": {"w": torch.ones(3)}}, checkpoint_id=checkpoint, no_dist=True)
    assert read_checkpoint(checkpoint)["model"]["w"].tolist() == [1.0, 1.0, 1.0]  # a genuine one reads
    marker = tmp_path / "payload-ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))  # DCP would pickle.load it
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(pathlib.*Path.touch\).*trust_checkpoint"):
        read_checkpoint(checkpoint)
    assert not marker.exists()
    # A permitted module followed to a function of another one: `metadata.os.system`, then called.
    dotted = pickle_calling("torch.distributed.checkpoint.metadata", "os.system", f"touch {marker}")
    (checkpoint / ".metadata").write_bytes(dotted)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(torch.distributed.checkpoint.metadata.os"):
        read_checkpoint(checkpoint)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Agreement between ranks, and waiting for rank 0's slow work (real gloo processes)
# --------------------------------------------------------------------------------------------------
def _agreement_worker(rank: int, port: int, out: str) -> None:
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from convnext_train.distributed import Agreement, init_processes, main_process_first

    # Collectives of the loop time out after 3 s; rank 0's slow work (8 s) must not trip that.
    processes = init_processes("cpu", timeout_minutes=0.05, slow_work_timeout_minutes=1)
    with main_process_first(processes):
        if rank == 0:
            time.sleep(8)
    agreement = Agreement(processes, size=2)
    seen = []
    for step in range(6):
        flags = agreement.receive()
        seen.append(flags)
        agreement.send([rank == 1 and step == 2, rank == 0 and step == 4])  # raised by one rank each
    seen.append(agreement.settle([False, False]))
    Path(out, f"rank{rank}.txt").write_text(repr(seen))
    assert processes.timeout == timedelta(minutes=0.05)


@pytest.mark.slow
def test_every_rank_acts_on_any_ranks_flag_at_the_same_step_and_waits_out_slow_work(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_agreement_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    seen = [eval((tmp_path / f"rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1]
    false, stop, save = [False, False], [True, False], [False, True]
    # Raised at step 2 (rank 1) and 4 (rank 0): every rank sees each one step later.
    assert seen[0] == [false, false, false, stop, false, save, false]


def _hung_peer_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from convnext_train.distributed import (
        RankUnresponsive,
        broadcast_from_main,
        gather_objects,
        init_processes,
    )

    # Loop collectives time out after 3 s, waits for rank 0's slow work after a minute.
    processes = init_processes("cpu", timeout_minutes=0.05, slow_work_timeout_minutes=1)
    if rank == 1:  # hangs (a stuck read, a GPU hang) where rank 0 saves a checkpoint, until rank 0 is done
        deadline = time.monotonic() + 60
        while not Path(out, "rank0.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        os._exit(0)
    lines = []
    for name, call in [
        ("gather", lambda: gather_objects("rng", processes)),  # every rank's RNG state, before the write
        # The outcome, after it; the same group as wait_for_main's barrier, which a failed
        # collective leaves unusable ("pair closure"): one call per group.
        ("broadcast", lambda: broadcast_from_main("written", processes)),
    ]:
        started = time.monotonic()
        try:
            call()
            lines.append(f"{name}: returned")
        except RankUnresponsive as error:
            lines.append(f"{name}: {time.monotonic() - started:.1f} s: {error}")
    Path(out, "rank0.txt").write_text("\n".join(lines))
    os._exit(0)  # the groups saw a timeout: tearing them down would wait on the hung rank


@pytest.mark.slow
def test_a_rank_that_hangs_while_rank_0_saves_is_named_within_the_loop_timeout(tmp_path):
    """Rank 0 arrives last at the waits around its slow work (the others are there already), so it
    waits with the loop's short timeout: a peer that hung meanwhile is named in seconds, not after
    trainer.slow_work_timeout_minutes (the CI failure this guards: an hour's wait at a save)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_hung_peer_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    lines = (tmp_path / "rank0.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["gather", "broadcast"], lines
    for line in lines:
        waited = float(line.split(":")[1].split()[0])  # 3 s timeout + up to 3 s for the others to check in
        assert waited < 20, line
        assert "rank 1 (pid " in line and "stopped responding" in line, line
        assert "trainer.dist_timeout_minutes" in line, line


# --------------------------------------------------------------------------------------------------
# A rank that hangs inside a sharded save (real gloo processes, a real SIGSTOP)
# --------------------------------------------------------------------------------------------------
class _WrittenBy:
    """A value of rank 1's shard whose writing (DCP pickles it inside the save, on the thread that
    writes) takes a while ("slow": 8 s, longer than the 3 s loop timeout) or stops the whole process
    a second into it ("hung": SIGSTOP, what a frozen or deadlocked process looks like to its peers)."""

    def __init__(self, fault: str):
        self.fault = fault

    def __reduce__(self):
        if self.fault == "slow":
            time.sleep(8)
        else:
            time.sleep(1)
            os.kill(os.getpid(), signal.SIGSTOP)
        return (collections.OrderedDict, ())  # what a weights-only read allows

    def __deepcopy__(self, memo):  # an async save stages a copy first: the copy writes the same way
        return self


class _Shards:
    """Each rank's own tensor (as FSDP shards would be), and on rank 1 the value above."""

    def __init__(self, rank: int, fault: str):
        self.weight = torch.full((4,), float(rank))
        self.extra = {"slow_value": _WrittenBy(fault)} if rank == 1 else {}
        self.rank = rank

    def state_dict(self) -> dict:
        return {f"w{self.rank}": self.weight, **self.extra}

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict:
        raise NotImplementedError

    def load_full_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def local_tensors(self):
        return iter([self.weight])


class _TrainState:
    step, epoch = 1, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def _sharded_save_worker(rank: int, port: int, out: str, fault: str, async_save: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from omegaconf import OmegaConf

    from convnext_train.checkpointing import Checkpointer
    from convnext_train.distributed import RankUnresponsive, init_processes, shutdown

    # The loop's collectives time out after 3 s; the checkpointing group's after 2 minutes.
    processes = init_processes("cpu", timeout_minutes=0.05, slow_work_timeout_minutes=2)
    checkpoint = {"every_minutes": 30, "keep_last": 2, "format": "dcp", "async_save": async_save, "allow_changes": []}
    cfg = OmegaConf.create({"checkpoint": checkpoint, "trainer": {"strategy": "fsdp", "seed": 0}})
    started = time.monotonic()
    with Checkpointer(Path(out, "run"), cfg, processes, ignored_keys=[]) as checkpointer:
        checkpointer.track({"model": _Shards(rank, fault), "train_state": _TrainState()})
        try:
            checkpointer.save()
            checkpointer.finish()  # an async save is waited for here
            outcome = "saved"
        except RankUnresponsive as error:
            outcome = str(error)
        except BaseException as error:  # noqa: BLE001 - DCP's CheckpointException: for the test's message
            outcome = f"{type(error).__name__}: {error}"
    Path(out, f"rank{rank}.txt").write_text(f"{time.monotonic() - started:.1f}\n{outcome}")
    shutdown()  # then the interpreter's own exit, as train.py's after its one line


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "async_save"), [("hung", False), ("hung", True), ("slow", False)])
def test_a_rank_that_hangs_inside_a_sharded_save_is_named_within_the_loop_timeout(fault, async_save, tmp_path):
    """Inside a DCP save every rank waits for every other's writes, with the slow-work timeout (a
    healthy rank may write slowly). A rank whose process stops there must still be named within
    trainer.dist_timeout_minutes, and the healthy rank must then really exit; a rank that is only
    slow must be waited for. (Without the heartbeats rank 0 waited the whole 2 minutes here, then
    failed with gloo's bare "Timed out waiting 120000ms", naming no one.)"""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(
        _sharded_save_worker,
        args=(port, str(tmp_path), fault, async_save),
        nprocs=2,
        start_method="spawn",
        join=False,
    )
    rank0, rank1 = context.processes
    report = tmp_path / "rank0.txt"
    try:
        deadline = time.monotonic() + 150  # longer than the 2 minutes an unnamed hang would wait
        while not report.exists() and rank0.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        reported = time.monotonic()
        assert report.exists(), "rank 0 neither finished the save nor named rank 1"
        rank0.join(timeout=30)
        exited = time.monotonic() - reported
        seconds, message = report.read_text().split("\n", 1)
        checkpoints = tmp_path / "run" / "checkpoints"
        if fault == "slow":
            rank1.join(timeout=30)
            assert message == "saved" and (tmp_path / "rank1.txt").read_text().endswith("saved")
            assert float(seconds) > 8 and rank0.exitcode == 0 and rank1.exitcode == 0
            saved = read_checkpoint(checkpoints / "last")
            assert saved["step"] == 1 and saved["model"]["w1"].tolist() == [1.0] * 4
            return
        # 1 s of writing, a 3 s timeout, a poll; not the checkpointing group's 2 minutes.
        assert float(seconds) < 20, (seconds, message)
        assert f"rank 1 (pid {rank1.pid} on " in message and "stopped responding" in message, message
        assert "trainer.dist_timeout_minutes" in message and "resumes from it" in message, message
        assert "\n" not in message, message
        # The healthy process ends within seconds (as long as a healthy exit: 3-5 s on two busy
        # cores): no thread, atexit handler or teardown waits on the frozen rank.
        assert rank0.exitcode == 0 and exited < 20, (rank0.exitcode, exited)
        # The partial directory stays for the next start's sweep; nothing was published.
        assert (checkpoints / ".step_000000001.tmp").is_dir()
        assert not (checkpoints / "step_000000001").exists() and not (checkpoints / "last").exists()
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()
