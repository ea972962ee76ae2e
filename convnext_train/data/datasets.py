"""The training and validation data a `data` config names: datasets and the loaders over them.

`build_loaders` is the one seam between data and trainer. Whatever the `data.kind`, the training
loader yields micro-batches `(images, targets, replaced)` and can be positioned mid-epoch (resume);
the images are either CPU tensors (the reference path: the step moves them) or already on the
device (FFCV: decoded and augmented there).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from convnext_train.data.imagefolder import ImageFolderDataset, check_class_count, train_and_val_datasets
from convnext_train.data.loaders import EpochSampler, Loaders, SeededSamples, make_loader
from convnext_train.data.transforms import eval_transform, train_transform
from convnext_train.errors import UserError

KINDS = ("imagefolder", "digits", "synthetic", "ffcv", "hf", "wds")


def build_loaders(
    data_cfg: DictConfig,
    aug_cfg: DictConfig,
    *,
    seed: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """The loaders of one training process. Each epoch's order is a permutation seeded by (seed,
    epoch); process r takes every world_size-th image from position r, so the global order is the
    same whatever the number of processes."""
    if data_cfg.kind == "ffcv":
        from convnext_train.data.ffcv import ffcv_loaders

        return ffcv_loaders(
            data_cfg, aug_cfg, seed=seed, batch_size=batch_size, device=device, rank=rank, world_size=world_size
        )
    if data_cfg.kind == "wds":
        from convnext_train.data.wds import wds_loaders

        return wds_loaders(
            data_cfg, aug_cfg, seed=seed, batch_size=batch_size, device=device, rank=rank, world_size=world_size
        )
    train_images, val_images = build_datasets(data_cfg, aug_cfg, seed=seed)
    loader = partial(
        make_loader,
        batch_size=batch_size,
        num_workers=data_cfg.num_workers,
        pin_memory=data_cfg.pin_memory and device.type == "cuda",
    )
    train_sampler = EpochSampler(
        len(train_images), seed=seed, shuffle=True, drop_last=True, rank=rank, world_size=world_size
    )
    val = None
    if val_images is not None:
        val_sampler = EpochSampler(
            len(val_images), seed=seed, shuffle=False, drop_last=False, rank=rank, world_size=world_size
        )
        val = loader(val_images, val_sampler, drop_last=False)
    return Loaders(
        train=loader(train_images, train_sampler, drop_last=True),
        train_length=len(train_images),
        start_at=train_sampler.set_position,
        val=val,
        class_names=getattr(train_images.images, "classes", None),  # ImageFolder's (and hf's ClassLabel names)
    )


def build_val_loader(data_cfg: DictConfig, crop_pct: float, *, batch_size: int, device: torch.device) -> Iterable:
    """The whole validation split with the official eval preprocessing, in one process (eval.py)."""
    if data_cfg.kind == "ffcv":
        from convnext_train.data.ffcv import ffcv_val_loader

        return ffcv_val_loader(data_cfg, crop_pct, batch_size=batch_size, device=device)
    if data_cfg.kind == "wds":
        from convnext_train.data.wds import wds_val_loader

        return wds_val_loader(data_cfg, crop_pct, batch_size=batch_size, device=device)
    images = val_dataset(data_cfg, crop_pct)
    sampler = EpochSampler(len(images), seed=0, shuffle=False, drop_last=False)
    return make_loader(
        images,
        sampler,
        batch_size=batch_size,
        num_workers=data_cfg.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def build_datasets(
    data_cfg: DictConfig, aug_cfg: DictConfig, *, seed: int
) -> tuple[SeededSamples, SeededSamples | None]:
    """(train, val); val is None when `data.val_split` is null (ImageNet-22K pre-training has none)."""
    if data_cfg.kind not in KINDS:
        raise UserError(f"data.kind={data_cfg.kind}: must be one of {', '.join(KINDS)}")
    if data_cfg.kind == "synthetic":
        from convnext_train.data.synthetic import synthetic_datasets

        return synthetic_datasets(data_cfg, seed=seed)
    if data_cfg.kind == "hf":
        from convnext_train.data.hf import hf_datasets

        return hf_datasets(data_cfg, aug_cfg, seed=seed)
    root = Path(data_cfg.root)
    if data_cfg.kind == "digits":
        from convnext_train.data.digits import write_digits_imagefolder

        # The held-out split is part of the dataset, not of the run: it does not follow trainer.seed.
        write_digits_imagefolder(root, img_size=data_cfg.img_size)
    # The ImageFolder datasets decode only; the transforms run inside SeededSamples, under RNGs
    # seeded per (epoch, sample), which is what makes a resumed run bitwise equal.
    if data_cfg.val_split is None:
        train = ImageFolderDataset(root, data_cfg.train_split, transform=None, skip_corrupt=data_cfg.skip_corrupt)
        check_class_count(train, data_cfg.num_classes)
        return SeededSamples(train, train_transform(aug_cfg, data_cfg.img_size), seed), None
    train, val = train_and_val_datasets(
        root,
        data_cfg.train_split,
        data_cfg.val_split,
        train_transform=None,
        val_transform=None,
        num_classes=data_cfg.num_classes,
        skip_corrupt=data_cfg.skip_corrupt,
    )
    return (
        SeededSamples(train, train_transform(aug_cfg, data_cfg.img_size), seed),
        SeededSamples(val, eval_transform(data_cfg.img_size, aug_cfg.crop_pct), seed),
    )


def val_dataset(data_cfg: DictConfig, crop_pct: float) -> SeededSamples:
    """The validation split alone, with the official eval transform (for eval.py)."""
    if data_cfg.kind == "hf":
        from convnext_train.data.hf import hf_val_dataset

        return hf_val_dataset(data_cfg, crop_pct)
    images = ImageFolderDataset(data_cfg.root, data_cfg.val_split, transform=None, skip_corrupt=data_cfg.skip_corrupt)
    check_class_count(images, data_cfg.num_classes)
    return SeededSamples(images, eval_transform(data_cfg.img_size, crop_pct), seed=0)
