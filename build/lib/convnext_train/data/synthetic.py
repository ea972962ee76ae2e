"""`data=synthetic`: fixed random images for running the trainer without a dataset.

Each split holds a small pool of distinct random images, made once with `torch.randn` (no PIL, no
decoding), and serves pool[index % pool size] with a fixed random target. Items go through
`SeededSamples` and come out as the ImageFolder path's do: `(normalised float32 image, int target,
replaced=False)` under `(epoch, index)` keys, so the loaders, the training step and evaluation run
unchanged and only the cost of reading and augmenting images is gone.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from convnext_train.data.imagefolder import Sample
from convnext_train.data.loaders import SeededSamples, seeded_loaders, seeded_val_loader
from convnext_train.data.sources import LoaderArgs, Source
from convnext_train.errors import UserError
from convnext_train.problems import Problems, positive_int

__all__ = ["SOURCES", "SyntheticImages", "synthetic_samples"]

# Enough distinct images that no batch is made of one repeated tensor, few enough to cost next to
# nothing: 64 images at 224 px are 39 MB per split, shared by the loader's forked workers.
POOL_SIZE = 64

# Train and val draw from separate random streams of one seed: different images, reproducible.
_SPLIT_STREAMS = {"train": 0, "val": 1}


class SyntheticImages(Dataset):
    """`length` items `Sample(image, target, replaced=False)`: random (3, img_size, img_size) float32
    images, standard normal like ImageNet images after normalisation, with uniform random targets."""

    def __init__(self, length: int, *, num_classes: int, img_size: int, seed: int, split: str):
        generator = torch.Generator().manual_seed(_split_seed(seed, split))
        pool_size = min(length, POOL_SIZE)
        self.length = length
        self.images = torch.randn(pool_size, 3, img_size, img_size, generator=generator)
        self.targets = torch.randint(num_classes, (pool_size,), generator=generator).tolist()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic images")
        slot = index % len(self.targets)
        return Sample(self.images[slot], self.targets[slot], replaced=False)


def synthetic_samples(data_cfg: DictConfig, *, seed: int) -> tuple[SeededSamples, SeededSamples | None]:
    """(train, val) for a `data=synthetic` config; val is None when `data.val_length` is null."""

    def split(name: str, length: int) -> SeededSamples:
        images = SyntheticImages(
            length, num_classes=data_cfg.num_classes, img_size=data_cfg.img_size, seed=seed, split=name
        )
        return SeededSamples(images, transform=unchanged, seed=seed)

    val = split("val", data_cfg.val_length) if data_cfg.val_length is not None else None
    return split("train", data_cfg.train_length), val


def unchanged(image: torch.Tensor) -> torch.Tensor:
    """The synthetic images are already normalised tensors: there is nothing to decode or augment.
    (A module-level function rather than a lambda, so DataLoader workers can unpickle it.)"""
    return image


def _split_seed(seed: int, split: str) -> int:
    return int(np.random.SeedSequence([seed, _SPLIT_STREAMS[split]]).generate_state(1)[0])


def _check(data_cfg: DictConfig, problems: Problems) -> None:
    problems.require(positive_int(data_cfg.train_length), "data.train_length", "must be a positive integer")
    problems.require(
        data_cfg.val_length is None or positive_int(data_cfg.val_length),
        "data.val_length",
        "must be a positive integer or null",
    )


def _loaders(data_cfg: DictConfig, aug_cfg: DictConfig, args: LoaderArgs):
    train, val = synthetic_samples(data_cfg, seed=args.seed)
    return seeded_loaders(train, val, data_cfg.num_workers, args, pin_memory=data_cfg.pin_memory)


def _val_loader(data_cfg: DictConfig, crop_pct: float, args: LoaderArgs):
    _, val = synthetic_samples(data_cfg, seed=0)
    if val is None:
        raise UserError("data.val_length is null: there is no validation split to score")
    return seeded_val_loader(val, data_cfg.num_workers, args)


SOURCES = {
    "synthetic": Source(
        loaders=_loaders,
        val_loader=_val_loader,
        root_hint="nothing: synthetic data has no files",
        check=_check,
        real_images=False,  # measures speed only
    )
}
