"""Several processes: real torchrun, real torch.distributed (gloo on the CPU), the real train.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_imagefolder, run_script
from test_train import assert_same_tensors, load, read_jsonl, relative_difference, tiny_run

pytestmark = pytest.mark.slow

# Deterministic data and no per-rank randomness, so any two world sizes must train alike:
# 64 images, 4 steps of 16 per epoch, 12 steps in all.
REWIND_STEP = 6  # mid-epoch 2: where the resume tests pick a run up
EXACT = [
    "aug=none",
    "model.drop_path_rate=0",
    "trainer.epochs=3",
    "checkpoint.keep_last=100",
    "checkpoint.every_minutes=0.0001",
]


def train(data: Path, run_dir: Path, processes: int, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    args = tiny_run(data, run_dir, *EXACT, *extra)
    result = subprocess.run(
        [*launcher(processes), str(REPO / "train.py"), *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


# One thread per process, as torchrun gives; and glibc's malloc hands large blocks back to the
# system when they are freed (a fixed mmap threshold), so that a process's resident memory follows
# what it holds and the checkpoint rows' peak memory measures what a save allocates.
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536",
}


def step_entry(run_dir: Path, step: int) -> Path:
    """The checkpoint of `step`: a file (full) or a directory (sharded)."""
    (entry,) = (run_dir / "checkpoints").glob(f"step_{step:09d}*")
    return entry


def keep_read_checkpoints(run_dir: Path) -> Path:
    """Delete the step checkpoints no test reads (all but steps 1, 6 and 12): several runs of this
    module stay on disk while its tests run, 54 MB a checkpoint."""
    for path in (run_dir / "checkpoints").glob("step_*"):
        if int(path.name.removesuffix(".pt").split("_")[1]) not in (1, REWIND_STEP, 12):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
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
    the rank with fewer runs one forward without images (FSDP forwards are collective). Its
    checkpoints are sharded (checkpoint.format=auto under FSDP)."""
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


def test_fsdp_writes_sharded_checkpoints_that_hold_what_one_process_trains(one_process, fsdp):
    # Each rank wrote its own shards into one directory per checkpoint, published whole.
    last = fsdp / "checkpoints" / "last"
    assert last.is_symlink() and os.readlink(last) == "step_000000012"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not (fsdp / "checkpoints" / "last.pt").exists() and not list((fsdp / "checkpoints").glob(".*"))
    a, b = load(one_process / "checkpoints" / "last.pt"), load(last)
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()  # whole tensors, the plain model's names
    assert relative_difference(a["model"], b["model"]) < 1e-5
    assert relative_difference(a["model_ema"], b["model_ema"]) < 1e-5
    for name in a["optimizer"]["state"]:  # AdamW's moments, read whole from the shards, by name
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
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "run.lock"))
    checkpoints = target / "checkpoints"
    checkpoints.mkdir()
    for path in (source / "checkpoints").glob("step_*"):
        if int(path.name.removesuffix(".pt").split("_")[1]) <= step:
            if path.is_dir():
                shutil.copytree(path, checkpoints / path.name, copy_function=os.link)
            else:
                os.link(path, checkpoints / path.name)
    entry = step_entry(target, step)
    if entry.is_dir():
        os.symlink(entry.name, checkpoints / "last")
    else:
        os.link(entry, checkpoints / "last.pt")
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
    "saved_by, resumed_with, writes",
    [
        ("fsdp", [], "step_000000012.pt"),
        ("fsdp", ["trainer.strategy=ddp", "checkpoint.format=dcp", "checkpoint.async_save=true"], "step_000000012"),
        ("ddp", ["trainer.strategy=fsdp"], "step_000000012"),
    ],
    ids=["fsdp-2-to-1", "fsdp-2-to-ddp-2-async-sharded", "full-ddp-2-to-fsdp-2"],
)
def test_a_run_resumes_across_strategies_and_world_sizes(saved_by, resumed_with, writes, request, data, tmp_path):
    source = request.getfixturevalue({"fsdp": "fsdp", "ddp": "two_processes"}[saved_by])
    run_dir = rewind(source, tmp_path / "run", step=REWIND_STEP)
    processes = 2 if resumed_with else 1
    result = train(data, run_dir, processes, "data.num_classes=3", *resumed_with)
    assert "resumed from" in result.stdout and "epoch 1, step 6" in result.stdout
    assert step_entry(run_dir, 12).name == writes  # the resumed run's own format
    final, reference = load(run_dir / "checkpoints" / "last.pt"), load(source / "checkpoints" / "last.pt")
    assert final["step"] == 12
    assert relative_difference(final["model"], reference["model"]) < 1e-5
    assert relative_difference(final["model_ema"], reference["model_ema"]) < 1e-5


@pytest.fixture(scope="module")
def fsdp_saving_full_files(fsdp, data, module_tmp_path):
    """The FSDP run picked up at step 6 under FSDP again, this time gathering full files."""
    run_dir = rewind(fsdp, module_tmp_path / "fsdp-full", step=REWIND_STEP)
    extra = ["trainer.strategy=fsdp", "trainer.micro_batch_size=1", "checkpoint.format=full"]
    result = train(data, run_dir, 2, "data.num_classes=3", *extra)
    assert "resumed from" in result.stdout and "epoch 1, step 6" in result.stdout
    return run_dir


def test_a_sharded_run_resumes_under_fsdp_into_full_files(fsdp, fsdp_saving_full_files):
    final, reference = load(fsdp_saving_full_files / "checkpoints" / "last.pt"), load(fsdp / "checkpoints" / "last")
    assert step_entry(fsdp_saving_full_files, 12).name == "step_000000012.pt"
    assert relative_difference(final["model"], reference["model"]) < 1e-5
    assert relative_difference(final["model_ema"], reference["model_ema"]) < 1e-5


def test_a_sharded_save_holds_far_less_on_rank_0_than_a_full_gather(fsdp, fsdp_saving_full_files):
    """Rank 0's resident memory above where it stood, at its peak during each save (measured by the
    trainer, metrics.jsonl): a full file gathers the whole model, EMA and AdamW state there first."""

    def peaks(run_dir: Path, after_step: int) -> list[float]:
        rows = read_jsonl(run_dir / "metrics.jsonl")
        return [r["checkpoint_peak_rss_mb"] for r in rows if "checkpoint_seconds" in r and r["step"] > after_step]

    parameters = sum(t.numel() for t in load(fsdp / "checkpoints" / "last")["model"].values())
    gathered_mb = 4 * parameters * 4 / 2**20  # weights, EMA, two AdamW moments, fp32
    sharded, full = peaks(fsdp, REWIND_STEP), peaks(fsdp_saving_full_files, REWIND_STEP)
    assert len(sharded) >= 4 and len(full) >= 4  # the same steps, 7 to 12, saved both ways
    assert min(full) > 0.5 * gathered_mb, (full, gathered_mb)
    assert max(sharded) < 0.25 * gathered_mb, (sharded, gathered_mb)


def test_a_sharded_checkpoint_consolidates_into_the_file_eval_reads(fsdp, data, tmp_path):
    target = tmp_path / "consolidated.pt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convnext_train.checkpointing",
            "consolidate",
            str(fsdp / "checkpoints" / "last"),
            str(target),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    whole, sharded = load(target), load(fsdp / "checkpoints" / "last")
    assert whole.keys() == sharded.keys() >= {"model", "model_ema", "optimizer", "scaler", "step", "config", "rng"}
    assert_same_tensors(whole["model"], sharded["model"])
    # eval.py takes the file and the directory alike, and scores them as the training's last evaluation.
    common = ["model=convnext_atto", f"data.root={data}", "data.num_classes=3", "data.img_size=32", "eval.use_ema=true"]
    both = f"checkpoint=[{target},{fsdp / 'checkpoints' / 'last'}]"
    result = run_script("eval.py", *common, both, f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = [r["top1"] for r in json.loads((tmp_path / "eval" / "eval.json").read_text())]
    final_eval = [r for r in read_jsonl(fsdp / "metrics.jsonl") if "top1" in r][-1]
    assert scores[0] == scores[1] == pytest.approx(final_eval["top1_ema"])


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


@pytest.mark.parametrize("fault", ["dead", "hung"])
def test_a_dead_or_hung_rank_ends_the_job_within_the_timeout_naming_it(fault, data, tmp_path):
    """SIGKILL: torchrun sees its worker die. SIGSTOP: the process lives but stops responding (a
    stuck NFS read, a GPU hang); only the collective timeout can notice, and the message names it."""
    run_dir = tmp_path / "run"
    timeout_minutes = 0.2  # 12 s
    args = tiny_run(data, run_dir, *EXACT, "data.num_classes=3", "trainer.epochs=50")
    args.append(f"trainer.dist_timeout_minutes={timeout_minutes}")
    process = subprocess.Popen(
        [*launcher(2), str(REPO / "train.py"), *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step_000000003.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before a rank could be stopped"
        time.sleep(0.1)
    rank1 = worker_pids(process.pid)[1]
    os.kill(rank1, signal.SIGKILL if fault == "dead" else signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if fault == "hung":
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGKILL)  # torchrun's SIGTERM waits for a stopped process
    elapsed = time.monotonic() - stopped_at
    assert process.returncode != 0
    if fault == "dead":
        assert elapsed < 120
        assert "rank     : 1" in output or "rank: 1" in output, output[-3000:]
    else:
        # The timeout, then up to as long again for the healthy ranks to check in, then torchrun's teardown.
        assert elapsed < 2 * 60 * timeout_minutes + 45, elapsed
        named = [line for line in output.splitlines() if "stopped responding" in line]
        assert named and f"rank 1 (pid {rank1} on " in named[0], output[-3000:]
        assert "trainer.dist_timeout_minutes" in named[0] and "Traceback" not in output.split(named[0])[0][-2000:]
    checkpoint = load(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["step"] >= 3 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())
