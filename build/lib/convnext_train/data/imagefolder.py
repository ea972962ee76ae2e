"""`data=imagefolder` (and `data=imagenet`): ImageFolder trees (`<root>/<split>/<class>/<image>`)
whose failures read as instructions.

A missing or empty split, a train/val class mismatch and an unreadable image raise `UserError`s
that say what was expected. With `skip_corrupt`, an unreadable image is replaced by the next
readable one and the sample says so (see `Sample.replaced`). The images are decoded here and
transformed inside `SeededSamples`, under RNGs seeded per (epoch, sample): what makes a resumed run
bitwise equal. `data.num_classes: null` is the number of class folders, counted before the model is
built.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from convnext_train.data.loaders import SeededSamples, seeded_loaders, seeded_val_loader
from convnext_train.data.sources import LoaderArgs, Source
from convnext_train.data.transforms import eval_transform, train_transform
from convnext_train.errors import UserError

__all__ = [
    "ImageFolderDataset",
    "Sample",
    "UnreadableImageError",
    "check_class_count",
    "class_folders",
    "load_image",
    "train_and_val_datasets",
]

LAYOUT_HELP = (
    "expected ImageFolder layout: <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG, with "
    "the same class folders (for ImageNet the WordNet ids, e.g. n01440764) in both; "
    "`python data/prepare_imagenet.py layout-val` arranges the official validation set that way"
)

# What Pillow raises for a file it cannot decode: OSError (missing, unidentified, truncated),
# SyntaxError (malformed chunks), ValueError (bad header values), DecompressionBombError (absurd size).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImageError(UserError):
    """An image file Pillow cannot decode. A UserError, so that without skip_corrupt the run stops
    with a message naming the file (DataLoader workers re-raise it in the main process as this type)."""


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file completely, as RGB (ImageNet holds a few greyscale and CMYK JPEGs)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except DECODE_ERRORS as error:
        raise UnreadableImageError(
            f"cannot read image {path}: {error}. Replace or delete the file, or set "
            "data.skip_corrupt=true to train on the next readable image instead (each one is counted)"
        ) from error


class Sample(NamedTuple):
    """One dataset item. DataLoader's default collate keeps the field names: a batch is a `Sample` of
    an image tensor, a target tensor and a bool tensor."""

    image: Any  # what the transform returns (a tensor), or a PIL image without a transform
    target: int
    replaced: bool  # the file at this index was unreadable; image and target are the next readable one


class ImageFolderDataset(ImageFolder):
    """torchvision's ImageFolder for `<root>/<split>`, with `load_image` as the loader, `UserError`s
    instead of bare FileNotFoundErrors, and `Sample`s as items.

    Unreadable images: without skip_corrupt, `dataset[i]` raises UnreadableImageError. With it, index
    i is served by the first readable index among i+1, i+2, ... (wrapping around), with that image's
    target, `Sample.replaced` True, and a warning naming the file. The replacement is deterministic,
    so a resumed run sees the same samples. Counting goes through the batches themselves rather than
    shared state, because DataLoader workers are separate processes: the trainer sums
    `batch.replaced` (all-reducing across ranks if it wants a global count).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        root = Path(root)
        split_dir = split_directory(root, split)
        try:
            super().__init__(split_dir, transform=transform, loader=load_image)
        except FileNotFoundError as error:  # torchvision's words for "no class folders" / "no images"
            message = f"split {split!r} in {root} has no usable images: {error}; {LAYOUT_HELP}"
            raise UserError(message) from error
        self.split_dir = split_dir
        self.skip_corrupt = skip_corrupt

    def __getitem__(self, index: int) -> Sample:
        count = len(self.samples)
        for offset in range(count):
            path, target = self.samples[(index + offset) % count]
            try:
                image = self.loader(path)
            except UnreadableImageError:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"data.skip_corrupt: skipping unreadable image {path}", stacklevel=2)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return Sample(image, target, replaced=offset > 0)
        raise UserError(f"no image in {self.split_dir} can be read, so data.skip_corrupt has nothing to use")


def train_and_val_datasets(
    root: str | Path,
    train_split: str,
    val_split: str,
    train_transform: Callable[[Image.Image], Any] | None,
    val_transform: Callable[[Image.Image], Any] | None,
    num_classes: int | None = None,
    skip_corrupt: bool = False,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Both splits, checked to share one class list (so one index means one class in both) and, when
    num_classes is given, to have that many classes (the model head's size)."""
    train = ImageFolderDataset(root, train_split, train_transform, skip_corrupt)
    val = ImageFolderDataset(root, val_split, val_transform, skip_corrupt)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(
            f"{train.split_dir} and {val.split_dir} have different class folders: "
            f"only in {train_split}: {_excerpt(only_train)}; only in {val_split}: {_excerpt(only_val)}; "
            f"{LAYOUT_HELP}"
        )
    if num_classes is not None:
        check_class_count(train, num_classes)
    return train, val


def read_splits(root: str | Path, splits: Sequence[str]) -> dict[str, ImageFolderDataset]:
    """The ImageFolder splits a data writer (write_ffcv.py, write_wds.py) converts, checked as the
    trainer checks them to share one class list."""
    if len(splits) == 2:
        train, val = train_and_val_datasets(root, splits[0], splits[1], train_transform=None, val_transform=None)
        return {splits[0]: train, splits[1]: val}
    images = {split: ImageFolderDataset(root, split) for split in splits}
    first = next(iter(images.values()))
    for other in images.values():
        if other.classes != first.classes:
            raise UserError(
                f"{other.split_dir} and {first.split_dir} have different class folders; the splits must share one class list"
            )
    return images


def split_directory(root: Path, split: str) -> Path:
    """`<root>/<split>`, or one line saying which of the two is missing."""
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist or is not a directory; {LAYOUT_HELP}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"split {split!r} not found: {split_dir} is not a directory; {LAYOUT_HELP}")
    return split_dir


def class_folders(root: str | Path, split: str) -> list[str]:
    """The class names of `<root>/<split>` (its sub-folders, sorted), in the order ImageFolder numbers
    them: what `data.num_classes: null` counts before the model is built, without listing any image."""
    root = Path(root)
    split_dir = split_directory(root, split)
    try:
        return find_classes(split_dir)[0]  # torchvision's own rule, so the indices match ImageFolder's
    except FileNotFoundError as error:
        raise UserError(f"split {split!r} in {root} has no class folders: {error}; {LAYOUT_HELP}") from error


def check_class_count(images: ImageFolderDataset, num_classes: int) -> None:
    if len(images.classes) != num_classes:
        raise UserError(
            f"{images.split_dir} has {len(images.classes)} class folders but data.num_classes={num_classes}; "
            "set data.num_classes to match the data"
        )


def _excerpt(names: list[str], shown: int = 10) -> str:
    """A readable excerpt of a possibly long list (1,000 ImageNet classes would drown the message)."""
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# --------------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------------
ROOT_HINT = "the ImageFolder root, <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"


def imagefolder_samples(
    root: str | Path, data_cfg: DictConfig, aug_cfg: DictConfig, seed: int
) -> tuple[SeededSamples, SeededSamples | None]:
    """(train, val) of the tree at `root` with the recipe's transforms; val is None when
    `data.val_split` is null (ImageNet-22K pre-training has none)."""
    train_aug = train_transform(aug_cfg, data_cfg.img_size)
    if data_cfg.val_split is None:
        train = ImageFolderDataset(root, data_cfg.train_split, transform=None, skip_corrupt=data_cfg.skip_corrupt)
        check_class_count(train, data_cfg.num_classes)
        return SeededSamples(train, train_aug, seed), None
    train, val = train_and_val_datasets(
        root,
        data_cfg.train_split,
        data_cfg.val_split,
        train_transform=None,
        val_transform=None,
        num_classes=data_cfg.num_classes,
        skip_corrupt=data_cfg.skip_corrupt,
    )
    return SeededSamples(train, train_aug, seed), SeededSamples(
        val, eval_transform(data_cfg.img_size, aug_cfg.crop_pct), seed
    )


def imagefolder_loaders(data_cfg: DictConfig, aug_cfg: DictConfig, args: LoaderArgs):
    train, val = imagefolder_samples(data_cfg.root, data_cfg, aug_cfg, args.seed)
    return seeded_loaders(train, val, data_cfg.num_workers, args, pin_memory=data_cfg.pin_memory)


def imagefolder_val_loader(data_cfg: DictConfig, crop_pct: float, args: LoaderArgs):
    images = ImageFolderDataset(data_cfg.root, data_cfg.val_split, transform=None, skip_corrupt=data_cfg.skip_corrupt)
    check_class_count(images, data_cfg.num_classes)
    samples = SeededSamples(images, eval_transform(data_cfg.img_size, crop_pct), seed=0)
    return seeded_val_loader(samples, data_cfg.num_workers, args)


def count_class_folders(data_cfg: DictConfig, split_key: str) -> None:
    """`data.num_classes: null`: the number of class folders of the split the run reads, set before
    anything reads it (model.num_classes interpolates it; the recipe check on resume and the
    checkpoint's config see the number). Without a data.root yet, the config check asks for one."""
    if OmegaConf.is_missing(data_cfg, "num_classes") or data_cfg.num_classes is not None:
        return
    if OmegaConf.is_missing(data_cfg, "root") or data_cfg.root is None or data_cfg[split_key] is None:
        return
    data_cfg.num_classes = len(class_folders(data_cfg.root, data_cfg[split_key]))


SOURCES = {
    "imagefolder": Source(
        loaders=imagefolder_loaders,
        val_loader=imagefolder_val_loader,
        root_hint=ROOT_HINT,
        fill_from_data=count_class_folders,
    )
}
