"""The training and validation sets a `data` config names, ready for `EpochSampler` keys."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from convnext_train.data.imagefolder import ImageFolderDataset, train_and_val_datasets
from convnext_train.data.loaders import SeededSamples
from convnext_train.data.transforms import eval_transform, train_transform
from convnext_train.errors import UserError

KINDS = ("imagefolder", "digits", "synthetic")


def build_datasets(data_cfg: DictConfig, aug_cfg: DictConfig, *, seed: int) -> tuple[SeededSamples, SeededSamples | None]:
    """(train, val); val is None when `data.val_split` is null (ImageNet-22K pre-training has none)."""
    if data_cfg.kind not in KINDS:
        raise UserError(f"data.kind={data_cfg.kind}: must be one of {', '.join(KINDS)}")
    if data_cfg.kind == "synthetic":
        from convnext_train.data.synthetic import synthetic_datasets

        return synthetic_datasets(data_cfg, seed=seed)
    root = Path(data_cfg.root)
    if data_cfg.kind == "digits":
        from convnext_train.data.digits import write_digits_imagefolder

        # The held-out split is part of the dataset, not of the run: it does not follow trainer.seed.
        write_digits_imagefolder(root, img_size=data_cfg.img_size)
    # The ImageFolder datasets decode only; the transforms run inside SeededSamples, under RNGs
    # seeded per (epoch, sample), which is what makes a resumed run bitwise equal.
    if data_cfg.val_split is None:
        train = ImageFolderDataset(root, data_cfg.train_split, transform=None, skip_corrupt=data_cfg.skip_corrupt)
        _check_class_count(train, data_cfg.num_classes)
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
    images = ImageFolderDataset(data_cfg.root, data_cfg.val_split, transform=None, skip_corrupt=data_cfg.skip_corrupt)
    _check_class_count(images, data_cfg.num_classes)
    return SeededSamples(images, eval_transform(data_cfg.img_size, crop_pct), seed=0)


def _check_class_count(images: ImageFolderDataset, num_classes: int) -> None:
    if len(images.classes) != num_classes:
        raise UserError(
            f"{images.split_dir} has {len(images.classes)} class folders but data.num_classes={num_classes}; "
            "set data.num_classes to match the data"
        )
