"""The suite's checks that run other processes: train.py killed and resumed, and pytest on the
repository's CUDA-only tests."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from convnext_train.gpu_suite.plan import REPO, Plan
from convnext_train.weights import read_checkpoint

CUDA_TEST_FILES = ["tests/test_batch_augment.py"]  # the files holding `@pytest.mark.cuda` tests


def resume_item(plan: Plan, device: torch.device, out: Path) -> dict[str, Any]:
    """train.py on synthetic data: an uninterrupted run, and one killed (SIGKILL, no handler runs)
    once it has saved a checkpoint in the second half of the first epoch, then resumed. On the GPU a
    second uninterrupted run gives the noise floor (cuDNN's autotuned algorithms are chosen per
    process); on the CPU the runs are bitwise reproducible (tests/test_resume.py), so it is 0.
    The runs' directories are deleted afterwards: ConvNeXt-T's checkpoints are 0.4 GB each."""
    steps_per_epoch = plan.resume_steps // 2
    base = [sys.executable, str(REPO / "train.py"), *resume_overrides(plan, device)]
    root = out / "resume"

    def launch(name: str, kill_from: int | None = None) -> tuple[str, int | None]:
        """train.py's output, and the step of the checkpoint it was killed after."""
        run_dir = root / name
        log = root / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as sink:  # a file, not a pipe: a full pipe would stall the run we poll
            process = subprocess.Popen([*base, f"hydra.run.dir={run_dir}"], cwd=REPO, stdout=sink, stderr=sink)
            killed_after = None
            while kill_from is not None and killed_after is None and process.poll() is None:
                saved = [int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt")]
                if any(kill_from <= step < 2 * steps_per_epoch for step in saved):
                    process.send_signal(signal.SIGKILL)
                    killed_after = max(saved)
                time.sleep(0.02)
            process.wait()
        output = log.read_text()
        if killed_after is None and process.returncode != 0:
            raise RuntimeError(f"train.py failed ({process.returncode}): {output[-1500:]}")
        return output, killed_after

    shutil.rmtree(root, ignore_errors=True)
    try:
        launch("uninterrupted")
        _, killed_after = launch("killed", kill_from=steps_per_epoch // 2 + 1)
        resumed_output, _ = launch("killed")
        floor = 0.0
        if device.type == "cuda":
            launch("again")
            floor = weight_difference(root / "uninterrupted", root / "again")
        difference = weight_difference(root / "uninterrupted", root / "killed")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tolerance = max(3 * floor, 1e-4)
    resumed = re.search(r"resumed from \S+ at epoch \S+ step (\d+)", resumed_output)
    return {
        "status": "passed" if resumed and killed_after is not None and difference <= tolerance else "failed",
        "steps": plan.resume_steps,
        "killed_after_step": killed_after,
        "resumed_at_step": int(resumed.group(1)) if resumed else None,
        "weight_rel_diff": difference,
        "noise_floor_rel_diff": floor,
        "tolerance": tolerance,
    }


def resume_overrides(plan: Plan, device: torch.device) -> list[str]:
    """train.py's overrides for the resume check's runs: two epochs of `plan.resume_steps // 2` steps."""
    batch = plan.check_batch
    return [
        *plan.overrides(plan.train_variants[0], batch, plan.precisions[0], False, device),
        "data=synthetic",
        f"data.num_classes={plan.num_classes}",
        f"data.img_size={plan.img_size}",
        f"data.train_length={plan.resume_steps // 2 * batch}",
        f"data.val_length={batch}",
        f"data.num_workers={0 if plan.quick else 2}",
        "trainer.epochs=2",
        "scheduler.warmup_epochs=1",
        "trainer.log_every=1",
        # Mid-epoch saves by the clock, every few seconds on the GPU (every step in the miniature).
        f"checkpoint.every_minutes={0.0001 if plan.quick else 0.05}",
    ]


def weight_difference(a: Path, b: Path) -> float:
    """||w_a - w_b|| / ||w_a|| over the final weights of two runs."""
    first, second = (read_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (a, b))
    diff = sum(float((first[k].double() - second[k].double()).square().sum()) for k in first)
    norm = sum(float(first[k].double().square().sum()) for k in first)
    return (diff / norm) ** 0.5


def cuda_tests_item(device: torch.device) -> dict[str, Any]:
    """The repository's tests that need CUDA (`@pytest.mark.cuda`), run by pytest."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "pytest is not installed: add it to the offline wheels (EXTRA=pytest)"}
    # `-o addopts=`: in this one process, without pyproject's parallel workers (no pytest-xdist there).
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "cuda"]
    command += CUDA_TEST_FILES
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    if device.type != "cuda":
        status = "skipped" if result.returncode == 0 and counts.get("skipped", 0) > 0 else "failed"
        return {"status": status, "reason": "no CUDA device: the tests skip", "summary": summary, "counts": counts}
    # On a GPU every selected test must have run and passed: a skip there means a wrong guard.
    ran = result.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    return {"status": "passed" if ran else "failed", "summary": summary, "counts": counts}
