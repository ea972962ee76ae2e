"""The four commands, as Hydra apps over the configs inside the package: `convnext-train`,
`convnext-eval`, `convnext-predict` and `convnext-export` after `pip install .` (editable or not), and `python train.py`,
`python eval.py`, `python predict.py`, `python -m convnext_train.export` in a checkout, which call these. Each takes the same overrides.

train's stop-signal handler (preemption.py) goes in before the slow imports: train.py installs it as
its first line; the `convnext-train` command as the first thing its function does (Hydra and this
module are imported by then, torch not yet).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from convnext_train import preemption
from convnext_train.configs import CONFIG_DIR
from convnext_train.errors import exit_on_user_error


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="train")
@exit_on_user_error
def _train(cfg: DictConfig) -> None:
    from convnext_train.trainer import run

    run(cfg)


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="eval")
@exit_on_user_error
def _eval(cfg: DictConfig) -> None:
    from convnext_train.evaluate import run

    run(cfg)


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="predict")
@exit_on_user_error
def _predict(cfg: DictConfig) -> None:
    from convnext_train.predict import run

    run(cfg)


def train() -> None:
    """Train a ConvNeXt: `convnext-train model=convnext_t data.root=/datasets/imagenet`."""
    preemption.install()
    _train()


def evaluate() -> None:
    """Score checkpoints: `convnext-eval checkpoint=<file> data.root=<dir>` (model= is optional)."""
    _eval()


def predict() -> None:
    """Classify new images: `convnext-predict checkpoint=<file> images=<folder or glob> [topk=5]`."""
    _predict()


def export() -> None:
    """Write a model for another codebase or runtime: `convnext-export checkpoint=<file> format=onnx out=model.onnx`.
    Its Hydra app is convnext_train/export.py's `main`, which `python -m convnext_train.export` runs."""
    from convnext_train.export import main

    main()
