"""`python -m convnext_train.bench` and `data=synthetic`, run for real on the CPU with tiny settings.

What is checked is the shape of the output (fields, types, the ratio line), never a speed: speeds
are measured by the bench, not asserted by tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import timm
import torch
from conftest import MODEL_NAMES, REPO, run_script, run_scripts
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from convnext_train.bench import BenchOptions, main, split_arguments
from convnext_train.configs import CONFIG_DIR
from convnext_train.data.loaders import EpochSampler
from convnext_train.data.sources import source
from convnext_train.data.synthetic import synthetic_samples
from convnext_train.errors import USER_ERROR_EXIT_CODE, UserError
from convnext_train.measure import DENSE_PEAK_TFLOPS, dense_peak_tflops, model_flops_utilisation
from convnext_train.models import TIMM_NAMES
from convnext_train.problems import Problems

# ConvNeXt-atto at 32 px, micro-batch 4, fp32 on the CPU, 2 warm-up and 2 timed steps per round.
TINY_BENCH = [
    "model=convnext_atto",
    "data.img_size=32",
    "trainer.micro_batch_size=4",
    "trainer.precision=fp32",
    "trainer.device=cpu",
    "warmup=2",
    "steps=2",
    "rounds=2",
]


@pytest.fixture(scope="module")
def bench_runs(tiny_imagefolder) -> dict[str, subprocess.CompletedProcess]:
    """`python -m convnext_train.bench ...` as a user runs it from the repository root, for every
    command the tests below read, in one interpreter (conftest.run_scripts): a few tiny steps each."""
    commands = {
        "step vs timm": ["step", *TINY_BENCH, "vs=timm"],
        "step vs bare": ["step", *TINY_BENCH, "vs=bare"],
        "step given global batch": ["step", *TINY_BENCH, "trainer.global_batch_size=8", "rounds=1"],
        "fcmae vs classification": [
            "step", *(a for a in TINY_BENCH if not a.startswith(("model=", "data.img_size="))), "experiment=fcmae",
            "model=convnextv2_atto", "model.depths=[1,1,1,1]",
            "model.dims=[8,8,16,16]", "model.decoder_embed_dim=16", "data.img_size=64", "vs=classification",
        ],
        "eval vs timm": ["eval", *TINY_BENCH, "vs=timm"],
        "loader": [
            "loader", *TINY_BENCH, f"data.root={tiny_imagefolder}", "data.num_classes=4", "data.num_workers=0"
        ],
    }  # fmt: skip
    results = run_scripts([("convnext_train.bench", args) for args in commands.values()])
    return dict(zip(commands, results, strict=True))


def json_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def assert_row(row: dict, *, bench: str, impl: str, has_mfu: bool = True, img_size: int = 32) -> None:
    assert row["bench"] == bench and row["impl"] == impl
    assert isinstance(row["images_per_sec"], float) and row["images_per_sec"] > 0
    assert isinstance(row["step_ms"], float) and row["step_ms"] > 0
    assert len(row["round_step_ms"]) == 2 and all(isinstance(ms, float) for ms in row["round_step_ms"])
    assert row["peak_mem_gb"] is None  # no device memory to read on the CPU
    if has_mfu:
        assert "mfu" in row and row["mfu"] is None  # no known peak for a CPU
    else:
        assert "mfu" not in row
    assert isinstance(row["device"], str) and row["device"]
    assert row["torch"] == torch.__version__ and row["timm"] == timm.__version__
    assert isinstance(row["python"], str)
    settings = row["settings"]
    assert settings["bench"]["warmup"] == 2 and settings["bench"]["steps"] == 2 and settings["bench"]["rounds"] == 2
    assert settings["config"]["trainer"]["micro_batch_size"] == 4
    assert settings["config"]["data"]["img_size"] == img_size


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rival", ["timm", "bare"])
def test_step_against_a_rival(bench_runs, rival):
    result = bench_runs[f"step vs {rival}"]
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = json_rows(result.stdout)
    assert_row(ours, bench="step", impl="ours")
    assert_row(theirs, bench="step", impl=rival)
    assert ours["model"] == theirs["model"] == "convnext_atto"
    assert isinstance(ours["settings"]["gmacs_per_image"], float)
    # One micro-batch per optimizer step unless trainer.global_batch_size is given.
    assert ours["settings"]["config"]["trainer"]["global_batch_size"] == 4
    assert isinstance(theirs["ours_over_this"], float) and theirs["ours_over_this"] > 0
    assert re.search(rf"^ours / {rival} images/s: \d+\.\d+", result.stdout, re.MULTILINE)


def test_fcmae_step_against_the_classification_step_of_its_encoder(bench_runs):
    result = bench_runs["fcmae vs classification"]
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = json_rows(result.stdout)
    assert_row(ours, bench="step", impl="ours", img_size=64)  # two patches a side
    assert_row(theirs, bench="step", impl="classification", img_size=64)
    assert ours["settings"]["config"]["model"]["_target_"] == "convnext_train.models.FCMAE"
    assert ours["settings"]["config"]["task"] == "fcmae"
    assert ours["model"] == theirs["model"] == "convnextv2_atto"
    assert re.search(r"^ours / classification images/s: \d+\.\d+", result.stdout, re.MULTILINE)


def test_step_keeps_a_given_global_batch(bench_runs):
    result = bench_runs["step given global batch"]
    assert result.returncode == 0, result.stderr[-3000:]
    (ours,) = json_rows(result.stdout)
    assert ours["settings"]["config"]["trainer"]["global_batch_size"] == 8
    assert "micro 4" in result.stdout  # two micro-batches per timed step


def test_eval_against_timm(bench_runs):
    result = bench_runs["eval vs timm"]
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = json_rows(result.stdout)
    assert_row(ours, bench="eval", impl="ours")
    assert_row(theirs, bench="eval", impl="timm")
    assert re.search(r"^ours / timm images/s: \d+\.\d+", result.stdout, re.MULTILINE)


@pytest.mark.slow  # the ONNX export takes seconds even for a tiny model
def test_eval_against_onnxruntime():
    # Fewer blocks than atto: the export's time grows with them.
    smaller = ["model.depths=[1,1,2,1]", "model.dims=[8,16,24,32]"]
    (result,) = run_scripts([("convnext_train.bench", ["eval", *TINY_BENCH, *smaller, "vs=onnxruntime"])])
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = json_rows(result.stdout)
    assert_row(ours, bench="eval", impl="ours")
    assert_row(theirs, bench="eval", impl="onnxruntime")
    assert re.search(r"^ours / onnxruntime images/s: \d+\.\d+", result.stdout, re.MULTILINE)


def test_loader_on_an_imagefolder(bench_runs):
    result = bench_runs["loader"]
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json_rows(result.stdout)
    assert_row(row, bench="loader", impl="ours", has_mfu=False)
    assert row["settings"]["config"]["aug"]["mixup"] > 0  # the recipe's Mixup/CutMix was on the batch


def ffcv_missing_reason() -> str | None:
    """None when FFCV is installed; else why not (tests/test_ffcv.py decides between skipping and
    failing). Asked without importing it: FFCV compiles numba code as it is imported."""
    import importlib.util

    return None if importlib.util.find_spec("ffcv") is not None else "FFCV is not installed"


@pytest.mark.slow
@pytest.mark.skipif(ffcv_missing_reason() is not None, reason=str(ffcv_missing_reason()))
def test_loader_on_ffcv_beton_files(tmp_path):
    from conftest import make_imagefolder

    root = make_imagefolder(tmp_path / "images", size=64)
    writer = subprocess.run(
        [sys.executable, "data/write_ffcv.py", str(root), str(tmp_path / "ffcv"), "--workers", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert writer.returncode == 0, writer.stderr[-3000:]
    loader = ["loader", *TINY_BENCH, "data=ffcv", f"data.root={tmp_path / 'ffcv'}", "data.num_classes=4"]
    (result,) = run_scripts([("convnext_train.bench", [*loader, "data.num_workers=1"])])
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json_rows(result.stdout)
    assert_row(row, bench="loader", impl="ours", has_mfu=False)
    assert row["settings"]["config"]["data"]["kind"] == "ffcv" and row["settings"]["config"]["aug"]["auto_augment"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["eval", "vs=bare"], "vs=bare does not apply to `eval`"),
        (["loader", "vs=timm"], "vs=timm does not apply to `loader`"),
        (
            ["eval", "trainer.device=cpu", "trainer.precision=bf16", "vs=onnxruntime"],
            "add trainer.device=cpu trainer.precision=fp32",
        ),
        (["step", "steps=0"], "steps=0: must be an integer >= 1"),
        (["step", "tf32=yes"], "tf32=yes: must be true or false"),
        (["step", "data=digits"], "data= applies to `loader` only"),
        (["step", "model=convnext_iso_s", "vs=timm"], "timm has no counterpart of model=convnext_iso_s"),
        (["loader"], "set data.root"),
        (["step", "trainer.foo=1"], "Could not override 'trainer.foo'"),
        (["step", "vs=classification"], "vs=classification compares FCMAE's step"),
        (
            ["step", "experiment=fcmae", "model=convnextv2_atto", "vs=timm"],
            "experiment=fcmae: `step` vs=timm has no FCMAE",
        ),
    ],
)
def test_bad_arguments_are_user_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Its parts
# --------------------------------------------------------------------------------------------------
def test_bench_options_are_split_from_overrides():
    options, overrides = split_arguments(
        ["model=convnext_t", "vs=timm", "warmup=0", "steps=3", "rounds=4", "tf32=true", "trainer.compile=true"]
    )
    assert options == BenchOptions(warmup=0, steps=3, rounds=4, vs="timm", tf32=True)
    assert overrides == ["model=convnext_t", "trainer.compile=true"]
    with pytest.raises(UserError):
        split_arguments(["rounds=two"])


def test_every_hierarchical_variant_has_its_timm_counterpart():
    hierarchical = [name for name in MODEL_NAMES if "_iso_" not in name]
    assert sorted(TIMM_NAMES) == sorted(hierarchical)
    assert all(timm.is_model(name) for name in TIMM_NAMES.values())


def test_peaks_are_found_by_device_name():
    assert dense_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert dense_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert dense_peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert dense_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert dense_peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert all(set(peaks) == {"bf16", "fp16", "tf32", "fp32"} for peaks in DENSE_PEAK_TFLOPS.values())


def test_mfu_counts_two_flops_per_mac_and_three_passes_for_training():
    # 1,000 images/s of 4.5 GMACs on a 27 TFLOP/s device: 9 TFLOP/s forward, 27 training.
    assert model_flops_utilisation(1000.0, 4.5, training=False, peak_tflops=27.0) == pytest.approx(1 / 3)
    assert model_flops_utilisation(1000.0, 4.5, training=True, peak_tflops=27.0) == pytest.approx(1.0)
    assert model_flops_utilisation(1000.0, 4.5, training=True, peak_tflops=None) is None


# --------------------------------------------------------------------------------------------------
# data=synthetic
# --------------------------------------------------------------------------------------------------
def synthetic_config(**overrides):
    data = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml"), overrides)
    aug = OmegaConf.load(CONFIG_DIR / "aug" / "recipe.yaml")
    return data, aug


def test_synthetic_items_look_like_imagefolder_items():
    data, aug = synthetic_config(img_size=32, train_length=100, val_length=10, num_classes=7)
    train, val = synthetic_samples(data, seed=0)
    assert (len(train), len(val)) == (100, 10)
    sampler = EpochSampler(len(train), seed=0, shuffle=True, drop_last=True)
    images, targets, replaced = next(iter(DataLoader(train, batch_size=8, sampler=sampler)))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and 0 <= targets.min() and targets.max() < 7
    assert replaced.dtype == torch.bool and not replaced.any()
    # Fixed images: the same key gives the same item in every epoch and every build.
    again, _ = synthetic_samples(data, seed=0)
    assert torch.equal(train[(0, 5)][0], again[(3, 5)][0])
    assert not torch.equal(train[(0, 0)][0], val[(0, 0)][0])


def test_synthetic_lengths_are_checked():
    data, _ = synthetic_config(train_length=0, val_length=-1)
    problems = Problems(OmegaConf.create({"data": data}))
    source("synthetic").check(data, problems)
    with pytest.raises(
        UserError, match=r"data.train_length=0: .*; data.val_length=-1: must be a positive integer or null"
    ):
        problems.raise_if_any()
    data, _ = synthetic_config(val_length=None)
    assert synthetic_samples(data, seed=0)[1] is None


def test_train_py_runs_on_synthetic_data(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        "data=synthetic",
        "model=convnext_atto",
        "data.img_size=32",
        "data.train_length=32",
        "data.val_length=8",
        "data.num_workers=0",
        "trainer.epochs=1",
        "trainer.global_batch_size=16",
        "trainer.micro_batch_size=8",
        "trainer.precision=fp32",
        "trainer.device=cpu",
        "scheduler.warmup_epochs=0",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["epochs"] == 1
    assert summary["top1"] is not None and summary["top1_ema"] is not None
