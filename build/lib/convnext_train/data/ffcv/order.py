"""The order of a pass: `EpochSampler`'s semantics (the reference path's) for FFCV's Loader."""

from __future__ import annotations

import numpy as np

from convnext_train.data.ffcv.library import Loader, QuasiRandom, TraversalOrder, generate_order_inner
from convnext_train.data.loaders import EpochSampler

__all__ = ["ORDERS", "RankOrder"]

ORDERS = ("random", "quasi_random")  # data.order: EpochSampler's permutation, or FFCV's page-local shuffle


class RankOrder(TraversalOrder):
    """This rank's images for the next pass, as FFCV's `Loader(order=...)` takes them.

    `random`: `EpochSampler`'s permutation of (seed, epoch) (the reference path's order). `quasi_random`:
    FFCV's page-local shuffle of (seed, epoch), which reads the file in large runs (for os_cache=false),
    sliced the same way. Either way rank r takes positions r, r + world, ... and the pass starts after
    the `start` images this rank already consumed; training keeps whole batches only.

    FFCV calls the order object with the Loader once, when the Loader is built (hence `__call__`), and
    then asks for `sample_order(its own epoch count)`, which is ignored: the epoch is ours (`start_at`).
    """

    def __init__(
        self, num_samples: int, *, kind: str, seed: int, train: bool, batch_size: int, rank: int, world_size: int
    ):
        self.kind, self.train, self.batch_size = kind, train, batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch_sampler = EpochSampler(
            num_samples,
            seed=seed,
            shuffle=train and kind == "random",
            drop_last=train,
            rank=rank,
            world_size=world_size,
        )
        self.quasi_random = None

    def __call__(self, loader: Loader) -> RankOrder:
        super().__init__(loader)
        if self.kind == "quasi_random" and self.train:
            self.quasi_random = QuasiRandom(loader)  # its seed is the Loader's: ours
        return self

    @property
    def epoch(self) -> int:
        return self.epoch_sampler.epoch

    @property
    def start(self) -> int:
        return self.epoch_sampler.start

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch_sampler.set_position(epoch, start)

    def share(self) -> list[int]:
        """This rank's images of the epoch, in order, from its first position."""
        if self.quasi_random is None:
            return self.epoch_sampler.order()
        # FFCV's QuasiRandom.sample_order shuffles its page table in place, so its orders depend on
        # the calls before: its generator runs here on a fresh copy, a function of (seed, epoch) alone.
        quasi = self.quasi_random
        everything = np.zeros(len(quasi.indices), dtype=np.int64)
        seed = (self.seed * 912300 + self.epoch_sampler.epoch) % 2**32
        generate_order_inner(
            seed, quasi.page_to_samples_array.copy(), quasi.page_sizes, everything, 2 * self.batch_size
        )
        return everything.tolist()[self.rank :: self.world_size][: self.epoch_sampler.per_rank]

    def positions(self) -> np.ndarray:
        """The image indices of the next pass: the share from `start`, whole batches only in training."""
        remaining = self.share()[self.epoch_sampler.start :]
        if self.train:
            remaining = remaining[: len(remaining) // self.batch_size * self.batch_size]
        return np.asarray(remaining, dtype=np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.positions()
