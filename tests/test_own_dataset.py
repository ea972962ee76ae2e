"""A user's own ImageFolder tree, trained as the README says: `data=imagefolder` without
data.num_classes (counted from the class folders), the class names in summary.json and in every
checkpoint layout, the closing summary and its commands, `experiment=finetune` from a checkpoint of
another class count, the one-line note that a small dataset is better fine-tuned, and the printed
eval / predict / plot commands run on the trained checkpoint (the README's three commands)."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_model, make_imagefolder, randomize_, run_script
from hydra import compose, initialize_config_dir

from convnext_train.checkpointing import consolidate
from convnext_train.config import validate_train_config
from convnext_train.configs import CONFIG_DIR
from convnext_train.weights import read_checkpoint

CLASSES = [f"class_{c}" for c in range(4)]  # make_imagefolder's folder names
SCRATCH_NOTE = "unlikely to do well"
# ConvNeXt-atto at 32 px, 64 training images: 4 steps of 16 (2 micro-batches) in one epoch.
TINY = [
    "model=convnext_atto",
    "data.img_size=32",
    "data.num_workers=0",
    "trainer.epochs=1",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=8",
    "trainer.precision=fp32",
    "trainer.log_every=2",
    "scheduler.warmup_epochs=1",
]


@pytest.fixture(scope="module")
def tree(module_tmp_path) -> Path:
    return make_imagefolder(module_tmp_path / "my_images", classes=4)


def run_dir_like_hydras(parent: Path) -> Path:
    # Hydra names run directories after the overrides: `=` and `,` in the path, which the printed
    # commands must quote for Hydra's override grammar.
    return parent / "outputs" / "data.img_size=32,model=convnext_atto"


@pytest.fixture(scope="module")
def scratch(tree, module_tmp_path):
    run_dir = run_dir_like_hydras(module_tmp_path / "scratch")
    args = ["data=imagefolder", f"data.root={tree}", *TINY, f"hydra.run.dir='{run_dir}'"]
    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result, args


@pytest.fixture(scope="module")
def finetuned(tree, module_tmp_path):
    """experiment=finetune from a 10-class ConvNeXt-atto state dict, written as a sharded checkpoint."""
    pretrained = randomize_(build_model("convnext_atto", num_classes=10)).state_dict()
    torch.save(pretrained, module_tmp_path / "atto_10_classes.pt")
    run_dir = module_tmp_path / "finetuned"
    args = [
        "experiment=finetune",
        f"finetune.checkpoint={module_tmp_path / 'atto_10_classes.pt'}",
        f"data.root={tree}",
        *TINY,
        "checkpoint.format=dcp",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result, pretrained


def test_num_classes_null_counts_the_class_folders_before_the_model_is_built(tree):
    # Composed as train.py gets it: model.num_classes still the interpolation ${data.num_classes}.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=["model=convnext_atto", "data=imagefolder", f"data.root={tree}"])
    assert cfg.data.num_classes is None
    validate_train_config(cfg)
    assert cfg.data.num_classes == 4 and cfg.model.num_classes == 4


@pytest.mark.slow
def test_a_run_from_scratch_names_its_classes_and_ends_with_the_next_commands(scratch):
    run_dir, result, _ = scratch
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["class_names"] == CLASSES
    best = read_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["class_names"] == CLASSES
    assert best["config"]["data"]["num_classes"] == 4 and best["model"]["head.weight"].shape[0] == 4
    assert read_checkpoint(run_dir / "checkpoints" / "last.pt")["class_names"] == CLASSES

    lines = result.stdout.splitlines()
    assert sum(SCRATCH_NOTE in line for line in lines) == 1  # once, and the run went on
    assert "experiment=finetune" in next(line for line in lines if SCRATCH_NOTE in line)
    tail = lines[lines.index(next(line for line in lines if line.startswith("done: "))) :]
    assert f"top-1: best {summary['best_top1']:.2f}%, final {summary['top1']:.2f}%" in tail
    assert f"EMA top-1: best {summary['best_top1_ema']:.2f}%, final {summary['top1_ema']:.2f}%" in tail
    assert f"run directory: {run_dir}" in tail
    commands = {line.split()[1]: shlex.split(line, comments=True) for line in tail if line.startswith("  python ")}
    assert commands.keys() == {"eval.py", "-m", "predict.py"}
    # Hydra-quoted (the directory's `=` and `,`); the eval command is read back by Hydra below.
    assert commands["predict.py"][2:] == [
        f'checkpoint="{run_dir}/checkpoints/best.pt"',
        "images=/path/to/new/images",
    ]


@pytest.mark.slow
def test_the_printed_eval_predict_and_plot_commands_run_on_this_run(scratch, tree, tmp_path):
    """The three commands as a user walks them: train (the fixture), then the printed eval command
    (no model=, no data.num_classes) scores the run's best.pt as training's last evaluation did, and
    predict.py names this tree's classes and lists the file it cannot read."""
    run_dir, result, _ = scratch
    printed = {
        line.split()[1]: shlex.split(line, comments=True)
        for line in result.stdout.splitlines()
        if line.startswith("  python ")
    }
    evaluated = run_script("eval.py", *printed["eval.py"][2:], f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert scores["model"] == "convnext_atto" and scores["img_size"] == 32 and scores["images"] == 16
    assert scores["top1"] == pytest.approx(summary["best_top1"])  # one epoch: best.pt is the last evaluation
    assert set(scores["per_class"]) == set(CLASSES)

    images = shutil.copytree(tree / "val", tmp_path / "new_shots")
    (images / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    predictions = tmp_path / "predictions.csv"
    predict_args = [a for a in printed["predict.py"][2:] if not a.startswith("images=")]
    predicted = run_script("predict.py", *predict_args, f"images={images}", f"out={predictions}", "topk=2")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    with predictions.open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 17  # 16 images and the unreadable one
    (broken,) = [row for row in rows if row["error"]]
    assert broken["path"].endswith("broken.jpg") and not broken["class_1"]
    readable = [row for row in rows if not row["error"]]
    assert all(row["class_1"] in CLASSES and row["class_2"] in CLASSES for row in readable)
    assert all(float(row["prob_1"]) >= float(row["prob_2"]) for row in readable)

    plot = subprocess.run([sys.executable, *printed["-m"][1:]], cwd=REPO, capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert (run_dir / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_resuming_on_other_class_folders_stops_naming_the_class(scratch, tree, tmp_path):
    run_dir, _, args = scratch
    renamed = shutil.copytree(tree, tmp_path / "renamed")
    for split in ("train", "val"):
        (renamed / split / "class_3").rename(renamed / split / "class_x")
    result = run_script("train.py", *[f"data.root={renamed}" if a.startswith("data.root=") else a for a in args])
    assert result.returncode == 2
    assert "'class_3' as class 3, the data has 'class_x' there" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_finetune_starts_from_the_checkpoint_with_a_fresh_head_and_keeps_the_names_when_consolidated(
    finetuned, tmp_path
):
    run_dir, result, pretrained = finetuned
    assert SCRATCH_NOTE not in result.stdout
    assert "the head is re-initialised for 4 classes" in result.stdout
    best = run_dir / "checkpoints" / "best"
    assert best.is_dir()  # sharded: the names travel in its meta.pt
    consolidate(best, tmp_path / "model.pt")
    tuned = read_checkpoint(tmp_path / "model.pt")
    assert tuned["class_names"] == CLASSES
    assert tuned["model"]["head.weight"].shape[0] == 4
    # Layer decay leaves the stem at ~5% of a small lr for 4 steps: still the pre-trained weights.
    stem = tuned["model"]["downsample_layers.0.0.weight"]
    assert (stem - pretrained["downsample_layers.0.0.weight"]).norm() < 0.01 * stem.norm()
    assert f"checkpoint={best}" in result.stdout  # the closing summary names the sharded checkpoint


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # The class count is on the printed eval command only where eval.py could not have it otherwise.
        (["data=hf", "data.root=/d", "data.num_classes=7"], {"data": "hf", "data.root": "/d", "data.num_classes": 7}),
        (["data=imagenet", "data.root=/d"], {"data.root": "/d"}),  # eval.yaml's group and its 1000
        (["data=imagenet", "data.root=/d", "data.num_classes=100"], {"data.root": "/d", "data.num_classes": 100}),
        (["data=imagefolder", "data.root=/d", "data.num_classes=3"], {"data": "imagefolder", "data.root": "/d"}),
        (
            ["data=digits", "data.root=/d", "data.img_size=32"],
            {"data": "digits", "data.root": "/d", "data.img_size": 32},
        ),
    ],
)
def test_the_printed_eval_command_names_what_eval_py_cannot_know(overrides, expected):
    from hydra.core.hydra_config import HydraConfig

    from convnext_train.configs import compose_train
    from convnext_train.next_steps import _eval_overrides

    cfg = compose_train(overrides)
    HydraConfig.instance().set_config(cfg)  # as train.py's Hydra app has it
    try:
        found = _eval_overrides(cfg)
    finally:
        HydraConfig.instance().cfg = None  # the tests after this one in this process see no Hydra app
    found.pop("eval.crop_pct", None)  # the data group's aug recipe, not what this test is about
    assert found == expected
