"""The `data=ffcv` source (registered in data/sources.py): the training process's loaders, eval.py's
validation loader, and the checks of FFCV's own keys.
"""

from __future__ import annotations

from omegaconf import DictConfig

from convnext_train.data.ffcv.batches import OneDecodeAtATime, TrainBatches, ValBatches
from convnext_train.data.ffcv.betons import check_class_lists, open_beton
from convnext_train.data.ffcv.library import require_ffcv
from convnext_train.data.ffcv.order import ORDERS
from convnext_train.data.loaders import Loaders
from convnext_train.data.sources import LoaderArgs, Source
from convnext_train.problems import Problems, positive_int

__all__ = ["SOURCES", "ffcv_loaders", "ffcv_val_loader"]


def ffcv_loaders(data_cfg: DictConfig, aug_cfg: DictConfig, args: LoaderArgs) -> Loaders:
    """The training process's loaders over `<data.root>/<train_split>.beton` (and `<val_split>.beton`)."""
    require_ffcv()
    train_file = open_beton(data_cfg, data_cfg.train_split)
    val_file = open_beton(data_cfg, data_cfg.val_split) if data_cfg.val_split is not None else None
    check_class_lists(train_file, val_file)
    guard = OneDecodeAtATime()
    train = TrainBatches(train_file, data_cfg, aug_cfg, args, guard=guard)
    val = None
    if val_file is not None:
        val = ValBatches(val_file, data_cfg, aug_cfg.crop_pct, args, guard=guard)
    return Loaders(train=train, train_length=train.num_samples, start_at=train.start_at, val=val)


def ffcv_val_loader(data_cfg: DictConfig, crop_pct: float, args: LoaderArgs) -> ValBatches:
    """The whole validation split with the official eval preprocessing, in one process (eval.py)."""
    require_ffcv()
    return ValBatches(open_beton(data_cfg, data_cfg.val_split), data_cfg, crop_pct, args, guard=OneDecodeAtATime())


def _check(data_cfg: DictConfig, problems: Problems) -> None:
    problems.require(data_cfg.order in ORDERS, "data.order", f"must be one of {', '.join(ORDERS)}")
    problems.require(isinstance(data_cfg.os_cache, bool), "data.os_cache", "must be true or false")
    problems.require(positive_int(data_cfg.batches_ahead), "data.batches_ahead", "must be a positive integer")


SOURCES = {
    "ffcv": Source(
        loaders=ffcv_loaders,
        val_loader=ffcv_val_loader,
        root_hint="the directory of train.beton and val.beton; `python data/write_ffcv.py` writes them",
        check=_check,
    )
}
