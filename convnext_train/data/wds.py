"""`data=wds`: WebDataset tar shards, read in a per-epoch plan that is a pure function of the seed.

    python data/write_wds.py /datasets/imagenet /datasets/imagenet-wds      # train-NNNNNN.tar, val-...
    python train.py model=convnext_t data=wds data.root=/datasets/imagenet-wds

Why not webdataset's pipeline (`WebDataset(..., shardshuffle=...)`, `split_by_node`, `split_by_worker`,
`shuffle`): it splits whole shards round-robin over ranks and workers, so ranks get different numbers
of samples (DDP's collectives would hang at the end of an epoch) and a shard count below ranks x
workers leaves readers idle; its shard and buffer shuffles are seeded once, not per epoch; and it
cannot start mid-epoch. What we use of it is the reading: `tariterators.tarfile_samples` (open a shard,
group its members into samples by key) and `filters.shuffle` (the buffer shuffle, given our seed); the
plan that decides who reads what is ours:

- Epoch e: the shards in a permutation seeded by (seed, e), their samples in file order, make one
  stream of the N samples. Rank r takes the contiguous positions [r*B, (r+1)*B) with B = N // world in
  training (every rank the same number of samples, hence of steps; the stream's last N mod world
  samples are dropped, a different few each epoch) and a near-equal share of all N in validation.
- Within a rank, its positions are cut into micro-batches (training: the last B mod batch_size
  samples are dropped) and the batches into one contiguous block per loader worker. A worker reads
  only its block, shards in order (skipping, not decoding, the samples before its start in the first
  one), shuffles it with a buffer seeded by (seed, e, block start), and builds whole micro-batches.
  DataLoader takes batches from its workers round-robin, so batch i of the rank is the (i //
  workers)-th batch of worker i % workers: the order depends on the number of workers (and of ranks
  and the micro-batch size), not on anything random.
- Augmentations: sample k (its global index) in epoch e is transformed under RNGs seeded by
  `sample_seed(seed, e, k)` (loaders.py's, as the ImageFolder path), whichever worker decodes it.
- Resume (`start_at(epoch, consumed)`): exact. Each worker knows how many of its batches the rank
  consumed, runs its block's reading and buffer shuffle again on the undecoded bytes and skips those
  samples, and the workers are renumbered so that DataLoader's round-robin starts at the next batch's.
  That needs the plan the epoch was started with: the same number of processes, loader workers (0
  and 1 are one block alike) and micro-batch size. The checkpoints record them (`ReadingLayout`, their
  `data` part); a resume inside an epoch under another layout stops before any step, naming the
  change, unless `data.allow_layout_change=true` accepts the rest of that one epoch in the new plan's
  order (images of it then repeat or are missed until the epoch ends). A checkpoint at an epoch's end
  resumes under any layout: the next epoch's plan is drawn for the run that reads it.
- Validation: every image exactly once whatever the number of processes and workers (the last batch
  of a rank may be short); eval.py scores the whole split in one process.

DataLoader's workers are started afresh each pass (not persistent): the position (epoch, consumed)
lives in the dataset object, which persistent workers would only copy once.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from itertools import islice
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from convnext_train.data.imagefolder import Sample, UnreadableImageError, load_image
from convnext_train.data.loaders import Loaders, sample_seed, seeded_rngs
from convnext_train.data.sources import LoaderArgs, Source
from convnext_train.data.transforms import eval_transform, train_transform
from convnext_train.data.wds_shards import (
    IMAGE_EXTENSIONS,
    SAMPLE_LAYOUT,
    Shard,
    ShardSet,
    check_class_lists,
    open_split,
    require_webdataset,
)
from convnext_train.errors import UserError
from convnext_train.problems import Problems, positive_int

__all__ = ["SOURCES", "ShardStream", "rank_range", "stream_pieces", "worker_blocks"]


def wds_loaders(data_cfg: DictConfig, aug_cfg: DictConfig, args: LoaderArgs) -> Loaders:
    """The training process's loaders over `<data.root>/<train_split>-*.tar` (and `<val_split>-*.tar`)."""
    require_webdataset()
    announce = args.rank == 0
    train_set = open_split(data_cfg, data_cfg.train_split, announce=announce)
    val_set = open_split(data_cfg, data_cfg.val_split, announce=announce) if data_cfg.val_split is not None else None
    check_class_lists(train_set, val_set)
    train = ShardStream(
        train_set, train_transform(aug_cfg, data_cfg.img_size), train=True, data_cfg=data_cfg, args=args
    )
    val = None
    if val_set is not None:
        val_transform = eval_transform(data_cfg.img_size, aug_cfg.crop_pct)
        val = _loader(ShardStream(val_set, val_transform, train=False, data_cfg=data_cfg, args=args), data_cfg, args)
    return Loaders(
        train=_loader(train, data_cfg, args),
        train_length=train_set.num_samples,
        start_at=train.set_position,
        val=val,
        class_names=train_set.classes,  # write_wds's index has them; other shards: None
        state=ReadingLayout(
            Layout(args.world_size, data_cfg.num_workers, args.batch_size),
            allow_change=data_cfg.allow_layout_change,
            announce=announce,
        ),
    )


def wds_val_loader(data_cfg: DictConfig, crop_pct: float, args: LoaderArgs) -> DataLoader:
    """The whole validation split with the official eval preprocessing, in one process (eval.py)."""
    require_webdataset()
    images = open_split(data_cfg, data_cfg.val_split, announce=True)
    stream = ShardStream(images, eval_transform(data_cfg.img_size, crop_pct), train=False, data_cfg=data_cfg, args=args)
    return _loader(stream, data_cfg, args)


def _check(data_cfg: DictConfig, problems: Problems) -> None:
    problems.require(positive_int(data_cfg.shuffle_buffer), "data.shuffle_buffer", "must be a positive integer")
    problems.require(
        isinstance(data_cfg.allow_layout_change, bool), "data.allow_layout_change", "must be true or false"
    )


SOURCES = {
    "wds": Source(
        loaders=wds_loaders,
        val_loader=wds_val_loader,
        root_hint="the directory of <split>-NNNNNN.tar shards; `python data/write_wds.py` writes them",
        check=_check,
    )
}


def _loader(stream: ShardStream, data_cfg: DictConfig, args: LoaderArgs) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,  # the workers build the micro-batches: which samples form one is the plan's
        num_workers=data_cfg.num_workers,
        pin_memory=data_cfg.pin_memory and args.pin_memory,
        persistent_workers=False,
        # A private generator: creating an iterator must not draw from the global torch RNG (drop path).
        generator=torch.Generator(),
    )


# --------------------------------------------------------------------------------------------------
# The plan: pure functions of (seed, epoch, counts, rank, world size, workers, batch size)
# --------------------------------------------------------------------------------------------------
class Piece(NamedTuple):
    shard: Shard
    start: int  # first sample of the shard to take (file order)
    stop: int


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_shards).tolist()


def stream_pieces(shards: tuple[Shard, ...], order: list[int], lo: int, hi: int) -> list[Piece]:
    """Positions [lo, hi) of the stream made of the shards in `order`, as (shard, start, stop) pieces."""
    pieces, position = [], 0
    for i in order:
        shard = shards[i]
        start, stop = max(lo - position, 0), min(hi - position, shard.count)
        if start < stop:
            pieces.append(Piece(shard, start, stop))
        position += shard.count
    return pieces


def rank_range(total: int, rank: int, world_size: int, *, train: bool) -> tuple[int, int]:
    """This rank's contiguous positions: equal budgets in training (tail dropped), all of them in evaluation."""
    if train:
        per_rank = total // world_size
        return rank * per_rank, (rank + 1) * per_rank
    base, extra = divmod(total, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def batch_count(samples: int, batch_size: int, *, train: bool) -> int:
    return samples // batch_size if train else -(-samples // batch_size)


def worker_blocks(lo: int, hi: int, batch_size: int, workers: int, *, train: bool) -> list[tuple[int, int]]:
    """Positions [lo, hi) cut into micro-batches (training: whole ones only), the batches into one
    contiguous block per worker, the larger blocks first: batch i of the rank is then block i % workers'
    (i // workers)-th, DataLoader's round-robin order."""
    batches = batch_count(hi - lo, batch_size, train=train)
    blocks, first = [], 0
    for worker in range(workers):
        count = batches // workers + (worker < batches % workers)
        blocks.append((lo + first * batch_size, min(lo + (first + count) * batch_size, hi)))
        first += count
    return blocks


class Layout(NamedTuple):
    """What the plan depends on besides the seed, the epoch and the data."""

    world_size: int
    num_workers: int  # data.num_workers as set: 0 reads in the main process, the one block 1 worker would
    micro_batch_size: int

    @property
    def plan(self) -> tuple[int, int, int]:
        return self.world_size, max(self.num_workers, 1), self.micro_batch_size

    def described(self, only: tuple[str, ...] | None = None) -> str:
        """`only`: the fields to name (all by default)."""
        parts = {
            "world_size": f"{self.world_size} process{'es' if self.world_size > 1 else ''}",
            "num_workers": f"data.num_workers={self.num_workers}",
            "micro_batch_size": f"trainer.micro_batch_size={self.micro_batch_size}",
        }
        return ", ".join(parts[name] for name in only or self._fields)


class ReadingLayout:
    """The run's checkpoint part `data`: the layout this run reads with, saved, and the one the
    checkpoint's epoch was read with, loaded. A position inside an epoch is a count of batches per
    rank in that epoch's plan; under another layout the same count is another set of samples (some
    the old ranks had read, others they will never reach). Finding which ones the old ranks took and
    dealing out the rest would take a second kind of plan, over an arbitrary subset of the stream,
    and a replay of every old block's shards and buffer shuffles at start-up: refused instead, before
    the first step, unless `data.allow_layout_change` accepts the new plan's order for that epoch."""

    def __init__(self, current: Layout, *, allow_change: bool, announce: bool):
        self.current, self.allow_change, self.announce = current, allow_change, announce
        self.saved: Layout | None = None  # None: a checkpoint from before layouts were saved (nothing to check)

    def state_dict(self) -> dict[str, int]:
        return self.current._asdict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.saved = Layout(**state)

    def check_mid_epoch(self, epoch: int) -> None:
        saved, current = self.saved, self.current
        if saved is None or saved.plan == current.plan:
            return
        changed = tuple(name for name in Layout._fields if getattr(saved, name) != getattr(current, name))
        if not self.allow_change:
            raise UserError(
                f"the checkpoint stopped inside epoch {epoch + 1}, whose data=wds plan was drawn for "
                f"{saved.described()}; this run has {current.described(changed)}: the rest of that epoch cannot be "
                f"read exactly under another layout. Resume with {saved.described()} until that epoch ends (a "
                "checkpoint at an epoch's end resumes under any layout), or add data.allow_layout_change=true to "
                "read the rest of it in this run's order (some of its images then twice, others not at all)"
            )
        if self.announce:
            print(
                f"data.allow_layout_change=true: the rest of epoch {epoch + 1} is read in the order of "
                f"{current.described()}, not the checkpoint's {saved.described()}: some of its images may be "
                "seen twice, others not at all, until that epoch ends",
                flush=True,
            )


# --------------------------------------------------------------------------------------------------
# One process's batches
# --------------------------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """The micro-batches (images, targets, replaced) of one rank's share of a split, in the plan's
    order, from `set_position(epoch, consumed)` on. Iterated in each DataLoader worker (or in the
    main process without workers), each worker yielding its own block."""

    def __init__(
        self,
        images: ShardSet,
        transform: Callable,
        *,
        train: bool,
        data_cfg: DictConfig,
        args: LoaderArgs,
    ):
        self.images, self.transform, self.train = images, transform, train
        self.seed, self.batch_size = args.seed, args.batch_size
        rank, world_size = args.rank, args.world_size
        self.num_classes, self.skip_corrupt = data_cfg.num_classes, data_cfg.skip_corrupt
        self.shuffle_buffer = data_cfg.get("shuffle_buffer", 1)
        self.lo, self.hi = rank_range(images.num_samples, rank, world_size, train=train)
        self.num_batches = batch_count(self.hi - self.lo, self.batch_size, train=train)
        self.epoch, self.consumed_batches = 0, 0

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        """Start the next pass at epoch `epoch`, after the `consumed` samples (whole micro-batches) this
        rank has already trained on."""
        if consumed % self.batch_size:
            raise ValueError(f"consumed={consumed} is not a whole number of micro-batches of {self.batch_size}")
        self.epoch, self.consumed_batches = epoch, consumed // self.batch_size

    def __len__(self) -> int:
        return max(self.num_batches - self.consumed_batches, 0)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        index, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # Renumbered so that worker 0, which DataLoader asks first, holds the next batch of the rank.
        block = (index + self.consumed_batches) % workers
        lo, hi = worker_blocks(self.lo, self.hi, self.batch_size, workers, train=self.train)[block]
        skipped = max(0, -(-(self.consumed_batches - block) // workers))  # this block's batches already consumed
        samples = self.raw_samples(lo, hi)
        if self.train and self.shuffle_buffer > 1:
            from webdataset.filters import shuffle

            seed = int(np.random.SeedSequence([self.seed, self.epoch, lo]).generate_state(1)[0])
            samples = shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=seed)(samples)
        batch: list[tuple[torch.Tensor, int, bool]] = []
        for position, image, target, replaced in self.readable(islice(samples, skipped * self.batch_size, None)):
            with seeded_rngs(sample_seed(self.seed, self.epoch, position)):
                batch.append((self.transform(image), target, replaced))
            if len(batch) == self.batch_size:
                yield _collate(batch)
                batch = []
        if batch:  # evaluation's short last batch (training blocks hold whole batches only)
            yield _collate(batch)

    def raw_samples(self, lo: int, hi: int) -> Iterator[tuple[int, dict]]:
        """(global index, undecoded sample) for stream positions [lo, hi) of this epoch."""
        from webdataset.tariterators import tarfile_samples

        order = shard_order(len(self.images.shards), self.seed, self.epoch, shuffle=self.train)
        for piece in stream_pieces(self.images.shards, order, lo, hi):
            samples = tarfile_samples([{"url": str(piece.shard.path)}])
            taken = piece.start
            for sample in islice(samples, piece.start, piece.stop):
                yield piece.shard.first + taken, sample
                taken += 1
            samples.close()
            if taken < piece.stop:
                raise UserError(
                    f"{piece.shard.path} ends after {taken} samples, but {piece.shard.count} were counted: the shard "
                    "changed while in use; rerun the writer (or delete the index beside it) and restart"
                )

    def readable(self, samples) -> Iterator[tuple[int, object, int, bool]]:
        """(global index, PIL image, target, replaced). Under data.skip_corrupt an unreadable image is
        served by the next readable one of the stream (the last one at its end), flagged `replaced`;
        it keeps its own index, hence its own augmentation."""
        pending: list[int] = []
        last = None
        for position, sample in samples:
            decoded = self.decode(sample)
            if decoded is None:
                pending.append(position)
                continue
            for waiting in pending:
                yield waiting, *decoded, True
            pending, last = [], decoded
            yield position, *decoded, False
        if pending:
            if last is None:
                raise UserError(
                    f"no image of {self.images.root}/{self.images.split}-*.tar this process reads can be decoded"
                )
            for waiting in pending:
                yield waiting, *last, True

    def decode(self, sample: dict):
        """(PIL image, label) of an undecoded sample; None for an unreadable image under skip_corrupt."""
        name = f"{sample['__url__']}: sample {sample['__key__']}"
        extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if "cls" not in sample:
            raise UserError(f"{name} has no .cls member (its integer label); {SAMPLE_LAYOUT}")
        if extension is None:
            raise UserError(f"{name} has no .jpg, .jpeg or .png member; {SAMPLE_LAYOUT}")
        try:
            target = int(sample["cls"])
        except ValueError:
            raise UserError(f"{name}: its .cls member {sample['cls'][:20]!r} is not an integer label") from None
        if not 0 <= target < self.num_classes:
            raise UserError(
                f"{name} has label {target} but data.num_classes={self.num_classes}; set data.num_classes to the "
                "number of classes the shards were written with"
            )
        try:
            image = load_image(io.BytesIO(sample[extension]))
        except UnreadableImageError as error:
            if not self.skip_corrupt:
                raise UnreadableImageError(
                    f"cannot read the image of {name}: {error.__cause__}. Rewrite the shard from readable files, or set "
                    "data.skip_corrupt=true to train on the next readable image instead (each one is counted)"
                ) from None
            warnings.warn(f"data.skip_corrupt: skipping the unreadable image of {name}", stacklevel=2)
            return None
        return image, target


def _collate(batch: list[tuple[torch.Tensor, int, bool]]) -> Sample:
    images, targets, replaced = zip(*batch, strict=True)
    return Sample(torch.stack(images), torch.tensor(targets), torch.tensor(replaced))
