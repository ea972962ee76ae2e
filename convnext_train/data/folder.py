"""A folder of unlabeled images, the user's own collection (scans, aerial tiles, production-line
photos): every image file under `data.root`, searched recursively, in sorted path order; sub-folders
are not classes. For FCMAE pre-training (experiment=fcmae), which reads no labels: every image's
label is 0. An optional second folder, `data.val_root`, is the validation split.

    python train.py experiment=fcmae model=convnextv2_atto data=folder data.root=/data/my_images

Unreadable files are handled as in ImageFolder trees (data.skip_corrupt), by the same code.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from convnext_train.data.imagefolder import ImageFolderDataset, load_image
from convnext_train.data.loaders import SeededSamples, seeded_loaders, seeded_val_loader
from convnext_train.data.sources import LoaderArgs, Source
from convnext_train.data.transforms import eval_transform, train_transform
from convnext_train.errors import UserError
from convnext_train.problems import Problems

ROOT_HINT = "a folder of images, searched recursively (sub-folders are not classes)"


def image_files(root: str | Path) -> list[str]:
    """Every file under `root` with an image extension torchvision reads, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: data.root must be {ROOT_HINT}")
    found = [
        os.path.join(directory, name)
        for directory, _, names in os.walk(root, followlinks=True)
        for name in names
        if name.lower().endswith(IMG_EXTENSIONS)
    ]
    if not found:
        extensions = ", ".join(sorted({e.lstrip(".") for e in IMG_EXTENSIONS}))
        raise UserError(f"{root} holds no image files ({extensions}), in it or below it")
    return sorted(found)


class UnlabeledImages(Dataset):
    """The images under one folder as `Sample(PIL image, 0, replaced)`; unreadable ones as in
    `ImageFolderDataset` (whose `__getitem__` this borrows: the same samples/loader/skip attributes)."""

    def __init__(self, root: str | Path, skip_corrupt: bool):
        self.split_dir = Path(root)
        self.samples = [(path, 0) for path in image_files(root)]
        self.loader = load_image
        self.transform = None
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    __getitem__ = ImageFolderDataset.__getitem__


def _loaders(data_cfg: DictConfig, aug_cfg: DictConfig, args: LoaderArgs):
    if args.sample_target is None:
        raise UserError(
            "data=folder has no labels, so it cannot train a classifier: pre-train on it (experiment=fcmae), "
            "or put the images in class folders and use data=imagefolder"
        )
    train = SeededSamples(
        UnlabeledImages(data_cfg.root, data_cfg.skip_corrupt), train_transform(aug_cfg, data_cfg.img_size), args.seed
    )
    val = None
    if data_cfg.val_root is not None:
        images = UnlabeledImages(data_cfg.val_root, data_cfg.skip_corrupt)
        val = SeededSamples(images, eval_transform(data_cfg.img_size, aug_cfg.crop_pct), args.seed)
    return seeded_loaders(train, val, data_cfg.num_workers, args, pin_memory=data_cfg.pin_memory)


def _val_loader(data_cfg: DictConfig, crop_pct: float, args: LoaderArgs):
    if data_cfg.val_root is None:
        raise UserError("data=folder has no validation folder: set data.val_root")
    images = UnlabeledImages(data_cfg.val_root, data_cfg.skip_corrupt)
    return seeded_val_loader(
        SeededSamples(images, eval_transform(data_cfg.img_size, crop_pct), 0), data_cfg.num_workers, args
    )


def _check(data_cfg: DictConfig, problems: Problems) -> None:
    for key in ("root", "val_root"):
        value = data_cfg.get(key)
        problems.require(
            not isinstance(value, str) or Path(value).is_dir(), f"data.{key}", f"not a folder; {ROOT_HINT}"
        )


SOURCES = {"folder": Source(loaders=_loaders, val_loader=_val_loader, root_hint=ROOT_HINT, check=_check)}
