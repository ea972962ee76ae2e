"""The entry points of data=ffcv (the seam in datasets.py): the training process's loaders, and
eval.py's validation loader.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from convnext_train.data.ffcv.batches import OneDecodeAtATime, TrainBatches, ValBatches
from convnext_train.data.ffcv.betons import check_class_lists, open_beton
from convnext_train.data.ffcv.library import require_ffcv
from convnext_train.data.loaders import Loaders
from convnext_train.errors import UserError

__all__ = ["ffcv_loaders", "ffcv_val_loader"]


def ffcv_loaders(
    data_cfg: DictConfig,
    aug_cfg: DictConfig,
    *,
    seed: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
):
    """The training process's loaders over `<data.root>/<train_split>.beton` (and `<val_split>.beton`)."""

    require_ffcv()
    train_file = open_beton(data_cfg, data_cfg.train_split)
    val_file = open_beton(data_cfg, data_cfg.val_split) if data_cfg.val_split is not None else None
    check_class_lists(train_file, val_file)
    guard = OneDecodeAtATime()
    train = TrainBatches(
        train_file,
        data_cfg,
        aug_cfg,
        seed=seed,
        batch_size=batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        guard=guard,
    )
    val = None
    if val_file is not None:
        val = ValBatches(
            val_file,
            data_cfg,
            aug_cfg.crop_pct,
            batch_size=batch_size,
            device=device,
            rank=rank,
            world_size=world_size,
            guard=guard,
        )
    return Loaders(train=train, train_length=train.num_samples, start_at=train.start_at, val=val)


def ffcv_val_loader(data_cfg: DictConfig, crop_pct: float, *, batch_size: int, device: torch.device) -> ValBatches:
    """The whole validation split with the official eval preprocessing, in one process (eval.py)."""
    require_ffcv()
    if data_cfg.val_split is None:
        raise UserError("data.val_split is null: there is no validation split to score")
    return ValBatches(
        open_beton(data_cfg, data_cfg.val_split),
        data_cfg,
        crop_pct,
        batch_size=batch_size,
        device=device,
        guard=OneDecodeAtATime(),
    )
