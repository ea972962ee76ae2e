"""The training recipes equal the official ones, value by value.

Sources: the ConvNeXt paper (appendix A.1), facebookresearch/ConvNeXt TRAINING.md with main.py's
defaults for every flag its commands leave out, and facebookresearch/ConvNeXt-V2 TRAINING.md with
main_finetune.py's defaults. The table below restates them independently of conf/; the tests compose
each (variant, recipe) as train.py does and compare every value. Most compose in this process
(Hydra's compose API); a few real `train.py --cfg job --resolve` runs prove the CLI agrees.
The layer-decay parameter groups are checked against the official rules in tests/test_optim.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_imagefolder, run_script
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationKeyError
from test_train import official_cosine_scheduler, read_jsonl
from timm.data.auto_augment import RandAugment
from torchvision import transforms

from convnext_train.config import validate_train_config
from convnext_train.data.transforms import train_transform
from convnext_train.models import ConvNeXt
from convnext_train.parts import peak_lr
from convnext_train.readme.recipes import END, START, compose_config, markdown_table, recipes
from convnext_train.schedule import cosine_lr

ABSENT = object()  # a key the composed config must not have

# --------------------------------------------------------------------------------------------------
# The official recipes
# --------------------------------------------------------------------------------------------------
# ImageNet-1K from scratch: `main.py --model <v> --drop_path <dp> --lr 4e-3 --model_ema true
# --model_ema_eval true` at an effective batch of 4096; everything else is a main.py default.
IN1K = {
    "trainer.epochs": 300,
    "trainer.global_batch_size": 4096,
    "optimizer.name": "adamw",
    "optimizer.lr": 4e-3,
    "optimizer.lr_reference_batch": 4096,
    "optimizer.scale_lr_with_batch": False,
    "optimizer.betas": [0.9, 0.999],  # --opt_betas None: torch's AdamW default
    "optimizer.eps": 1e-8,
    "optimizer.weight_decay": 0.05,  # --weight_decay_end None: constant
    "optimizer.layer_decay": 1.0,
    "scheduler.warmup_epochs": 20,
    "scheduler.min_lr": 1e-6,
    "trainer.clip_grad": None,
    "aug.random_resized_crop": True,
    "aug.scale": [0.08, 1.0],
    "aug.ratio": [3 / 4, 4 / 3],
    "aug.hflip": 0.5,
    "aug.train_interpolation": "bicubic",
    "aug.auto_augment": "rand-m9-mstd0.5-inc1",
    "aug.reprob": 0.25,
    "aug.remode": "pixel",
    "aug.recount": 1,
    "aug.mixup": 0.8,
    "aug.cutmix": 1.0,
    "aug.mixup_prob": 1.0,
    "aug.mixup_switch_prob": 0.5,
    "aug.mixup_mode": "batch",
    "aug.label_smoothing": 0.1,
    "aug.crop_pct": 0.875,  # --crop_pct None: 224 / 256
    "model.layer_scale_init_value": 1e-6,
    "model.head_init_scale": 1.0,
    "ema.enabled": True,
    "ema.decay": 0.9999,
    "data.img_size": 224,
    "data.num_classes": 1000,
    "model.num_classes": 1000,
    "data.val_split": "val",
    "finetune.checkpoint": None,
}

# `--warmup_epochs 5 --epochs 90 --nb_classes 21841 --disable_eval true`, no --model_ema.
IN22K_PRETRAIN = {
    "trainer.epochs": 90,
    "scheduler.warmup_epochs": 5,
    "data.num_classes": 21841,
    "model.num_classes": 21841,
    "data.val_split": None,
    "ema.enabled": False,
}

# Both V1 fine-tuning recipes: `--lr 5e-5 --warmup_epochs 0 --epochs 30 --weight_decay 1e-8
# --head_init_scale 0.001 --cutmix 0 --mixup 0` at an effective batch of 512; RandAugment, random
# erasing, label smoothing and min_lr keep main.py's defaults.
V1_FINETUNE = {
    "trainer.epochs": 30,
    "trainer.global_batch_size": 512,
    "trainer.micro_batch_size": 16,
    "optimizer.lr": 5e-5,
    "optimizer.lr_reference_batch": 512,
    "optimizer.weight_decay": 1e-8,
    "scheduler.warmup_epochs": 0,
    "model.head_init_scale": 0.001,
    "aug.mixup": 0.0,
    "aug.cutmix": 0.0,
}
FT_IN1K_384 = V1_FINETUNE | {
    "optimizer.layer_decay": 0.7,
    "data.img_size": 384,
    "aug.crop_pct": 1.0,
    "ema.enabled": False,
}
FT_IN22K_IN1K = V1_FINETUNE | {"optimizer.layer_decay": 0.8}

# ConvNeXt V2 fine-tuning: main_finetune.py at an effective batch of 1024 (4 nodes x 8 GPUs x 32),
# lr = blr x 1024 / 256, `--model_ema True`, head_init_scale 0.001 by default. V2 has no layer scale.
V2_FINETUNE = {
    "trainer.global_batch_size": 1024,
    "trainer.micro_batch_size": 32,
    "optimizer.lr_reference_batch": 1024,
    "model.head_init_scale": 0.001,
    "model.layer_scale_init_value": ABSENT,
}


def v2_row(blr, epochs, warmup, layer_decay, weight_decay, drop_path, mixup, cutmix, smoothing) -> dict:
    """One TRAINING.md command, in its flags' order."""
    return V2_FINETUNE | {
        "optimizer.lr": blr * 1024 / 256,
        "trainer.epochs": epochs,
        "scheduler.warmup_epochs": warmup,
        "optimizer.layer_decay": layer_decay,
        "optimizer.weight_decay": weight_decay,
        "model.drop_path_rate": drop_path,
        "aug.mixup": mixup,
        "aug.cutmix": cutmix,
        "aug.label_smoothing": smoothing,
    }


@dataclass(frozen=True)
class Case:
    model: str
    experiment: str | None
    changes: dict  # the values that differ from IN1K
    overrides: tuple[str, ...] = ()
    id: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "id", " ".join([self.model, self.experiment or "in1k", *self.overrides]))

    @property
    def values(self) -> dict:
        return IN1K | self.changes


def drop_path(rate: float) -> dict:
    return {"model.drop_path_rate": rate}


CASES = [
    Case("convnext_t", None, drop_path(0.1)),
    Case("convnext_s", None, drop_path(0.4)),
    Case("convnext_b", None, drop_path(0.5)),
    Case("convnext_l", None, drop_path(0.5)),
    # Isotropic: `--warmup_epochs 50`; S and B also `--layer_scale_init_value 0`.
    Case(
        "convnext_iso_s",
        "in1k_isotropic",
        drop_path(0.1) | {"scheduler.warmup_epochs": 50, "model.layer_scale_init_value": 0.0},
    ),
    Case(
        "convnext_iso_b",
        "in1k_isotropic",
        drop_path(0.2) | {"scheduler.warmup_epochs": 50, "model.layer_scale_init_value": 0.0},
    ),
    Case("convnext_iso_l", "in1k_isotropic", drop_path(0.5) | {"scheduler.warmup_epochs": 50}),
    # ImageNet-22K: B/L/XL from TRAINING.md, T/S from the paper.
    Case("convnext_t", "in22k_pretrain", IN22K_PRETRAIN | drop_path(0.0)),
    Case("convnext_s", "in22k_pretrain", IN22K_PRETRAIN | drop_path(0.0)),
    Case("convnext_b", "in22k_pretrain", IN22K_PRETRAIN | drop_path(0.1)),
    Case("convnext_l", "in22k_pretrain", IN22K_PRETRAIN | drop_path(0.1)),
    Case("convnext_xl", "in22k_pretrain", IN22K_PRETRAIN | drop_path(0.2)),
    Case("convnext_b", "ft_in1k_384", FT_IN1K_384 | drop_path(0.8)),
    Case("convnext_l", "ft_in1k_384", FT_IN1K_384 | drop_path(0.95)),
    # ImageNet-22K -> 1K: the same flags at 224 and 384; only XL's commands add --model_ema true.
    Case("convnext_b", "ft_in22k_in1k", FT_IN22K_IN1K | drop_path(0.2) | {"ema.enabled": False}),
    Case("convnext_l", "ft_in22k_in1k", FT_IN22K_IN1K | drop_path(0.3) | {"ema.enabled": False}),
    Case("convnext_xl", "ft_in22k_in1k", FT_IN22K_IN1K | drop_path(0.4)),
    Case(
        "convnext_b",
        "ft_in22k_in1k",
        FT_IN22K_IN1K | drop_path(0.2) | {"ema.enabled": False, "data.img_size": 384},
        ("data.img_size=384",),
    ),
    Case(
        "convnext_l",
        "ft_in22k_in1k",
        FT_IN22K_IN1K | drop_path(0.3) | {"ema.enabled": False, "data.img_size": 384},
        ("data.img_size=384",),
    ),
    Case(
        "convnext_xl", "ft_in22k_in1k", FT_IN22K_IN1K | drop_path(0.4) | {"data.img_size": 384}, ("data.img_size=384",)
    ),
    Case("convnextv2_atto", "v2_ft_in1k", v2_row(2e-4, 600, 0, 0.9, 0.3, 0.1, 0.0, 0.0, 0.2)),
    Case("convnextv2_t", "v2_ft_in1k", v2_row(8e-4, 300, 40, 0.9, 0.05, 0.2, 0.8, 1.0, 0.1)),
    Case("convnextv2_b", "v2_ft_in1k", v2_row(6.25e-4, 100, 20, 0.6, 0.05, 0.1, 0.8, 1.0, 0.1)),
]
IDS = [case.id for case in CASES]


@cache
def composed(model: str, experiment: str | None = None, overrides: tuple[str, ...] = ()):
    return compose_config(model, experiment, overrides)


def config_of(case: Case):
    return composed(case.model, case.experiment, case.overrides)


def leaves(cfg) -> dict:
    """Every value of a config by its dotted key (`???` for a mandatory one left unset)."""

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(OmegaConf.to_container(cfg), ""))


# --------------------------------------------------------------------------------------------------
# Every value of every recipe
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_hyperparameter_equals_the_official_recipe(case):
    values = leaves(config_of(case))
    wrong = {}
    for key, expected in case.values.items():
        actual = values.get(key, ABSENT)
        same_type = type(actual) is type(expected) or (isinstance(expected, float) and type(actual) is int)
        if not (same_type and actual == expected):
            wrong[key] = (
                f"{actual!r}, the official recipe has {'no such key' if expected is ABSENT else repr(expected)}"
            )
    assert not wrong, wrong


@pytest.mark.parametrize("case", [c for c in CASES if c.experiment], ids=[c.id for c in CASES if c.experiment])
def test_an_experiment_changes_only_what_its_recipe_changes(case):
    base, tuned = leaves(composed(case.model)), leaves(config_of(case))
    table = case.experiment + "."  # the experiment's per-variant rows, under a key of their own
    changed = {
        key
        for key in base.keys() | tuned.keys()
        if not key.startswith(table) and base.get(key, ABSENT) != tuned.get(key, ABSENT)
    }
    assert changed <= case.changes.keys(), f"changed beyond the recipe: {sorted(changed - case.changes.keys())}"


def test_the_table_covers_every_recipe_the_readme_lists():
    listed = {" ".join([m, r.experiment or "in1k", *r.overrides]) for r in recipes() for m in r.models}
    assert listed == set(IDS)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_randaugment_is_on_and_colour_jitter_off(case):
    # timm drops colour jitter whenever RandAugment is on: the official recipe trained without it.
    steps = train_transform(config_of(case).aug, 224).transforms
    assert any(isinstance(t, RandAugment) for t in steps)
    assert not any(isinstance(t, transforms.ColorJitter) for t in steps)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_global_batch_fills_on_1_8_and_32_devices_with_the_lr_stated_at_it(case):
    # A copy (config_of's result is shared), with the one key every recipe leaves to the command line.
    cfg = OmegaConf.merge(config_of(case), {"data": {"root": "/datasets/imagenet"}})
    for devices in (1, 8, 32):
        validate_train_config(cfg, world_size=devices)
    assert cfg.optimizer.lr_reference_batch == cfg.trainer.global_batch_size


@pytest.mark.parametrize(
    "model, experiment",
    [
        ("convnext_b", "in1k_isotropic"),
        ("convnext_iso_s", "in22k_pretrain"),
        ("convnext_t", "ft_in1k_384"),
        ("convnext_t", "ft_in22k_in1k"),
        ("convnextv2_h", "v2_ft_in1k"),
    ],
)
def test_a_variant_without_a_row_names_the_experiment_and_the_variant(model, experiment):
    with pytest.raises(InterpolationKeyError, match=rf"Interpolation key '{experiment}\.{model}\.\w+' not found"):
        compose_config(model, experiment)


# --------------------------------------------------------------------------------------------------
# The lr of every step
# --------------------------------------------------------------------------------------------------
IMAGENET_1K_TRAIN_IMAGES = 1_281_167


@pytest.mark.parametrize(
    "model, experiment, official",
    [
        # official cosine_scheduler(lr, min_lr, epochs, niter_per_ep, warmup_epochs)
        ("convnext_t", None, (4e-3, 1e-6, 300, 312, 20)),
        ("convnext_iso_s", "in1k_isotropic", (4e-3, 1e-6, 300, 312, 50)),
        ("convnext_b", "ft_in1k_384", (5e-5, 1e-6, 30, 2502, 0)),
    ],
)
def test_lr_of_every_imagenet_step_equals_the_official_cosine_scheduler(model, experiment, official):
    cfg = composed(model, experiment)
    steps_per_epoch = IMAGENET_1K_TRAIN_IMAGES // cfg.trainer.global_batch_size
    assert steps_per_epoch == official[3]
    # As the trainer wires it (build_run): warmup and total in optimizer steps, peak from peak_lr.
    total_steps = cfg.trainer.epochs * steps_per_epoch
    lr_at = partial(
        cosine_lr,
        base_lr=peak_lr(cfg),
        min_lr=cfg.scheduler.min_lr,
        warmup_steps=round(cfg.scheduler.warmup_epochs * steps_per_epoch),
        total_steps=total_steps,
    )
    lrs = [lr_at(step) for step in range(total_steps)]
    assert lrs == official_cosine_scheduler(*official).tolist()


# --------------------------------------------------------------------------------------------------
# The CLI composes the same configs; the README table is current
# --------------------------------------------------------------------------------------------------
# train.py run once per command line in one interpreter (runpy, as `python train.py` runs it), so that
# Python and Hydra start once: each command's exit code, stdout and stderr, as JSON.
EACH_COMMAND = """
import contextlib, io, json, runpy, sys
results = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["train.py", *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as exit:
            code = exit.code
    results.append((code, out.getvalue(), err.getvalue()))
print(json.dumps(results))
"""


@pytest.mark.slow
def test_train_py_composes_the_same_configs_and_names_a_missing_row():
    commands = [
        [f"model={c.model}", *([f"experiment={c.experiment}"] if c.experiment else []), *c.overrides] for c in CASES
    ]
    commands.append(["model=convnext_t", "experiment=ft_in1k_384"])
    # `--cfg job` prints the composed config and returns before train.py imports torch.
    commands = [[*args, "--cfg", "job", "--resolve"] for args in commands]
    ran = subprocess.run(
        [sys.executable, "-c", EACH_COMMAND, json.dumps(commands)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    results = json.loads(ran.stdout)
    assert len(results) == len(commands)
    for case, (code, stdout, stderr) in zip(CASES, results, strict=False):
        assert code == 0, stderr[-2000:]
        assert yaml.safe_load(stdout) == OmegaConf.to_container(config_of(case)), case.id
    code, _, stderr = results[-1]
    assert code != 0
    assert stderr.strip().splitlines()[-1] == (
        "omegaconf.errors.InterpolationKeyError: Interpolation key 'ft_in1k_384.convnext_t.drop_path_rate' not found"
    )


def test_readme_recipe_table_is_current():
    text = (REPO / "README.md").read_text()
    section = text.split(START)[1].split(END)[0].strip()
    assert section == markdown_table(), "run: python -m convnext_train.readme.recipes --update README.md"


# --------------------------------------------------------------------------------------------------
# End to end on the CPU
# --------------------------------------------------------------------------------------------------
TINY_DATA = [
    "data.num_classes=2",
    "data.num_workers=0",
    "trainer.epochs=1",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.precision=fp32",
    "trainer.log_every=1",
]


@pytest.fixture(scope="module")
def two_classes(module_tmp_path) -> Path:
    return make_imagefolder(module_tmp_path / "two_classes", classes=2, train_per_class=8, val_per_class=2, size=32)


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_the_full_imagenet_recipe_trains_end_to_end(two_classes, tmp_path):
    # Every augmentation and regulariser of the recipe on: only data, batch, epochs and precision
    # shrink, and the 20 warmup epochs, which cannot fit into one.
    result = run_script(
        "train.py",
        "model=convnext_t",
        f"data.root={two_classes}",
        "data.img_size=32",
        *TINY_DATA,
        "scheduler.warmup_epochs=0",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = last_checkpoint(tmp_path)
    config = leaves(OmegaConf.create(checkpoint["config"]))
    recipe = {
        k: v
        for k, v in IN1K.items()
        if not k.startswith(("trainer.", "data.", "model.num_classes", "scheduler.warmup"))
    }
    assert {k: config[k] for k in recipe} == recipe
    assert config["model.drop_path_rate"] == 0.1 and "model_ema" in checkpoint
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["top1_ema"] is not None


def test_fine_tuning_at_a_higher_resolution_from_a_checkpoint_end_to_end(two_classes, tmp_path):
    # ConvNeXt-B's depths at a tiny width: the official 12-group layer decay, cheap on a CPU.
    tiny_b = ["model=convnext_b", "model.dims=[8,16,32,64]"]
    pretrained = tmp_path / "pretrained.pth"
    torch.save({"model": ConvNeXt(depths=(3, 3, 27, 3), dims=(8, 16, 32, 64), num_classes=5).state_dict()}, pretrained)
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        *tiny_b,
        "experiment=ft_in1k_384",
        f"finetune.checkpoint={pretrained}",
        f"data.root={two_classes}",
        "data.img_size=64",
        *TINY_DATA,
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the head is re-initialised for 2 classes" in result.stdout
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "lr" in r]
    assert lrs == official_cosine_scheduler(5e-5, 1e-6, epochs=1, niter_per_ep=2, warmup_epochs=0).tolist()
    checkpoint = last_checkpoint(run_dir)
    # Layer decay 0.7 over the official 12 layers + head: lr scales 0.7^13 .. 1.
    assert sorted({round(g["lr_scale"], 12) for g in checkpoint["optimizer"]["param_groups"]}) == sorted(
        round(0.7**k, 12) for k in range(14)
    )
    assert checkpoint["config"]["model"]["drop_path_rate"] == 0.8 and "model_ema" not in checkpoint
