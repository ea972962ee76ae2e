"""SLURM end to end: a real one-node cluster (slurm/cluster.sh), the real slurm/train.sbatch
submitted the way README.md says for a node without GPUs, 2 tasks launched by srun, a requeue forced
mid-run through the same USR1 that `--signal=USR1@<seconds>` sends before the time limit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_imagefolder
from test_distributed import EXACT
from test_train import TINY_RUN, assert_same_tensors, load, read_jsonl, tiny_run

pytestmark = pytest.mark.slow

CLUSTER = REPO / "slurm" / "cluster.sh"
# README.md, "Multi-GPU and SLURM": the command for a node without GPUs.
SBATCH_CPU = ["sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none"]
# 64 images, 4 steps of 16 per epoch, 12 steps; every step logged and checkpointed.
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def cluster(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), command], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def slurm_env():
    """The environment of a user of the local cluster: its SLURM_CONF, and this Python first on
    PATH so that the job's `python` is this one. The cluster is started here when it is not
    running (CI starts it in .ci/run) and stopped at the end when it was started here."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (bash slurm/cluster.sh start)")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }
    env["SLURM_CONF"] = cluster("env", env).stdout.strip().split("=", 1)[1]
    installed = cluster("install", env)
    if installed.returncode != 0:
        reason = f"slurm-wlm and munge could not be installed: {installed.stderr.strip()[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs them in .ci/run: a skip there would hide a broken setup
        pytest.skip(reason)
    # Without its slurm.conf, scontrol would wait a minute for one to appear.
    was_running = (
        Path(env["SLURM_CONF"]).exists()
        and subprocess.run(["scontrol", "ping"], env=env, capture_output=True).returncode == 0
    )
    started = cluster("start", env)
    assert started.returncode == 0, started.stderr
    yield env
    if not was_running:
        cluster("stop", env)


def submit(env: dict, log: Path, *overrides: str) -> str:
    result = subprocess.run(
        [*SBATCH_CPU, "--parsable", f"--output={log}", "slurm/train.sbatch", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until_finished(env: dict, job: str, log: Path, timeout: float = 180) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (fields := job_fields(env, job))["JobState"] not in FINISHED:
        assert time.monotonic() < deadline, (
            f"job {job} still {fields['JobState']}:\n{log.read_text()[-3000:] if log.exists() else ''}"
        )
        time.sleep(0.5)
    return fields


@pytest.fixture
def jobs(slurm_env):
    """Job ids submitted by a test; cancelled if the test leaves them behind."""
    submitted: list[str] = []
    yield submitted
    if submitted:
        subprocess.run(["scancel", *submitted], env=slurm_env, capture_output=True)


def test_a_job_requeued_mid_run_resumes_and_ends_bitwise_equal(slurm_env, jobs, tmp_path):
    data = make_imagefolder(tmp_path / "data")
    runs = {name: tmp_path / name for name in ("reference", "requeued")}
    logs = {name: tmp_path / f"{name}.out" for name in runs}
    # Both in the queue at once: the cluster's 2 CPUs run one after the other.
    for name, run_dir in runs.items():
        jobs.append(submit(slurm_env, logs[name], *tiny_run(data, run_dir, *EXACT)))
    reference_job, requeued_job = jobs

    checkpoint = runs["requeued"] / "checkpoints" / "step_000000003.pt"
    deadline = time.monotonic() + 150
    while not checkpoint.exists():
        assert (
            job_fields(slurm_env, requeued_job)["JobState"] in {"PENDING", "RUNNING"} and time.monotonic() < deadline
        ), logs["requeued"].read_text()[-3000:] if logs["requeued"].exists() else "no log"
        time.sleep(0.1)
    # What `--signal=USR1@600` does before the time limit: USR1 to every task of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", requeued_job], env=slurm_env, check=True)

    for name, job in (("reference", reference_job), ("requeued", requeued_job)):
        fields = wait_until_finished(slurm_env, job, logs[name])
        assert fields["JobState"] == "COMPLETED", f"{name}: {fields['JobState']}\n{logs[name].read_text()[-3000:]}"
        assert fields["Restarts"] == ("1" if name == "requeued" else "0")

    log = logs["requeued"].read_text()
    assert "(2 process(es))" in log
    assert "stopping after SIGUSR1: checkpoint saved at step" in log and f"requeued SLURM job {requeued_job}" in log, (
        log[-3000:]
    )
    resumed = re.search(r"resumed from .* at epoch \d+, step (\d+)", log)
    assert resumed and 3 <= int(resumed.group(1)) < 12, log[-3000:]
    # metrics.jsonl holds every step once, as if the job had never stopped.
    assert [r["step"] for r in read_jsonl(runs["requeued"] / "metrics.jsonl") if "loss" in r] == list(range(1, 13))

    reference, final = (load(runs[name] / "checkpoints" / "last.pt") for name in ("reference", "requeued"))
    for key in ("model", "model_ema", "optimizer", "scaler", "step", "epoch"):
        assert_same_tensors(reference[key], final[key], key)
    assert final["step"] == 12


def test_a_sweep_through_the_submitit_launcher_trains_on_two_tasks(slurm_env, tmp_path):
    data = make_imagefolder(tmp_path / "data")
    sweep = tmp_path / "sweep"
    # The GPU layout of conf/hydra/launcher/slurm.yaml, turned into 2 CPU tasks.
    cpu_node = [
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--multirun",
            "hydra/launcher=slurm",
            *cpu_node,
            f"hydra.sweep.dir={sweep}",
            *TINY_RUN,
            f"data.root={data}",
            "trainer.epochs=1",
            "trainer.seed=0,1",
        ],
        cwd=REPO,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert [p.parent.name.rsplit(",", 1)[-1] for p in summaries] == ["trainer.seed=0", "trainer.seed=1"]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_0_log.out"))
    assert logs.count("(2 process(es))") == 2, logs[-3000:]
    submission = next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR1@600" in submission and "#SBATCH --requeue" in submission, submission
