"""The end of a training run as the user sees it: the closing summary (scores, run directory and the
eval / plot / predict commands for that run, ready to paste) and the note that a small dataset is
better fine-tuned than trained from scratch. Plain text from the config and summary.json's numbers;
no library does this part.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from convnext_train import configs
from convnext_train.data.sources import source

# Below this many training images, a run from scratch gets the note. The paper trains from scratch on
# ImageNet-1K (1.28 M images) and up; where a dataset stops being enough is a judgement call: 50k is
# CIFAR's size, on which ConvNets from scratch need their own recipe and lose to fine-tuned ones.
SMALL_DATASET_IMAGES = 50_000


def closing_summary(summary: dict[str, Any], cfg: DictConfig, run_dir: Path, checkpoints: Path) -> str:
    """What rank 0 prints last: the scores (`summary`, as in summary.json), where the run is, and the
    commands that come next for its checkpoints (in the `checkpoints` directory)."""
    epochs = summary["epochs"]
    lines = [f"done: {epochs} epoch{'s' * (epochs != 1)}, {summary['steps']} steps in {summary['wall_seconds']:.0f} s"]
    if summary.get("best_top1") is not None:
        lines.append(f"top-1: best {summary['best_top1']:.2f}%, final {summary['top1']:.2f}%")
    if summary.get("best_top1_ema") is not None:
        lines.append(f"EMA top-1: best {summary['best_top1_ema']:.2f}%, final {summary['top1_ema']:.2f}%")
    if summary.get("best_val_loss") is not None:  # FCMAE pre-training (task=fcmae)
        lines.append(f"reconstruction loss: best {summary['best_val_loss']:.4f}, final {summary['val_loss']:.4f}")
    lines.append(f"run directory: {run_dir}")
    if cfg.task == "fcmae":
        return "\n".join([*lines, "next:", *_fine_tuning_lines(cfg, checkpoints, run_dir)])
    name = "best" if summary.get("best_top1") is not None else "last"
    # A full file (`best.pt`) or, sharded, a link to a directory (`best`): eval.py and predict.py read both.
    checkpoint = _entry(checkpoints, name)
    lines.append("next:")
    if checkpoint is not None and summary.get("best_top1") is not None:
        lines.append("  " + _command("python eval.py", checkpoint=checkpoint, **_eval_overrides(cfg)))
    lines.append(f"  python -m convnext_train.plot {shlex.quote(str(run_dir))}")
    if checkpoint is not None:  # None only where someone moved the checkpoints away
        predict = _command("python predict.py", checkpoint=checkpoint)
        lines.append(f"  {predict} images=/path/to/new/images  # a folder or a glob")
    return "\n".join(lines)


def _entry(checkpoints: Path, name: str) -> Path | None:
    """`<name>.pt` (a full file) or `<name>` (sharded: a link to a directory), whichever exists."""
    return next((path for path in (checkpoints / f"{name}.pt", checkpoints / name) if path.exists()), None)


def _fine_tuning_lines(cfg: DictConfig, checkpoints: Path, run_dir: Path) -> list[str]:
    """After FCMAE pre-training: fine-tune the encoder (the official recipe where it has a row for the
    model, else the own-dataset one), and the reconstructions to look at."""
    model = HydraConfig.get().runtime.choices.get("model")
    checkpoint = _entry(checkpoints, "last") or checkpoints / "last.pt"
    experiment = "v2_ft_in1k" if model in configs.load("experiment", "v2_ft_in1k").v2_ft_in1k else "finetune"
    command = _command("python train.py", model=model, experiment=experiment, **{"finetune.checkpoint": checkpoint})
    return [
        f"  {command} data.root=/path/to/labelled/images  # fine-tune the encoder (decoder dropped)",
        f"  open {shlex.quote(str(run_dir / 'reconstructions.png'))}  # validation images: original, masked, predicted, pasted",
    ]


def _eval_overrides(cfg: DictConfig) -> dict[str, Any]:
    """eval.py's data keys for this run's validation split (eval.py takes the architecture from the
    checkpoint): its data group, root, and the sizes where they differ from eval.yaml's defaults."""
    overrides: dict[str, Any] = {}
    data_choice = HydraConfig.get().runtime.choices.get("data")
    if data_choice != "imagenet":  # eval.yaml's default data group
        overrides["data"] = data_choice
    if cfg.data.get("root") is not None:
        overrides["data.root"] = cfg.data.root
    # The class count where the data group neither fixes this one (digits: 10) nor counts it (null: the
    # class folders); `???` (hf) must be given.
    group = configs.load("data", data_choice)
    if OmegaConf.is_missing(group, "num_classes") or group.num_classes not in (None, cfg.data.num_classes):
        overrides["data.num_classes"] = cfg.data.num_classes
    if cfg.data.img_size != 224:
        overrides["data.img_size"] = cfg.data.img_size
    if cfg.aug.crop_pct != 0.875:
        overrides["eval.crop_pct"] = cfg.aug.crop_pct
    return overrides


def _command(program: str, **overrides: Any) -> str:
    """A command line a shell and Hydra both read back as these values: a run directory named by
    Hydra holds `=` and `,`, which Hydra's override grammar takes for a sweep unless quoted."""
    words = [program]
    for key, value in overrides.items():
        text = str(value)
        if not re.fullmatch(r"[\w/.:+@%~-]+", text):
            text = '"' + text.replace('"', '\\"') + '"'  # Hydra's quoted string: only quotes are escaped
        words.append(shlex.quote(f"{key}={text}"))
    return " ".join(words)


def warn_if_small_from_scratch(cfg: DictConfig, train_images: int) -> None:
    """A ConvNeXt trained from random weights on a few thousand images of one's own seldom reaches what
    a fine-tuned pre-trained one does: say so once, without stopping. (The bundled demo is such a run on
    purpose, and synthetic data only measures speed.)"""
    pretraining = cfg.task != "classification"  # FCMAE: learning from one's own unlabeled images is the point
    if (
        pretraining
        or cfg.finetune.checkpoint
        or not source(cfg.data.kind).real_images
        or train_images >= SMALL_DATASET_IMAGES
    ):
        return
    print(
        f"note: the training set has {train_images:,} images and finetune.checkpoint is not set: a ConvNeXt "
        "trained from scratch on so few is unlikely to do well. Fine-tune pre-trained weights instead: "
        "experiment=finetune finetune.checkpoint=<weights> (README, 'Your own dataset')",
        flush=True,
    )
