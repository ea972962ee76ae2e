"""Where the Hydra configs live, and composing them outside a Hydra app: the one module that knows.

The configs are package data (`convnext_train/conf/`), so a non-editable `pip install .` carries
them: train.py, eval.py and predict.py point Hydra there, and everything else that reads a config
file (the architecture a checkpoint holds, the robustness sets' folders, the bench, the README
tables) asks this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def config_file(group: str, name: str) -> Path:
    """`conf/<group>/<name>.yaml`."""
    return CONFIG_DIR / group / f"{name}.yaml"


def load(group: str, name: str) -> DictConfig:
    """One option of a config group as its file says (no defaults list applied)."""
    return OmegaConf.load(config_file(group, name))


def model(name: str) -> DictConfig:
    """`conf/model/<name>.yaml` with its defaults list applied: a roadmap step
    (`roadmap_r50/gelu`) is the step before it plus one change. `num_classes` stays as the file says.
    Inside a Hydra app of ours (initialised on this config directory already, and refusing a second
    initialisation) it composes with the app's."""
    if GlobalHydra.instance().is_initialized():
        return compose(overrides=[f"+model={name}"]).model
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(overrides=[f"+model={name}"]).model


def options(group: str) -> list[str]:
    """The options of a config group, sorted (`options("model")`: every variant)."""
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(overrides: Sequence[str]) -> DictConfig:
    """train.py's config for these overrides, with its `hydra` node (the choices made), composed in
    this process as train.py would; Hydra's errors propagate."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=True)
