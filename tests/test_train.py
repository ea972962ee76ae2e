"""The real train.py and eval.py, in subprocesses, on tiny real data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_imagefolder, run_script, run_scripts

from convnext_train.checkpointing.layout import CheckpointDir
from convnext_train.distributed import Processes
from convnext_train.runtime import reseed_per_rank
from convnext_train.weights import read_checkpoint, save_checkpoint

# A tiny but complete run: ConvNeXt-atto at 32 px, 64 training images, 4 steps of 16 per epoch
# with 2 micro-batches of accumulation, the full augmentation recipe, EMA, drop path.
TINY_RUN = [
    "model=convnext_atto",
    "model.drop_path_rate=0.1",
    "data.num_classes=4",
    "data.img_size=32",
    "data.num_workers=0",
    "trainer.epochs=2",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=8",
    "trainer.precision=fp32",
    "trainer.log_every=1",
    "scheduler.warmup_epochs=1",
    "ema.decay=0.9",
]


def tiny_run(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_RUN, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(path: Path) -> dict:
    """A checkpoint of a run: a full file, or a sharded directory read whole (`last.pt` stands for
    either: a sharded run's `last` is a link to a directory)."""
    if path.name == "last.pt" and not path.exists() and (path.parent / "last").is_dir():
        path = path.parent / "last"
    return read_checkpoint(path)


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over every tensor of two state dicts (float round-off: about 1e-7)."""
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float(a[k].double().norm() ** 2) for k in a)
    return (num / den) ** 0.5


def assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


# --------------------------------------------------------------------------------------------------
# A run, its outputs, and the official lr formula
# --------------------------------------------------------------------------------------------------
def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs):
    """The official ConvNeXt utils.cosine_scheduler, from its published definition."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(0, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


@pytest.fixture(scope="module")
def finished_run(tiny_imagefolder, module_tmp_path):
    run_dir = module_tmp_path / "run"
    result = run_script("train.py", *tiny_run(tiny_imagefolder, run_dir, "checkpoint.every_minutes=0.0001"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_run_writes_metrics_summary_and_checkpoints(finished_run):
    run_dir, _ = finished_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "top1" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all({"step", "epoch", "lr", "loss", "images_per_sec"} <= r.keys() for r in train_rows)
    assert [r["epoch"] for r in eval_rows] == [1, 2]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 and "top1_ema" in r for r in eval_rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8
    assert summary["top1"] == eval_rows[-1]["top1"] and summary["top1_ema"] == eval_rows[-1]["top1_ema"]
    assert summary["best_top1"] == max(r["top1"] for r in eval_rows)
    assert summary["images_per_sec"] > 0

    checkpoints = run_dir / "checkpoints"
    steps = sorted(p.name for p in checkpoints.glob("step_*.pt"))
    assert steps == ["step_000000007.pt", "step_000000008.pt"]  # keep_last=2
    last = load(checkpoints / "last.pt")
    assert last["step"] == 8 and last["epoch"] == 2
    assert {"model", "model_ema", "optimizer", "scaler", "config"} <= last.keys()
    assert last["config"]["trainer"]["global_batch_size"] == 16
    assert "stages.2.5.dwconv.weight" in last["model"]  # official key names
    assert (checkpoints / "best.pt").exists() and (checkpoints / "best_ema.pt").exists()
    assert not list(checkpoints.glob("*.tmp*")) and not list(checkpoints.glob(".*"))

    # Hydra's record of the command, written by the trainer once it holds the lock (command_record.py),
    # and no job log file, which Hydra would open before the lock (conf/hydra/job_logging/console.yaml).
    record = run_dir / ".hydra"
    assert "checkpoint.every_minutes=0.0001" in yaml.safe_load((record / "overrides.yaml").read_text())
    config = yaml.safe_load((record / "config.yaml").read_text())
    assert config["trainer"]["global_batch_size"] == 16 and "hydra" not in config
    assert yaml.safe_load((record / "hydra.yaml").read_text())["hydra"]["run"]["dir"] == str(run_dir)
    assert not list(run_dir.glob("*.log"))


def test_lr_of_every_step_equals_the_official_schedule(finished_run):
    run_dir, _ = finished_run
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "lr" in r]
    expected = official_cosine_scheduler(4e-3, 1e-6, epochs=2, niter_per_ep=4, warmup_epochs=1)
    assert lrs == pytest.approx(expected.tolist(), rel=1e-12, abs=0)
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(4e-3)


def test_rerunning_a_finished_run_does_nothing(runs):
    result, rerun = runs["rerun"], case_dir(runs["root"], "rerun")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to do" in result.stdout
    assert (rerun / "checkpoints" / "last.pt").stat().st_mtime_ns == runs["last_before_rerun"]
    # The job that resumed (holding the lock) records its own command, as Hydra did before.
    overrides = yaml.safe_load((rerun / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.epochs=2" in overrides and "checkpoint.every_minutes=0.0001" not in overrides


def test_the_run_directory_is_named_by_what_changes_the_training_only():
    """The default run directory is named by the overrides, so the same command resumes; overrides
    that only say where data is or how often to log or checkpoint must not start a new run."""
    where_and_how_often = [
        "data.root=/elsewhere",
        "data.num_workers=3",
        "trainer.log_every=7",
        "checkpoint.every_minutes=1",
        "checkpoint.keep_last=5",
        "trainer.micro_batch_size=4",  # how the same recipe is computed
        "trainer.strategy=fsdp",
    ]
    result = run_script(
        "train.py", "model=convnext_atto", "trainer.epochs=3", *where_and_how_often, "--cfg", "hydra", "--resolve"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = yaml.safe_load(result.stdout)["hydra"]["run"]["dir"]
    assert run_dir == "outputs/train/model=convnext_atto,trainer.epochs=3"


def test_plot_turns_the_run_into_a_png(finished_run):
    run_dir, _ = finished_run
    result = subprocess.run(
        [sys.executable, "-m", "convnext_train.plot", str(run_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Kill at any moment, restart, same weights
# --------------------------------------------------------------------------------------------------
def test_resume_takes_the_newest_whole_step_file_even_when_last_pt_lags_behind(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep_last=5)
    checkpoints.link("last", checkpoints.write_full({"step": 1, "model": {"w": torch.zeros(3)}}, step=1))
    # Killed after step 2's file was renamed into place, before last.pt was linked to it.
    save_checkpoint({"step": 2, "model": {"w": torch.ones(3)}}, tmp_path / "step_000000002.pt")
    assert checkpoints.latest()[1]["step"] == 2
    # A newest file cut short falls back to the one before it, with a warning.
    newest = tmp_path / "step_000000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step_000000002.pt"):
        assert checkpoints.latest()[1]["step"] == 1


def test_a_resume_on_another_number_of_processes_gives_every_rank_a_new_stream():
    def draws_after(rank: int, resumed_at_step: int | None, seed: int = 2**32 - 1) -> tuple:
        torch.manual_seed(123)  # the stream each rank stood in before
        np.random.seed(123)
        reseed_per_rank(seed, Processes(rank=rank, world_size=2), resumed_at_step=resumed_at_step)
        return torch.rand(4), np.random.rand(4)

    untouched = draws_after(0, None)  # a fresh run: rank 0 goes on with its stream, as one process
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(untouched[0], torch.rand(4)) and np.array_equal(untouched[1], np.random.rand(4))
    # Resumed (with the largest seed): rank 0 too leaves the stream it had, each rank its own way,
    # the same way every time and differently at another step.
    rank0, rank1 = draws_after(0, 7), draws_after(1, 7)
    assert not torch.equal(rank0[0], untouched[0]) and not np.array_equal(rank0[1], untouched[1])
    assert not torch.equal(rank0[0], rank1[0])
    assert torch.equal(draws_after(0, 7)[0], rank0[0]) and not torch.equal(draws_after(0, 8)[0], rank0[0])


# --------------------------------------------------------------------------------------------------
# Bad input: one clear line, a non-zero exit code, nothing lost
# --------------------------------------------------------------------------------------------------
def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message
    return message


INVALID_VALUES = [
    ("trainer.precision=fp8", "trainer.precision=fp8"),
    ("trainer.global_batch_size=12", "trainer.global_batch_size=12"),
    ("optimizer.lr=-1", "optimizer.lr=-1"),
    ("aug.reprob=1.5", "aug.reprob=1.5"),
    ("ema.decay=1", "ema.decay=1"),
    ("trainer.strategy=zero3", "trainer.strategy=zero3"),
    ("trainer.strategy=fsdp trainer.precision=fp16", "fp16 is not supported with trainer.strategy=fsdp"),
    ("trainer.seed=-1", "trainer.seed=-1"),
    ("aug.remode=zeros", "aug.remode=zeros"),
    ("aug.auto_augment=rand-m9-x1", "aug.auto_augment=rand-m9-x1"),  # timm only asserts
    ("checkpoint.format=zip", "checkpoint.format=zip"),
    ("checkpoint.async_save=true", "needs checkpoint.format=dcp (it is full here)"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0"),
    ("trainer.slow_work_timeout_minutes=0", "trainer.slow_work_timeout_minutes=0"),
]
BAD_EVAL = ["eval.precision=bf32", "eval.device=gpu", "eval.crop_pct=0", "eval.batch_size=0"]


class _Payload:
    """Unpickling this runs `Path.touch` on the marker: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def runs(finished_run, tiny_imagefolder, module_tmp_path) -> dict:
    """The train.py / eval.py commands of the tests below, each as `python train.py ...` runs it, in one
    interpreter (conftest.run_scripts): most stop before any compute (bad input) or run a few tiny
    steps, so their cost is the start-up, paid once here. Keyed by case; `case_dir(root, case)` is
    where each ran, `root` the folder they share."""
    root = module_tmp_path / "runs"
    empty = root / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    finished, last = finished_run[0], finished_run[0] / "checkpoints" / "last.pt"
    rerun = shutil.copytree(finished, case_dir(root, "rerun"))  # a copy: the rerun records its own command
    hostile = root / "hostile.pth"
    torch.save({"model": {}, "extra": _Payload(root / "payload-ran")}, hostile)
    three_classes = make_imagefolder(root / "three", classes=3)
    scored = ["model=convnext_atto", f"data.root={tiny_imagefolder}", "data.num_classes=4", "data.img_size=32"]
    commands = {
        "missing root": ("train.py", tiny_run(root / "nowhere", case_dir(root, "missing root"))),
        "unset imagenet": ("train.py", ["model=convnext_atto", "data=imagenet", f"hydra.run.dir={root / 'unset'}"]),
        "unset ffcv": ("train.py", ["model=convnext_atto", "data=ffcv", f"hydra.run.dir={root / 'unset-ffcv'}"]),
        "eval settings": ("eval.py", ["model=convnext_atto", *BAD_EVAL, f"hydra.run.dir={root / 'eval'}"]),
        "empty root": ("train.py", tiny_run(empty, case_dir(root, "empty root"))),
        "unknown model": ("train.py", [*tiny_run(tiny_imagefolder, case_dir(root, "unknown")), "model=convnext_tinyy"]),
        "no row": (
            "train.py",
            ["experiment=ft_in1k_384", "model=convnext_t", f"data.root={tiny_imagefolder}", f"hydra.run.dir={root}"],
        ),
        "long warmup": (
            "train.py",
            [*tiny_run(tiny_imagefolder, case_dir(root, "long warmup")), "scheduler.warmup_epochs=3"],
        ),
        **{
            override: ("train.py", [*tiny_run(tiny_imagefolder, case_dir(root, override)), *override.split()])
            for override, _ in INVALID_VALUES
        },
        "hostile": ("eval.py", ["model=convnext_atto", f"checkpoint={hostile}", f"hydra.run.dir={root / 'hostile'}"]),
        "other architecture": ("eval.py", ["model=convnext_femto", f"checkpoint={last}", "data.num_classes=4"]),
        "rerun": ("train.py", tiny_run(tiny_imagefolder, rerun)),
        "eval": (
            "eval.py",
            [
                *scored,
                "data.num_workers=0",
                f"checkpoint=[{last},{last}]",
                "eval.use_ema=true",
                f"hydra.run.dir={root / 'scored'}",
            ],
        ),
        "non-finite": (
            "train.py",
            [
                *tiny_run(tiny_imagefolder, case_dir(root, "non-finite"), "checkpoint.every_minutes=0.0001"),
                *["optimizer.lr=1e30", "scheduler.warmup_epochs=0", "ema.enabled=false"],
            ],
        ),
        "finetune": (
            "train.py",
            [
                *tiny_run(three_classes, case_dir(root, "finetune"), "data.num_classes=3", "trainer.epochs=1"),
                *[f"finetune.checkpoint={last}", "optimizer.lr=1e-12", "finetune.use_ema=true"],
            ],
        ),
        "scaled lr": (
            "train.py",
            tiny_run(
                tiny_imagefolder,
                case_dir(root, "scaled lr"),
                *["optimizer.scale_lr_with_batch=true", "optimizer.lr_reference_batch=64", "trainer.epochs=1"],
                "scheduler.warmup_epochs=1",
            ),
        ),
        "no val split": (
            "train.py",
            tiny_run(tiny_imagefolder, case_dir(root, "no val split"), "data.val_split=null", "trainer.epochs=1"),
        ),
    }
    last_before_rerun = (rerun / "checkpoints" / "last.pt").stat().st_mtime_ns
    results = run_scripts(list(commands.values()))
    return {"root": root, "last_before_rerun": last_before_rerun, **dict(zip(commands, results, strict=True))}


def case_dir(root: Path, case: str) -> Path:
    return root / case.replace(" ", "_").replace("=", "-")


def test_missing_data_root_explains_the_layout(runs):
    nowhere = str(runs["root"] / "nowhere")
    assert_user_error(runs["missing root"], nowhere, "<root>/train/<class>/", "prepare_imagenet.py")


@pytest.mark.parametrize("data, layout", [("imagenet", "<root>/train/<class>/"), ("ffcv", "train.beton")])
def test_unset_data_root_is_asked_for_with_the_layout(runs, data, layout):
    assert_user_error(runs[f"unset {data}"], "set data.root", layout)


def test_eval_settings_are_checked_before_anything_loads(runs):
    assert_user_error(runs["eval settings"], *BAD_EVAL)


def test_empty_data_root_explains_the_layout(runs):
    assert_user_error(runs["empty root"], "no usable images", "<root>/train/<class>/")


def test_unknown_model_lists_the_variants(runs):
    result = runs["unknown model"]
    assert result.returncode != 0
    assert "Could not find 'model/convnext_tinyy'" in result.stderr
    assert "convnext_t\n" in result.stderr and "convnextv2_atto" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, key", INVALID_VALUES)
def test_invalid_config_value_fails_before_any_compute(runs, override, key):
    assert_user_error(runs[override], key)
    assert not (case_dir(runs["root"], override) / "checkpoints").exists()


def test_train_py_without_an_optional_extra_says_how_to_install_it(tmp_path):
    """The imports fail for real: None in sys.modules stops each, as a missing package does. (The
    other data=ffcv and data=hf errors are UserErrors from the same places: train.py prints them the
    same way.)"""
    ffcv, hf = run_scripts(
        [
            ("train.py", ["data=ffcv", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'ffcv'}"], ["ffcv"]),
            (
                "train.py",
                ["data=hf", f"data.root={tmp_path}", "data.num_classes=4", f"hydra.run.dir={tmp_path / 'hf'}"],
                ["datasets"],
            ),
        ]
    )
    message = assert_user_error(
        ffcv,
        "needs the ffcv package",
        "apt-get install pkg-config libturbojpeg0-dev libopencv-dev",
        "pip install -e '.[ffcv]'",
    )
    assert len(message) < 400
    message = assert_user_error(
        hf, "data.kind=hf needs the Hugging Face datasets package", "pip install 'convnext-train[hf]'"
    )
    assert len(message) < 300


@pytest.mark.slow
def test_corrupt_image_is_named_and_can_be_skipped(tmp_path):
    from conftest import make_imagefolder

    root = make_imagefolder(tmp_path / "data")
    broken = root / "train" / "class_1" / "train_1_3.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    # Read by a DataLoader worker process: the message must still be the one line.
    result = run_script("train.py", *tiny_run(root, tmp_path / "run1"), "trainer.epochs=1", "data.num_workers=1")
    assert_user_error(result, str(broken), "data.skip_corrupt=true")

    result = run_script("train.py", *tiny_run(root, tmp_path / "run2"), "trainer.epochs=1", "data.skip_corrupt=true")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["skipped_images"] == 1  # one epoch sees every training image exactly once


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(runs):
    message = assert_user_error(runs["non-finite"], "non-finite", "step")
    checkpoints = sorted((case_dir(runs["root"], "non-finite") / "checkpoints").glob("step_*.pt"))
    stopped_at = int(message.split("step ")[1].split(";")[0].split()[0])
    for path in checkpoints:
        checkpoint = load(path)
        assert checkpoint["step"] < stopped_at
        assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_eval_refuses_a_checkpoint_for_another_architecture(runs):
    assert_user_error(runs["other architecture"], "different architecture", "shape")


# --------------------------------------------------------------------------------------------------
# eval.py scores what train.py wrote, with the official protocol
# --------------------------------------------------------------------------------------------------
def test_eval_scores_checkpoints_and_agrees_with_training(finished_run, runs):
    run_dir, _ = finished_run
    result = runs["eval"]
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((runs["root"] / "scored" / "eval.json").read_text())
    assert len(scores) == 2 and scores[0]["images"] == 16
    final_eval = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "top1" in r][-1]
    assert scores[0]["top1"] == pytest.approx(final_eval["top1_ema"])
    assert scores[0]["top5"] == pytest.approx(final_eval["top5_ema"])
    assert scores[0]["params"] == 3_695_520 - 996 * 320 - 996 + 0  # atto with a 4-class head
    assert "| convnext_atto |" in result.stdout and "(EMA)" in result.stdout


@pytest.mark.slow
def test_wandb_offline_run_holds_what_metrics_jsonl_holds(tiny_imagefolder, tmp_path):
    from test_metrics import offline_runs, wandb_history, wandb_summary

    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env |= {v: str(tmp_path / v.lower()) for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    result = run_script("train.py", *tiny_run(tiny_imagefolder, run_dir, "logger=wandb", "trainer.epochs=1"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (records,) = offline_runs(run_dir, run_id)
    history = {row["_step"]: row for row in wandb_history(records)}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        logged = history[row["step"]]
        for key, value in row.items():
            if key != "step":
                assert logged[key] == pytest.approx(value), key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert wandb_summary(records)["best_top1"] == summary["best_top1"]


def test_eval_refuses_a_hostile_checkpoint_without_running_it(runs):
    assert_user_error(runs["hostile"], str(runs["root"] / "hostile.pth"), "eval.trust_checkpoint=true")
    assert not (runs["root"] / "payload-ran").exists()


# --------------------------------------------------------------------------------------------------
# The demo learns a real dataset
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_digits_demo_reaches_98_percent_on_the_held_out_split(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("train.py", "experiment=digits", f"data.root={tmp_path / 'digits'}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 20
    assert summary["top1"] >= 98.0 and summary["top1_ema"] >= 98.0
    evaluations = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "top1" in r]
    assert evaluations[0]["top1"] < summary["top1"]  # it learned over the run, not before it
    val_images = sum(1 for _ in (tmp_path / "digits" / "val").rglob("*.png"))
    assert val_images == 360  # held out: the 20% split, never trained on


# --------------------------------------------------------------------------------------------------
# Fine-tuning, lr scaling, pre-training without a validation split
# --------------------------------------------------------------------------------------------------
def test_finetuning_loads_the_backbone_and_reinitialises_a_head_of_another_size(finished_run, runs):
    # An lr of 1e-12 leaves the weights where fine-tuning started them.
    result, tuned_dir = runs["finetune"], case_dir(runs["root"], "finetune")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the head is re-initialised for 3 classes" in result.stdout
    pretrained = load(finished_run[0] / "checkpoints" / "last.pt")["model_ema"]
    tuned = load(tuned_dir / "checkpoints" / "last.pt")["model"]
    assert tuned["head.weight"].shape == (3, 320)
    backbone = [k for k in pretrained if not k.startswith("head.")]
    assert all(torch.allclose(tuned[k], pretrained[k], atol=1e-8) for k in backbone)


def test_lr_follows_the_global_batch_only_when_asked(runs):
    from omegaconf import OmegaConf

    from convnext_train.parts import peak_lr

    cfg = OmegaConf.create(
        {
            "optimizer": {"lr": 4e-3, "lr_reference_batch": 4096, "scale_lr_with_batch": False},
            "trainer": {"global_batch_size": 1024},
        }
    )
    assert peak_lr(cfg) == 4e-3
    cfg.optimizer.scale_lr_with_batch = True
    assert peak_lr(cfg) == pytest.approx(1e-3)
    result = runs["scaled lr"]
    assert result.returncode == 0, result.stderr[-3000:]
    lrs = [r["lr"] for r in read_jsonl(case_dir(runs["root"], "scaled lr") / "metrics.jsonl") if "lr" in r]
    assert max(lrs) == pytest.approx(4e-3 * 16 / 64)


def test_pretraining_without_a_validation_split_skips_evaluation(runs):
    result, pretrained = runs["no val split"], case_dir(runs["root"], "no val split")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [r for r in read_jsonl(pretrained / "metrics.jsonl") if "top1" in r]
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["top1"] is None and summary["best_top1"] is None and summary["best_top1_ema"] is None
    assert load(pretrained / "checkpoints" / "last.pt")["epoch"] == 1


def test_an_experiment_without_a_row_for_the_model_names_the_variants_it_covers(runs):
    assert_user_error(runs["no row"], "ft_in1k_384", "model=convnext_t", "convnext_b, convnext_l")


def test_warmup_longer_than_the_run_is_refused(runs):
    assert_user_error(runs["long warmup"], "scheduler.warmup_epochs=3", "trainer.epochs=2")
