"""Several processes: real torchrun, real torch.distributed (gloo on the CPU), the real train.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_imagefolder
from test_train import load, read_jsonl, relative_difference, tiny_run

pytestmark = pytest.mark.slow

# Deterministic data and no per-rank randomness, so any two world sizes must train alike:
# 64 images, 4 steps of 16 per epoch, 12 steps in all.
REWIND_STEP = 6  # mid-epoch 2: where the resume tests pick a run up
EXACT = [
    "aug=none",
    "model.drop_path_rate=0",
    "trainer.epochs=3",
    "trainer.keep_last=100",
    "trainer.checkpoint_every_minutes=0.0001",
]


def train(data: Path, run_dir: Path, processes: int, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    args = tiny_run(data, run_dir, *EXACT, *extra)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def keep_read_checkpoints(run_dir: Path) -> Path:
    """Delete the step checkpoints no test reads (all but steps 1, 6 and 12): three runs of this
    module stay on disk while its tests run, 54 MB a checkpoint."""
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        if int(path.stem.split("_")[1]) not in (1, REWIND_STEP, 12):
            path.unlink()
    return run_dir


@pytest.fixture(scope="module")
def data(module_tmp_path):
    # 15 validation images: 2 processes score 8 and 7, and every image must count once.
    return make_imagefolder(module_tmp_path / "data", val_per_class=5, classes=3, train_per_class=22)


@pytest.fixture(scope="module")
def one_process(data, module_tmp_path):
    run_dir = module_tmp_path / "one"
    train(data, run_dir, 1, "data.num_classes=3")
    return keep_read_checkpoints(run_dir)


@pytest.fixture(scope="module")
def two_processes(data, module_tmp_path):
    run_dir = module_tmp_path / "two"
    result = train(data, run_dir, 2, "data.num_classes=3")
    assert "(2 process(es))" in result.stdout
    return keep_read_checkpoints(run_dir)


@pytest.fixture(scope="module")
def fsdp(data, module_tmp_path):
    """FSDP2 on 2 processes with micro-batches of 1: 8 micro-batches of accumulation per step (the
    gradient reduce-scatter on the last only), and 8 and 7 validation batches on the two ranks, so
    the rank with fewer runs one forward without images (FSDP forwards are collective)."""
    run_dir = module_tmp_path / "fsdp"
    result = train(data, run_dir, 2, "data.num_classes=3", "trainer.strategy=fsdp", "trainer.micro_batch_size=1")
    assert "(2 process(es))" in result.stdout
    return keep_read_checkpoints(run_dir)


def test_two_processes_train_like_one_with_the_same_global_batch(one_process, two_processes):
    a, b = load(one_process / "checkpoints" / "last.pt"), load(two_processes / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12
    assert relative_difference(a["model"], b["model"]) < 1e-5
    assert relative_difference(a["model_ema"], b["model_ema"]) < 1e-5
    assert relative_difference(a["model"], load(one_process / "checkpoints" / "step_000000001.pt")["model"]) > 1e-3


def test_fsdp_on_two_processes_trains_like_one_process(one_process, fsdp):
    a, b = load(one_process / "checkpoints" / "last.pt"), load(fsdp / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()  # whole tensors, the plain model's names
    assert relative_difference(a["model"], b["model"]) < 1e-5
    assert relative_difference(a["model_ema"], b["model_ema"]) < 1e-5
    for name in a["optimizer"]["state"]:  # AdamW's moments, gathered from the shards, by name
        assert relative_difference(a["optimizer"]["state"][name], b["optimizer"]["state"][name]) < 1e-4
    single, sharded = ([r for r in read_jsonl(d / "metrics.jsonl") if "top1" in r] for d in (one_process, fsdp))
    for x, y in zip(single, sharded, strict=True):
        for key in ("top1", "top5", "top1_ema", "top5_ema"):
            assert y[key] == pytest.approx(x[key]), key
        assert y["val_loss_ema"] == pytest.approx(x["val_loss_ema"], rel=1e-4)
        assert y["val_images"] == 15


def test_sharded_evaluation_counts_every_image_once(one_process, two_processes):
    evaluations = [[r for r in read_jsonl(d / "metrics.jsonl") if "top1" in r] for d in (one_process, two_processes)]
    assert len(evaluations[0]) == len(evaluations[1]) == 3
    for single, sharded in zip(*evaluations, strict=True):
        assert sharded["top1"] == pytest.approx(single["top1"]) and sharded["top5"] == pytest.approx(single["top5"])
        assert sharded["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
        assert sharded["val_images"] == single["val_images"] == 15  # 8 + 7: none twice, none dropped


def rewind(source: Path, target: Path, step: int) -> Path:
    """A copy of a finished run as a preempted job would have left it after `step`. Its checkpoints
    are hard links to the source's (no disk space): the trainer replaces files, never rewrites one."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints"))
    checkpoints = target / "checkpoints"
    checkpoints.mkdir()
    for path in (source / "checkpoints").glob("step_*.pt"):
        if int(path.stem.split("_")[1]) <= step:
            os.link(path, checkpoints / path.name)
    os.link(checkpoints / f"step_{step:09d}.pt", checkpoints / "last.pt")
    return target


@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_saved_by_two_processes_resumes_on_one_or_two(two_processes, data, tmp_path, processes):
    run_dir = rewind(two_processes, tmp_path / "run", step=REWIND_STEP)
    result = train(data, run_dir, processes, "data.num_classes=3")
    assert "resumed from" in result.stdout and "epoch 1, step 6" in result.stdout
    final, reference = load(run_dir / "checkpoints" / "last.pt"), load(two_processes / "checkpoints" / "last.pt")
    assert final["step"] == 12
    assert relative_difference(final["model"], reference["model"]) < 1e-5


@pytest.mark.parametrize(
    "saved_by, resumed_with",
    [
        ("fsdp", []),
        ("fsdp", ["trainer.strategy=fsdp"]),
        ("fsdp", ["trainer.strategy=ddp"]),
        ("ddp", ["trainer.strategy=fsdp"]),
    ],
    ids=["fsdp-2-to-1", "fsdp-2-to-fsdp-2", "fsdp-2-to-ddp-2", "ddp-2-to-fsdp-2"],
)
def test_a_run_resumes_across_strategies_and_world_sizes(saved_by, resumed_with, request, data, tmp_path):
    source = request.getfixturevalue({"fsdp": "fsdp", "ddp": "two_processes"}[saved_by])
    run_dir = rewind(source, tmp_path / "run", step=REWIND_STEP)
    processes = 2 if resumed_with else 1
    result = train(data, run_dir, processes, "data.num_classes=3", *resumed_with)
    assert "resumed from" in result.stdout and "epoch 1, step 6" in result.stdout
    final, reference = load(run_dir / "checkpoints" / "last.pt"), load(source / "checkpoints" / "last.pt")
    assert final["step"] == 12
    assert relative_difference(final["model"], reference["model"]) < 1e-5
    assert relative_difference(final["model_ema"], reference["model_ema"]) < 1e-5


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes, read from /proc."""
    workers = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration, ValueError):
            continue
        if parent == launcher_pid:
            rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                workers[rank] = int(proc.name)
    return workers


def test_a_dead_rank_takes_the_job_down_and_the_last_checkpoint_stays_valid(data, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_run(data, run_dir, *EXACT, "data.num_classes=3", "trainer.epochs=50")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "train.py"),
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step_000000003.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before a rank could be killed"
        time.sleep(0.1)
    os.kill(worker_pids(launcher.pid)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 120
    assert "rank     : 1" in output or "rank: 1" in output, output[-3000:]
    checkpoint = load(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["step"] >= 3 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())
