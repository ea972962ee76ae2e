"""Resuming a run, end to end with the real train.py: killed at any moment, stopped by a signal,
out of disk, two jobs in one directory, a changed recipe. Each ends as the uninterrupted run does,
bitwise, or stops with one clear message before anything is lost."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_model, run_script
from forked import script_env, start_script
from test_train import (
    assert_same_tensors,
    assert_user_error,
    load,
    official_cosine_scheduler,
    read_jsonl,
    tiny_run,
)

EVERY_STEP = "checkpoint.every_minutes=0.0001"


@pytest.fixture(scope="module")
def reference(tiny_imagefolder, module_tmp_path) -> Path:
    """The uninterrupted run: 2 epochs of 4 steps, every step logged and saved."""
    run_dir = module_tmp_path / "reference"
    result = run_script("train.py", *tiny_run(tiny_imagefolder, run_dir, EVERY_STEP))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    """A copy whose checkpoints are hard links (the trainer replaces files, never rewrites one)."""
    shutil.copytree(source, target, copy_function=os.link, ignore=shutil.ignore_patterns("run.lock"))
    return target


def launch(args: list[str], *, fresh: bool = False):
    """train.py in the background: forked from the tests' fork server (tests/forked.py), or with
    `fresh` a new interpreter (for what happens during its imports; its stdout can be read live)."""
    if not fresh:
        return start_script("train.py", *args)
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def running(args: list[str], *, fresh: bool = False):
    """train.py in the background, killed if the test leaves it running."""
    process = launch(args, fresh=fresh)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def terminate(process: subprocess.Popen) -> tuple[str, str, float]:
    """SIGTERM, as SLURM sends on preemption: (stdout, stderr, seconds until the process was gone)."""
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stdout, stderr = process.communicate(timeout=120)
    return stdout, stderr, time.monotonic() - signalled


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended before {path.name} appeared"
        time.sleep(0.05)


def kill_once_saved(args: list[str], checkpoint: Path) -> None:
    """train.py killed with SIGKILL (no handler runs) as soon as `checkpoint` appears."""
    process = launch(args)
    wait_for(checkpoint, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()


def assert_ends_like(reference: Path, run_dir: Path) -> None:
    expected, final = load(reference / "checkpoints" / "last.pt"), load(run_dir / "checkpoints" / "last.pt")
    for key in ("model", "model_ema", "optimizer", "scaler", "step", "epoch"):
        assert_same_tensors(expected[key], final[key], key)
    # metrics.jsonl has each step once, as if the run had never stopped.
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


def records(run_dir: Path) -> dict[str, tuple[int, int]]:
    """What a run has written that must not change under it: (inode, size) of each file."""
    paths = [*(run_dir / "checkpoints").iterdir(), run_dir / "metrics.jsonl"]
    return {p.name: (p.lstat().st_ino, p.lstat().st_size) for p in paths if p.exists()}


def contents(run_dir: Path) -> dict[str, str]:
    """Every entry under a run directory, Hydra's `.hydra/` and any log included: a file's SHA-256, a
    link's target, a folder as such (the bytes, not the times: a refused job must change nothing)."""
    found = {}
    for folder, folders, files in os.walk(run_dir):
        for name in folders + files:
            path = Path(folder) / name
            key = str(path.relative_to(run_dir))
            if path.is_symlink():
                found[key] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "folder"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# --------------------------------------------------------------------------------------------------
# Killed, stopped, started twice
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_and_resumed_run_ends_bitwise_equal(reference, tiny_imagefolder, tmp_path):
    run_dir = tmp_path / "killed"
    # One worker process here, none in the reference: the data must not depend on it either.
    args = tiny_run(tiny_imagefolder, run_dir, EVERY_STEP, "data.num_workers=1")
    kill_once_saved(args, run_dir / "checkpoints" / "step_000000006.pt")  # mid-epoch 2
    # The newest checkpoint is damaged too (a disk filled up, say): resume must fall back a step.
    newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # What a kill in the middle of a save leaves: a temporary file, a sharded directory half written.
    (run_dir / "checkpoints" / f".{newest.name}.5f1c9e07.tmp").write_bytes(b"half a checkpoint")
    (run_dir / "checkpoints" / ".step_000000007.tmp").mkdir()

    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping unreadable checkpoint" in result.stderr
    # Ours and any the kill itself left mid-write.
    removed = re.search(r"removed (\d+) temporary file\(s\) a killed job left", result.stdout)
    assert removed and int(removed.group(1)) >= 2 and "resumed from" in result.stdout, result.stdout[-2000:]
    assert not list((run_dir / "checkpoints").glob(".*"))
    assert_ends_like(reference, run_dir)


@pytest.mark.slow
def test_a_second_job_is_refused_and_sigterm_saves_at_the_next_step_then_the_rerun_ends_bitwise_equal(
    reference, tiny_imagefolder, tmp_path
):
    run_dir = tmp_path / "stopped"
    # log_every=1000: the stop request must not wait for a log step.
    args = tiny_run(tiny_imagefolder, run_dir, EVERY_STEP, "trainer.log_every=1000")
    with running(args) as first:
        wait_for(run_dir / "checkpoints" / "step_000000002.pt", first)
        # The first job stands still (it keeps its lock): a second one in its directory must stop at
        # once, naming it, and touch nothing of it.
        first.send_signal(signal.SIGSTOP)
        before, everything = records(run_dir), contents(run_dir)
        assert ".hydra/overrides.yaml" in everything  # the first job's record of its command
        started = time.monotonic()
        # Another value of a key the directory's name leaves out: the same directory, another command,
        # which must not replace the first job's .hydra/ copy of its own.
        second = run_script("train.py", *args, "trainer.log_every=7")
        assert_user_error(second, "is in use by another run", f"pid {first.pid} on ", "hydra.run.dir")
        assert time.monotonic() - started < 60
        assert records(run_dir) == before
        after = contents(run_dir)
        changed = sorted(key for key in everything.keys() | after.keys() if everything.get(key) != after.get(key))
        assert not changed, f"the refused job changed {changed}"
        first.send_signal(signal.SIGCONT)

        wait_for(run_dir / "checkpoints" / "step_000000005.pt", first)
        stdout, stderr, exit_seconds = terminate(first)
    assert first.returncode == 0, stderr[-3000:]
    assert "stopping after SIGTERM: checkpoint saved at step" in stdout
    stopped_at = load(run_dir / "checkpoints" / "last.pt")["step"]
    assert 5 <= stopped_at < 8  # saved mid-epoch: at the next step, not at the epoch's end
    assert exit_seconds < 15, exit_seconds  # a step, a 54 MB checkpoint, the exit

    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at epoch 1, step {stopped_at}" in result.stdout
    expected, final = load(reference / "checkpoints" / "last.pt"), load(run_dir / "checkpoints" / "last.pt")
    for key in ("model", "model_ema", "optimizer", "scaler", "step", "epoch"):
        assert_same_tensors(expected[key], final[key], key)


def test_a_stop_signal_during_start_up_stops_cleanly_before_the_first_step(tiny_imagefolder, tmp_path):
    run_dir = tmp_path / "run"
    with running(tiny_run(tiny_imagefolder, run_dir), fresh=True) as process:
        time.sleep(1.0)  # importing torch and Hydra, not yet training
        stdout, stderr, _ = terminate(process)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopping after SIGTERM: no step trained since step 0, nothing to save" in stdout
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_convnext_t_saves_and_exits_within_seconds_of_sigterm(tiny_imagefolder, tmp_path):
    """The ConvNeXt-T of the paper (28.6M parameters, a 460 MB checkpoint) on this CPU: SLURM's
    KillWait gives 30 s between SIGTERM and SIGKILL."""
    run_dir = tmp_path / "run"
    args = tiny_run(tiny_imagefolder, run_dir, "model=convnext_t", "trainer.epochs=100", "trainer.log_every=1000")
    with running(args, fresh=True) as process:
        deadline = time.monotonic() + 300
        while "run directory:" not in process.stdout.readline():
            assert process.poll() is None and time.monotonic() < deadline
        time.sleep(3)  # a few steps in
        stdout, stderr, exit_seconds = terminate(process)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopping after SIGTERM: checkpoint saved at step" in stdout
    saved = load(run_dir / "checkpoints" / "last.pt")
    assert saved["step"] >= 1 and "stages.2.8.dwconv.weight" in saved["model"]
    (row,) = [
        r for r in read_jsonl(run_dir / "metrics.jsonl") if "checkpoint_seconds" in r and r["step"] == saved["step"]
    ]
    print(f"ConvNeXt-T: SIGTERM to exit {exit_seconds:.1f} s, of which saving {row['checkpoint_seconds']:.1f} s")
    assert exit_seconds < 20, exit_seconds  # well inside SLURM's 30 s


# --------------------------------------------------------------------------------------------------
# A changed recipe
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_resume_that_changes_the_recipe_is_refused_naming_each_key_then_allowed_on_purpose(
    reference, tiny_imagefolder, tmp_path
):
    run_dir = copy_run(reference, tmp_path / "run")
    before = records(run_dir)
    refused = run_script("train.py", *tiny_run(tiny_imagefolder, run_dir, "optimizer.lr=0.002", "trainer.epochs=3"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()[-4:]
    assert lines[0].startswith(f"error: the checkpoint {run_dir / 'checkpoints' / 'step_000000008.pt'} (step 8)")
    assert lines[1:3] == ["  optimizer.lr: checkpoint 0.004, now 0.002", "  trainer.epochs: checkpoint 2, now 3"]
    assert "checkpoint.allow_changes=[optimizer.lr,trainer.epochs]" in lines[3]
    assert records(run_dir) == before  # refused before anything was written

    # Three epochs instead of two, on purpose: the run goes on at step 8 on the new schedule.
    extended = tiny_run(tiny_imagefolder, run_dir, "trainer.epochs=3", "checkpoint.allow_changes=[trainer.epochs]")
    result = run_script("train.py", *extended)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed with changes allowed by checkpoint.allow_changes: trainer.epochs: 2 -> 3" in result.stdout
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert {"step": 8, "resumed_with_changes": "trainer.epochs: 2 -> 3"} in rows
    lrs = [r["lr"] for r in rows if "loss" in r]
    assert len(lrs) == 12
    assert lrs[8:] == pytest.approx(official_cosine_scheduler(4e-3, 1e-6, 3, 4, 1)[8:].tolist(), rel=1e-12)
    assert load(run_dir / "checkpoints" / "last.pt")["config"]["trainer"]["epochs"] == 3

    # Another global batch is another epoch length: the step count cannot carry over, allowed or not.
    regrouped = ["trainer.epochs=3", "trainer.global_batch_size=8", "checkpoint.allow_changes=[trainer]"]
    before = records(run_dir)
    result = run_script("train.py", *tiny_run(tiny_imagefolder, run_dir, *regrouped))
    assert_user_error(result, "counts 4 optimizer steps per epoch, this run 8", "cannot carry over")
    assert records(run_dir) == before


# --------------------------------------------------------------------------------------------------
# Out of disk
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # two runs, one in a mount namespace of its own: ~25 s
@pytest.mark.parametrize("checkpoint_format", ["full", "dcp"])
def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_resumes(tmp_path, tiny_imagefolder, checkpoint_format):
    """The run directory on a real filesystem with room for one checkpoint and a half (a tmpfs, in a
    mount namespace of the run's own): the second checkpoint cannot be written, as one file or as a
    sharded directory."""
    parameters = sum(p.numel() for p in build_model("convnext_atto", num_classes=4).parameters())
    checkpoint_bytes = 16 * parameters  # fp32 weights, EMA weights and AdamW's two moments
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    args = tiny_run(tiny_imagefolder, disk / "run", EVERY_STEP, f"checkpoint.format={checkpoint_format}")
    # Inside the namespace: mount, train, copy the run out (the tmpfs goes with the namespace).
    script = (
        f'mount -t tmpfs -o size={int(1.5 * checkpoint_bytes)} tmpfs {disk} || exit 99; "$@"; status=$?; '
        f"cp -a {disk / 'run'} {after}; exit $status"
    )
    unshare = ["unshare", "--mount", "--propagation", "private", *([] if os.geteuid() == 0 else ["--map-root-user"])]
    result = subprocess.run(
        [*unshare, "sh", "-c", script, "sh", sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 99, f"could not mount a tmpfs in a private mount namespace: {result.stderr}"
    suffix = ".pt" if checkpoint_format == "full" else ""
    first, last = f"step_000000001{suffix}", f"last{suffix}"
    assert_user_error(result, "no space left", "step_000000002", first, "is intact", "checkpoint.keep_last, now 2")
    # Nothing half-written was left behind, and the last checkpoint is whole.
    assert sorted(p.name for p in (after / "checkpoints").iterdir()) == [last, first]
    assert load(after / "checkpoints" / last)["step"] == 1
    # With space again, the same command (here, on the copy) resumes from it and finishes.
    resumed = run_script(
        "train.py", *tiny_run(tiny_imagefolder, after, EVERY_STEP, f"checkpoint.format={checkpoint_format}")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert load(after / "checkpoints" / last)["step"] == 8
    assert torch.isfinite(load(after / "checkpoints" / last)["model"]["head.weight"]).all()
