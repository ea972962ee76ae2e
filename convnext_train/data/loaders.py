"""DataLoaders whose output is a pure function of (seed, epoch, position): resumable mid-epoch.

Two pieces make a killed-and-restarted run see exactly the images and augmentations of an
uninterrupted one, whatever the number of worker processes:
- `EpochSampler` draws each epoch's order from (seed, epoch) alone and can start mid-epoch;
- `SeededSamples` applies the random transform to sample i of epoch e under RNGs seeded from
  (seed, e, i), so no augmentation depends on which worker ran it or on what ran before.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ReadingState(Protocol):
    """A source's part of the run's checkpoints (their `data`): what its training order depends on
    besides (seed, epoch, position), so that a resume can tell whether it still reads the same order."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def check_mid_epoch(self, epoch: int) -> None:
        """The run resumes inside `epoch` (0-based), after `load_state_dict`: a UserError unless the
        rest of that epoch can be read as the checkpoint's run would have read it."""


@dataclass
class Loaders:
    train: Iterable  # micro-batches of (images, targets, replaced) for this process
    train_length: int  # images in the whole training set (all processes)
    # (epoch, samples this process has already consumed in it): where the next pass over `train` starts
    start_at: Callable[[int, int], None]
    val: Iterable | None  # this process's shard of the validation set; None: no validation split
    # The class of each target index (ImageFolder's folder names); None where the data has no names
    # (synthetic images, shards without them): checkpoints and summary.json then say nothing.
    class_names: list[str] | None = None
    # None where each epoch's order is the same whatever the number of processes, loader workers and
    # micro-batch size (EpochSampler's below, which FFCV's takes too): nothing to check on resume.
    state: ReadingState | None = None


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields `(epoch, index)` keys for one process: a permutation seeded by (seed, epoch), this
    rank's interleaved share of it, from `start` (samples this rank has already consumed)."""

    def __init__(
        self, num_samples: int, *, seed: int, shuffle: bool, drop_last: bool, rank: int = 0, world_size: int = 1
    ):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        # Training drops the tail so every rank takes the same number of steps; evaluation keeps
        # every image exactly once, so the shards may differ by one.
        self.per_rank = num_samples // world_size if drop_last else len(range(rank, num_samples, world_size))
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.rank :: self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order()[self.start :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return self.per_rank - self.start


def sample_seed(seed: int, epoch: int, index: int, *stream: int) -> int:
    """Sample `index`'s seed in `epoch`; another `stream` gives an independent one (FCMAE's masks)."""
    return int(np.random.SeedSequence([seed, epoch, index, *stream]).generate_state(1)[0])


@contextmanager
def seeded_rngs(seed: int):
    """Seed Python's, NumPy's and torch's CPU RNGs (timm's and torchvision's transforms draw from all
    three), restoring the previous states afterwards so the caller's streams are untouched."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        # The CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding call, with a
        # captured stack trace, for every sample.
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededSamples(Dataset):
    """`dataset[(epoch, index)]` -> (transform(image), target, replaced), every RNG seeded per sample.

    `images` returns (PIL image, target, replaced) items (`ImageFolderDataset` without a transform;
    `replaced` flags an unreadable file served by its neighbour under data.skip_corrupt). With
    `drawing(sample_target, seed)`, the target is `sample_target(s)` instead, s drawn from (seed,
    epoch, index) on a stream of its own, so it is independent of the augmentation's draws.
    """

    TARGET_STREAM = 1

    def __init__(self, images: Dataset, transform: Callable, seed: int):
        self.images = images
        self.transform = transform
        self.seed = seed
        self.sample_target: Callable[[int], Any] | None = None
        self.target_seed = seed

    def drawing(self, sample_target: Callable[[int], Any] | None, seed: int) -> SeededSamples:
        """A copy whose targets are drawn per sample by `sample_target` (None: the labels)."""
        drawn = copy.copy(self)
        drawn.sample_target, drawn.target_seed = sample_target, seed
        return drawn

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, target, replaced = self.images[index]
        if self.sample_target is not None:
            target = self.sample_target(sample_seed(self.target_seed, epoch, index, self.TARGET_STREAM))
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            return self.transform(image), target, replaced


def seeded_loaders(
    train: SeededSamples, val: SeededSamples | None, num_workers: int, args, *, pin_memory: bool = True
) -> Loaders:
    """The loaders of a source whose items are `SeededSamples` (ImageFolder trees, Hugging Face
    datasets, synthetic images): each epoch's order is a permutation seeded by (seed, epoch); process
    r takes every world_size-th image from position r, so the global order is the same whatever the
    number of processes. `args`: the `sources.LoaderArgs` of this process."""
    loader = partial(
        make_loader, batch_size=args.batch_size, num_workers=num_workers, pin_memory=pin_memory and args.pin_memory
    )
    shard = {"seed": args.seed, "rank": args.rank, "world_size": args.world_size}
    # Drawn targets (FCMAE's masks): the validation split's from seed 0 whatever the run's, and its
    # sampler stays at epoch 0, so every evaluation of every run sees the same ones.
    train = train.drawing(args.sample_target, args.seed)
    val = val.drawing(args.sample_target, 0) if val is not None else None
    train_sampler = EpochSampler(len(train), shuffle=True, drop_last=True, **shard)
    val_loader = None
    if val is not None:
        val_loader = loader(val, EpochSampler(len(val), shuffle=False, drop_last=False, **shard), drop_last=False)
    return Loaders(
        train=loader(train, train_sampler, drop_last=True),
        train_length=len(train),
        start_at=train_sampler.set_position,
        val=val_loader,
        class_names=getattr(train.images, "classes", None),  # ImageFolder's (and hf's ClassLabel names)
    )


def seeded_val_loader(samples: SeededSamples, num_workers: int, args) -> DataLoader:
    """Every image of `samples` once, in order, in one process (eval.py)."""
    sampler = EpochSampler(len(samples), seed=0, shuffle=False, drop_last=False)
    return make_loader(
        samples,
        sampler,
        batch_size=args.batch_size,
        num_workers=num_workers,
        pin_memory=args.pin_memory,
        drop_last=False,
    )


def make_loader(
    samples: SeededSamples,
    sampler: EpochSampler,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool,
) -> DataLoader:
    return DataLoader(
        samples,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        # A private generator: creating an iterator must not draw from the global torch RNG, whose
        # stream (drop path) has to continue across a resume exactly as in an uninterrupted run.
        generator=torch.Generator(),
    )
