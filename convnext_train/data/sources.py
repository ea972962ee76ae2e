"""Every data source behind one registry keyed by `data.kind`: the one place that choice is made.

A source is one module that provides a `Source` for each kind it reads: the training process's
loaders, eval.py's validation loader, its config checks and the line saying what `data.root` should
hold. The trainer, eval.py, the bench and the config checks ask the registry and nothing else
(eval.py's robustness table reads its sets through data/robustness.py, a source module too), so a
new source is one module and one row in `_MODULES`. Modules are imported when their kind is chosen:
FFCV, `datasets` and `webdataset` are optional extras.

Whatever the source, the training loader yields micro-batches `(images, targets, replaced)` and can
be positioned mid-epoch (`Loaders.start_at`, for resume); the images are either CPU tensors (the step
moves them) or already on the device (FFCV: decoded and augmented there). A source whose epoch order
depends on the number of processes, loader workers or micro-batch size (wds) also gives
`Loaders.state`, which the run's checkpoints save as their `data` part and a resume checks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from convnext_train.data.loaders import Loaders
from convnext_train.errors import UserError
from convnext_train.problems import Problems

# The robustness table's sets, in its column order (data/robustness.py reads them: one list).
ROBUSTNESS_SETS = ("imagenet_v2", "imagenet_real", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_c")
# data.kind -> the module (under convnext_train.data) whose `SOURCES` has it.
_MODULES = {
    "imagefolder": "imagefolder",
    "folder": "folder",
    "digits": "digits",
    "synthetic": "synthetic",
    "ffcv": "ffcv",
    "hf": "hf",
    "wds": "wds",
    **dict.fromkeys(ROBUSTNESS_SETS, "robustness"),
}
KINDS = tuple(_MODULES)
# The modules whose loaders honour LoaderArgs.sample_target: those built on loaders.seeded_loaders.
_DRAWING_TARGETS = ("imagefolder", "folder", "digits", "synthetic", "hf")


@dataclass(frozen=True)
class LoaderArgs:
    """What every source's loaders take besides the data and aug configs: one process's share."""

    seed: int
    batch_size: int  # micro-batch per process
    device: torch.device
    rank: int = 0
    world_size: int = 1
    # None: the batches carry the data's labels. Otherwise each sample's target is this, given a seed
    # of the sample's own drawn from (seed, epoch, index): FCMAE's masks (tasks/masked_modeling.py).
    sample_target: Callable[[int], torch.Tensor] | None = None

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"


def _no_checks(data_cfg: DictConfig, problems: Problems) -> None:
    pass


def _nothing_to_fill(data_cfg: DictConfig, split_key: str) -> None:
    pass


@dataclass(frozen=True)
class Source:
    root_hint: str  # what data.root should hold, for the line that asks for it
    # (data, aug, args) -> the training process's loaders (train, and val unless data.val_split is null);
    # None: an evaluation set (the robustness sets, which eval.py scores set by set: robustness.py)
    loaders: Callable[[DictConfig, DictConfig, LoaderArgs], Loaders] | None = None
    # (data, crop_pct, args) -> the whole validation split with the official eval preprocessing (eval.py)
    val_loader: Callable[[DictConfig, float, LoaderArgs], Iterable] | None = None
    check: Callable[[DictConfig, Problems], None] = _no_checks  # the source's own keys, before compute
    # Fill what the data itself says before anything reads the config (imagefolder: the class count).
    # `split_key` names the split the run reads (train_split to train, val_split to evaluate).
    fill_from_data: Callable[[DictConfig, str], None] = _nothing_to_fill
    real_images: bool = True  # False: made-up or bundled demo data (no "small dataset" advice)

    @property
    def evaluation_only(self) -> bool:
        return self.loaders is None


def source(kind: str) -> Source:
    if kind not in _MODULES:
        raise UserError(f"data.kind={kind}: must be one of {', '.join(KINDS)}")
    return importlib.import_module(f"convnext_train.data.{_MODULES[kind]}").SOURCES[kind]


def build_loaders(data_cfg: DictConfig, aug_cfg: DictConfig, args: LoaderArgs) -> Loaders:
    """The loaders of one training process. Each epoch's order is a pure function of (seed, epoch)
    whatever the number of processes and loader workers; see each source for how."""
    chosen = source(data_cfg.kind)
    if chosen.evaluation_only:
        raise UserError(f"data={data_cfg.kind} is an evaluation set: score a checkpoint on it with eval.py")
    if args.sample_target is not None and _MODULES[data_cfg.kind] not in _DRAWING_TARGETS:
        drawing = ", ".join(kind for kind in KINDS if _MODULES[kind] in _DRAWING_TARGETS)
        raise UserError(
            f"data={data_cfg.kind} cannot give each sample a target of its own yet (FCMAE's masks): "
            f"pre-train from data={drawing}"
        )
    return chosen.loaders(data_cfg, aug_cfg, args)


def build_val_loader(data_cfg: DictConfig, crop_pct: float, args: LoaderArgs) -> Iterable:
    """The whole validation split with the official eval preprocessing, in one process (eval.py)."""
    if data_cfg.get("val_split", "") is None:
        raise UserError("data.val_split is null: there is no validation split to score")
    chosen = source(data_cfg.kind)
    if chosen.val_loader is None:  # eval.py scores these set by set itself (robustness.py)
        raise UserError(f"data={data_cfg.kind} is a robustness set: eval.py scores it (README, 'Robustness')")
    return chosen.val_loader(data_cfg, crop_pct, args)
