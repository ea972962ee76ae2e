"""The roadmap's steps trained through the real train.py (a BatchNorm step on 2 processes under DDP
and FSDP, a LayerNorm step on one), killed mid-epoch and resumed bitwise; BatchNorm's running
statistics averaged over the processes. The models themselves: tests/test_roadmap.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torchvision
from conftest import REPO, make_imagefolder, run_script, run_scripts
from test_resume import kill_once_saved
from test_roadmap import build_step, randomize_batch_norms_
from test_train import assert_same_tensors, load, read_jsonl, relative_difference, tiny_run
from torchvision.datasets import ImageFolder

from convnext_train.data.transforms import eval_transform

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------------
# End to end: train.py on a BatchNorm step (DDP, FSDP) and a LayerNorm step, killed and resumed
# --------------------------------------------------------------------------------------------------
# A tiny step (one or two blocks a stage, widths 8-16) at 32 px on 66 images: 4 steps of 16 an epoch,
# 2 epochs, every step saved; killed when step 6 (mid-epoch 2) is on disk.
ROADMAP_RUN = [
    *(arg for arg in tiny_run(Path("."), Path("."))[:-2] if not arg.startswith(("model", "data.num_classes"))),
    "experiment=roadmap",
    "model.depths=[1,2,1,1]",
    "model.widths=[8,8,16,16]",
    "model.drop_path_rate=0.1",
    "data.num_classes=3",
    "checkpoint.every_minutes=0.0001",
]
KILL_AT = "step_000000006"
# One thread per process, as torchrun gives (test_distributed's environment).
TORCHRUN_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def roadmap_args(data: Path, run_dir: Path, step: str, *extra: str) -> list[str]:
    return [*ROADMAP_RUN, f"model=roadmap_r50/{step}", f"data.root={data}", f"hydra.run.dir={run_dir}", *extra]


def torchrun(args: list[str]) -> subprocess.Popen:
    """train.py on 2 processes through torchrun."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
    ]
    return subprocess.Popen(
        [*command, *args],
        cwd=REPO,
        env=TORCHRUN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, poll: float, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended before {path.name} appeared"
        time.sleep(poll)


def finished(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stdout


def assert_resumed_bitwise(reference: Path, run_dir: Path) -> None:
    expected, final = load(reference / "checkpoints" / "last.pt"), load(run_dir / "checkpoints" / "last.pt")
    assert final["step"] == 8
    for key in ("model", "optimizer", "step", "epoch", *(("model_ema",) if "model_ema" in expected else ())):
        assert_same_tensors(expected[key], final[key], key)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


@pytest.fixture(scope="module")
def data(module_tmp_path) -> Path:
    return make_imagefolder(module_tmp_path / "data", classes=3, train_per_class=22, val_per_class=5)


@pytest.fixture(scope="module")
def runs(module_tmp_path) -> Path:
    return module_tmp_path / "outputs" / "roadmap"


@pytest.fixture(scope="module")
def batch_norm_ddp(data, runs) -> Path:
    """The uninterrupted BatchNorm run on 2 processes, with an EMA (the recipe turns it off) to watch."""
    run_dir = runs / "resnet50"
    stdout = finished(torchrun(roadmap_args(data, run_dir, "resnet50", "ema.enabled=true", "ema.decay=0.9")))
    assert "(2 process(es))" in stdout
    return run_dir


@pytest.fixture(scope="module")
def layer_norm_run(data, runs) -> Path:
    """Trained as the README's sweep trains every step: `--multirun experiment=roadmap`, here with one
    step named, into the sweep's directory (the run's own: ${hydra.job.override_dirname} below it)."""
    args = [arg for arg in roadmap_args(data, runs, "layer_norm") if not arg.startswith("hydra.run.dir=")]
    result = run_script("train.py", "--multirun", *args, f"hydra.sweep.dir={runs}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [path.parent for path in runs.rglob("summary.json") if "roadmap_r50/layer_norm" in str(path)]
    return run_dir


def test_a_batch_norm_step_under_ddp_killed_mid_epoch_resumes_bitwise(batch_norm_ddp, data, tmp_path):
    run_dir = tmp_path / "killed"
    args = roadmap_args(data, run_dir, "resnet50", "ema.enabled=true", "ema.decay=0.9")
    process = torchrun(args)
    try:
        # A tiny step takes milliseconds: look often, so that the kill lands inside epoch 2.
        wait_for(run_dir / "checkpoints" / f"{KILL_AT}.pt", process, poll=0.001)
    finally:
        # torchrun's agent and its workers at once, as a node failure takes them (the workers run in
        # sessions of their own: a process-group kill would miss them).
        tree = psutil.Process(process.pid)
        for member in [tree, *tree.children(recursive=True)]:
            member.send_signal(signal.SIGKILL)
        process.communicate()
    assert not (run_dir / "checkpoints" / "step_000000008.pt").exists()
    stdout = finished(torchrun(args))
    assert "resumed from" in stdout
    assert_resumed_bitwise(batch_norm_ddp, run_dir)

    # The running statistics went with training, and the EMA's followed them without equalling them.
    final = load(batch_norm_ddp / "checkpoints" / "last.pt")
    name = "stages.1.0.norm.running_var"
    start = build_step("roadmap_r50/resnet50", num_classes=3, depths=[1, 2, 1, 1], widths=[8, 8, 16, 16])
    assert not torch.allclose(final["model"][name], start.state_dict()[name])
    assert not torch.equal(final["model_ema"][name], final["model"][name])
    assert final["model_ema"][name.replace("running_var", "num_batches_tracked")] == 8


def test_a_batch_norm_step_under_fsdp_trains_as_under_ddp(batch_norm_ddp, data, tmp_path):
    run_dir = tmp_path / "fsdp"
    args = roadmap_args(data, run_dir, "resnet50", "ema.enabled=true", "ema.decay=0.9", "trainer.strategy=fsdp")
    finished(torchrun(args))
    ddp, fsdp = load(batch_norm_ddp / "checkpoints" / "last.pt"), load(run_dir / "checkpoints" / "last.pt")
    statistics = [k for k in ddp["model"] if "running_" in k]
    assert statistics
    for key in ("model", "model_ema"):
        assert relative_difference(ddp[key], fsdp[key]) < 1e-5
        assert relative_difference({k: ddp[key][k] for k in statistics}, {k: fsdp[key][k] for k in statistics}) < 1e-5


def test_a_layer_norm_step_killed_mid_epoch_resumes_bitwise(layer_norm_run, data, tmp_path):
    run_dir = tmp_path / "killed"
    args = roadmap_args(data, run_dir, "layer_norm")
    kill_once_saved(args, run_dir / "checkpoints" / f"{KILL_AT}.pt")
    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_resumed_bitwise(layer_norm_run, run_dir)
    assert "model_ema" not in load(run_dir / "checkpoints" / "last.pt")  # experiment=roadmap: no EMA


# Run by torchrun in two processes: each rank normalises its own batch, then `sync_buffers` (called
# by the training step after every optimizer step) leaves every rank with the mean of their running
# statistics, under DDP and FSDP alike.
AVERAGING_WORKER = """
import sys
import torch, torch.distributed as dist
from convnext_train import configs
from convnext_train.distributed import init_processes
from convnext_train.parallelize import parallelize
from hydra.utils import instantiate

processes = init_processes("cpu", 5)
for strategy in ("ddp", "fsdp"):
    torch.manual_seed(0)
    model = instantiate(configs.model("roadmap_r50/resnet50"), num_classes=3, depths=[1, 1, 1, 1], widths=[8, 8, 16, 16])
    parallel = parallelize(model, processes, torch.device("cpu"), strategy=strategy, precision="fp32", compile_model=False)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(processes.rank)) * (1 + processes.rank)
    parallel.forward(images).sum().backward()
    before = [b.clone() for b in model.buffers() if b.is_floating_point()]
    gathered = [None, None]
    dist.all_gather_object(gathered, before)
    assert not torch.equal(gathered[0][0], gathered[1][0]), "each rank's own batch statistics"
    parallel.sync_buffers()
    after = [b for b in model.buffers() if b.is_floating_point()]
    for ours, first, second in zip(after, *gathered, strict=True):
        torch.testing.assert_close(ours, (first + second) / 2, rtol=0, atol=1e-6)
    dist.all_gather_object(gathered, after)
    assert all(torch.equal(a, b) for a, b in zip(*gathered, strict=True)), strategy
print("averaged under ddp and fsdp")
"""


def test_running_statistics_are_averaged_over_the_processes_after_each_step_under_ddp_and_fsdp(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(AVERAGING_WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        cwd=REPO,
        env={**TORCHRUN_ENV, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("averaged under ddp and fsdp") == 2


def test_the_roadmap_table_and_figure_come_from_the_real_run_directories(
    batch_norm_ddp, layer_norm_run, runs, tmp_path
):
    out = tmp_path / "roadmap.png"
    (result,) = run_scripts(
        [("convnext_train.roadmap", [f"runs={runs}", f"out={out}", "steps=[resnet50,layer_norm,gelu]"])]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
    for step, run_dir in (("resnet50", batch_norm_ddp), ("layer_norm", layer_norm_run)):
        best = json.loads((run_dir / "summary.json").read_text())["best_top1"]
        assert rows[step].rstrip().endswith(f"{best:.2f}"), rows[step]
    assert rows["gelu"].rstrip().endswith("–")  # no run of it
    assert out.read_bytes().startswith(b"\x89PNG")


def test_a_torchvision_resnet_file_scores_through_eval_py_as_torchvision_scores_it(data, tmp_path):
    """The README's `eval.py model=roadmap_r50/resnet50 checkpoint=resnet50-0676ba61.pth`, on a one-block
    ResNet of torchvision's own (the released file is not downloaded here)."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=3)
    randomize_batch_norms_(reference)
    with torch.no_grad():
        reference.fc.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))  # predictions that differ
    path = tmp_path / "resnet.pth"
    torch.save(reference.state_dict(), path)
    out = tmp_path / "eval"
    result = run_script(
        "eval.py",
        f"checkpoint={path}",
        "model=roadmap_r50/resnet50",
        "model.depths=[1,1,1,1]",
        f"data.root={data}",
        "data.img_size=32",
        "data.num_classes=3",
        "eval.device=cpu",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((out / "eval.json").read_text())
    images = ImageFolder(data / "val", transform=eval_transform(32, 0.875))
    batch = torch.stack([image for image, _ in images])
    labels = torch.tensor([label for _, label in images])
    with torch.no_grad():
        logits = reference(batch)
    predicted = logits.argmax(1)
    assert len(set(predicted.tolist())) > 1  # a constant prediction would score alike whatever was loaded
    assert scores["top1"] == pytest.approx(100 * float((predicted == labels).float().mean()))
    per_class = {f"class {c}": 100 * float((predicted[labels == c] == c).float().mean()) for c in range(3)}
    assert {name: row["top1"] for name, row in scores["per_class"].items()} == pytest.approx(per_class)
