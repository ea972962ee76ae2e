"""FCMAE pre-training through the real train.py (experiment=fcmae) on a folder of unlabeled JPEGs:
killed mid-epoch and resumed bitwise; two processes (FSDP, sharded checkpoints) end like one; the
validation loss, reconstructions.png and the closing fine-tuning command; a fine-tune from the
checkpoint file and from the sharded directory starts from the encoder exactly. The model and the
loss themselves: tests/test_fcmae.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_imagefolder, run_script, run_scripts
from PIL import Image
from test_distributed import ENV, launcher
from test_resume import kill_once_saved
from test_train import TINY_RUN, assert_same_tensors, load, read_jsonl, relative_difference

from convnext_train.models import ConvNeXtV2
from convnext_train.weights import load_pretrained

pytestmark = pytest.mark.slow

# A tiny V2 encoder at 64 px (a 2 x 2 patch grid: 1 patch kept, 3 removed), 64 training images in
# 4 steps of 16 an epoch, 2 epochs, every step saved. No drop path, as the official pre-training:
# each process draws its own, so with it two processes would not train like one.
DEPTHS, DIMS = [1, 1, 1, 1], [8, 8, 16, 16]
FCMAE_RUN = [
    "experiment=fcmae",
    "model=convnextv2_atto",
    f"model.depths=[{','.join(map(str, DEPTHS))}]",
    f"model.dims=[{','.join(map(str, DIMS))}]",
    "model.decoder_embed_dim=16",
    "data=folder",
    "data.img_size=64",
    *(arg for arg in TINY_RUN if arg.startswith(("data.num_workers=", "trainer.", "scheduler."))),  # 2 epochs, 16 / 8
    "optimizer.lr=1e-3",
    "checkpoint.every_minutes=0.0001",
    "checkpoint.keep_last=100",
    "fcmae.figure_images=3",
]


@pytest.fixture(scope="module")
def photos(module_tmp_path) -> Path:
    """Unlabeled photos in nested folders (the tree's class folders are just folders to data=folder)."""
    return make_imagefolder(module_tmp_path / "photos", classes=2, train_per_class=32, val_per_class=3, size=72)


def fcmae_args(photos: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *FCMAE_RUN,
        f"data.root={photos / 'train'}",
        f"data.val_root={photos / 'val'}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def one_process(photos, module_tmp_path) -> tuple[Path, str]:
    run_dir = module_tmp_path / "one"
    result = run_script("train.py", *fcmae_args(photos, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


@pytest.fixture(scope="module")
def two_processes(photos, module_tmp_path) -> Path:
    """FSDP on 2 processes: the encoder's stages and the decoder are its units; checkpoints sharded."""
    run_dir = module_tmp_path / "two"
    args = fcmae_args(photos, run_dir, "trainer.strategy=fsdp")
    result = subprocess.run(
        [*launcher(2), str(REPO / "train.py"), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "(2 process(es))" in result.stdout
    return run_dir


def test_a_run_killed_mid_epoch_resumes_bitwise(one_process, photos, tmp_path):
    reference, _ = one_process
    run_dir = tmp_path / "killed"
    args = fcmae_args(photos, run_dir)
    kill_once_saved(args, run_dir / "checkpoints" / "step_000000006.pt")
    assert not (run_dir / "checkpoints" / "step_000000008.pt").exists()
    result = run_script("train.py", *args)
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-3000:]
    expected, final = load(reference / "checkpoints" / "last.pt"), load(run_dir / "checkpoints" / "last.pt")
    assert final["step"] == 8
    for key in ("model", "optimizer", "step", "epoch"):
        assert_same_tensors(expected[key], final[key], key)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


def test_two_processes_end_like_one(one_process, two_processes):
    a, b = load(one_process[0] / "checkpoints" / "last.pt"), load(two_processes / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    assert relative_difference(a["model"], b["model"]) < 1e-5
    # ... while training moved it 20 times further than that (the official init's weights are large)
    assert relative_difference(a["model"], load(one_process[0] / "checkpoints" / "step_000000001.pt")["model"]) > 2e-4
    losses = [
        [r["val_loss"] for r in read_jsonl(d / "metrics.jsonl") if "val_loss" in r]
        for d in (one_process[0], two_processes)
    ]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)  # every image once, fixed masks


def test_the_run_reports_its_validation_loss_and_reconstructions(one_process):
    run_dir, stdout = one_process
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evaluations = [r for r in rows if "val_loss" in r]
    assert [r["epoch"] for r in evaluations] == [1, 2] and all(r["val_images"] == 6 for r in evaluations)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_loss"] == min(r["val_loss"] for r in evaluations) and "top1" not in summary
    assert "epoch 2: reconstruction loss" in stdout

    # 3 validation images x (original, masked input, prediction, pasted), 64 px each with 2 px gaps
    figure = Image.open(run_dir / "reconstructions.png")
    assert figure.size == (4 * 64 + 5 * 2, 3 * 64 + 4 * 2)
    pixels = torch.frombuffer(bytearray(figure.convert("RGB").tobytes()), dtype=torch.uint8).float().view(200, 266, 3)
    original, masked = pixels[2:66, 2:66], pixels[2:66, 68:132]
    kept = (original - masked).abs().sum(-1) < 1  # the masked input equals the original on the kept patch
    assert kept.float().mean() == pytest.approx(0.25, abs=0.02)  # 1 patch of 4

    # The closing summary ends with the fine-tuning command for this checkpoint
    assert "experiment=v2_ft_in1k" in stdout and f"finetune.checkpoint={run_dir / 'checkpoints' / 'last.pt'}" in stdout


def test_fine_tuning_starts_from_the_encoder_of_the_file_and_of_the_sharded_directory(
    one_process, two_processes, photos, tmp_path
):
    for checkpoint in (one_process[0] / "checkpoints" / "last.pt", two_processes / "checkpoints" / "last"):
        assert checkpoint.exists() and checkpoint.is_dir() == (checkpoint.name == "last")
        pretrained = load(checkpoint if checkpoint.is_file() else checkpoint.parent / "last.pt")["model"]
        model = ConvNeXtV2(depths=DEPTHS, dims=DIMS, num_classes=2)
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        assert load_pretrained(model, checkpoint)  # the head (and norm) start fresh: an FCMAE checkpoint has none
        for name, value in model.state_dict().items():
            expected = fresh[name] if name.startswith(("head.", "norm.")) else pretrained[f"encoder.{name}"]
            assert torch.equal(value, expected), name

    # The release layout for the official code: sparse shapes, decoder kept, and it reads back here
    release = tmp_path / "convnextv2_tiny_fcmae.pt"
    (exported,) = run_scripts(
        [
            (
                "convnext_train.export",
                [f"checkpoint={one_process[0] / 'checkpoints' / 'last.pt'}", "format=fcmae", f"out={release}"],
            )
        ]
    )
    assert exported.returncode == 0 and "read back bit for bit" in exported.stdout, exported.stderr[-2000:]
    written = torch.load(release, weights_only=True)["model"]
    assert written["encoder.stages.1.0.dwconv.kernel"].shape == (49, DIMS[1]) and "decoder.0.pwconv1.weight" in written
    model = ConvNeXtV2(depths=DEPTHS, dims=DIMS, num_classes=2)
    load_pretrained(model, release)
    pretrained = load(one_process[0] / "checkpoints" / "last.pt")["model"]
    assert all(
        torch.equal(v, pretrained[f"encoder.{k}"])
        for k, v in model.state_dict().items()
        if not k.startswith(("head.", "norm."))
    )

    # ... and train.py takes the sharded directory as finetune.checkpoint (labels now: the tree's folders)
    run_dir = tmp_path / "finetune"
    result = run_script(
        "train.py",
        "model=convnextv2_atto",
        f"model.depths=[{','.join(map(str, DEPTHS))}]",
        f"model.dims=[{','.join(map(str, DIMS))}]",
        f"finetune.checkpoint={two_processes / 'checkpoints' / 'last'}",
        f"data.root={photos}",
        "data.num_classes=2",
        "data.img_size=64",
        "data.num_workers=0",
        "trainer.epochs=1",
        "trainer.global_batch_size=16",
        "trainer.micro_batch_size=8",
        "trainer.precision=fp32",
        "scheduler.warmup_epochs=0",
        "optimizer.lr=1e-12",  # the weights stay where fine-tuning started them
        "scheduler.min_lr=0",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = load(run_dir / "checkpoints" / "last.pt")["model"]
    pretrained = load(two_processes / "checkpoints" / "last.pt")["model"]
    encoder = [k for k in tuned if not k.startswith(("head.", "norm."))]
    assert all(torch.allclose(tuned[k], pretrained[f"encoder.{k}"], atol=1e-8) for k in encoder)
