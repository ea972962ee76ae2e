"""The loaders: FFCV Loaders over one .beton file, yielding (images, targets, replaced) batches like
the reference path's, with the per-batch augmentation on the device (`TrainBatches`, `ValBatches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from omegaconf import DictConfig

from convnext_train.data.ffcv.betons import Beton
from convnext_train.data.ffcv.decoder import CropDecoder, eval_decoder
from convnext_train.data.ffcv.library import IntDecoder, Loader, ToDevice, ToTensor, ToTorchImage, numba
from convnext_train.data.ffcv.order import ORDERS, RankOrder
from convnext_train.data.ffcv.repairs import CheckedLoader
from convnext_train.data.sources import LoaderArgs
from convnext_train.errors import UserError

__all__ = [
    "FFCVBatches",
    "OneDecodeAtATime",
    "TrainBatches",
    "ValBatches",
    "batch_seed",
    "decoding_threads",
    "torch_threads_kept",
]


class OneDecodeAtATime:
    """A process runs one FFCV pass at a time: starting one stops the previous (a training pass the
    trainer left early still decodes a few batches ahead). Two passes at once would double the decode
    threads, and numba's fallback threading layer (workqueue) aborts the process on concurrent use."""

    def __init__(self):
        self.active = None

    def stop(self) -> None:
        if self.active is None:
            return
        iterator, self.active = self.active, None
        iterator.terminate_event.set()  # FFCV's thread leaves at its next full queue
        iterator.join()
        with contextlib.suppress(queue.Empty):  # the batches it made are dropped, and whoever still
            while True:  # holds the pass gets its end (FFCV's None) instead of waiting forever
                iterator.output_queue.get_nowait()
        iterator.output_queue.put_nowait(None)
        iterator.close()  # its memory context; only once the thread no longer reads through it

    def start(self, loader: Loader):
        self.stop()
        with torch_threads_kept():
            self.active = iter(loader)
        return self.active


def decoding_threads(num_workers: int) -> int:
    """data.num_workers, within what numba can run: 1 at least, its thread pool's size at most (the
    CPU count unless NUMBA_NUM_THREADS says otherwise; more is an error in numba)."""
    return min(max(1, num_workers), numba.config.NUMBA_NUM_THREADS)


@contextmanager
def torch_threads_kept():
    """FFCV sets torch's CPU thread count to its own decode thread count; keep the user's."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class FFCVBatches:
    """An FFCV Loader over one .beton file, yielding (images, targets, replaced) like the reference path."""

    def __init__(
        self,
        beton: Beton,
        data_cfg: DictConfig,
        order: RankOrder,
        decoder: CropDecoder,
        args: LoaderArgs,
        *,
        guard: OneDecodeAtATime,
    ):
        if data_cfg.order not in ORDERS:  # the config checks have said so already; a direct caller has not
            raise UserError(f"data.order={data_cfg.order}: must be one of {', '.join(ORDERS)}")
        device, batch_size = args.device, args.batch_size
        self.path, self.order, self.decoder, self.device, self.guard = beton.path, order, decoder, device, guard
        self.batch_size = batch_size
        on_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
        # NCHW as a channels-last view: no torch operation in FFCV's thread. One there (a contiguous
        # copy) gives that thread its own OpenMP team, and on the CPU the batch ops of the main thread
        # then ran 2-3x slower for as long as a pass was open (measured; the batch ops take either layout).
        to_nchw = ToTorchImage(channels_last=True)
        pipelines = {
            "image": [decoder, ToTensor(), *on_device, to_nchw],
            "label": [IntDecoder(), ToTensor(), *on_device],
        }
        self.has_index = "index" in beton.reader.handlers
        if self.has_index:
            pipelines["index"] = [IntDecoder(), ToTensor()]
        with torch_threads_kept():
            self.loader = CheckedLoader(
                str(beton.path),
                batch_size=batch_size,
                num_workers=decoding_threads(data_cfg.num_workers),
                os_cache=data_cfg.os_cache,
                order=order,
                seed=args.seed & 0x7FFFFFFF,
                pipelines=pipelines,
                drop_last=False,  # RankOrder keeps whole batches where it must
                batches_ahead=data_cfg.batches_ahead,
            )
        self.num_samples = int(self.loader.reader.num_samples)

    def __len__(self) -> int:
        return -(-len(self.order.positions()) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return (batch[:3] for batch in self.batches_with_indices())

    def batches_with_indices(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray | None]]:
        """(images, targets, replaced, the images' `index` field or None): the identities, for tests."""
        epoch, start = self.order.epoch, self.order.start
        self.guard.stop()  # before the epoch changes under a pass still decoding
        self.decoder.set_epoch(epoch)
        return self._finish(self.guard.start(self.loader), epoch, start)

    def _finish(self, batches, epoch: int, start: int):
        for number, (images, labels, *index) in enumerate(batches):
            position = start + number * self.batch_size
            with torch.no_grad():
                images = self.transform(images, epoch, position)
            # FFCV reuses its batch buffers a few batches later: keep copies, not views.
            targets = labels.view(-1).to(self.device).clone()
            replaced = torch.zeros(len(targets), dtype=torch.bool)  # unreadable files were left out when writing
            yield images, targets, replaced, index[0].view(-1).numpy().copy() if index else None

    def transform(self, images: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        raise NotImplementedError


def batch_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of one batch's on-device augmentation: the batch starting at `position` of this
    rank's share of `epoch` (positions, unlike batch numbers, do not move when a run resumes)."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1)[0])


class TrainBatches(FFCVBatches):
    def __init__(
        self,
        beton: Beton,
        data_cfg: DictConfig,
        aug_cfg: DictConfig,
        args: LoaderArgs,
        *,
        guard: OneDecodeAtATime,
    ):
        from convnext_train.data.batch_augment import BatchAugment, normalize
        from convnext_train.data.rand_augment import rand_augment_policy

        img_size, seed = data_cfg.img_size, args.seed
        if aug_cfg.random_resized_crop:
            policy = rand_augment_policy(aug_cfg, img_size)
            decoder = CropDecoder(
                img_size,
                "random",
                seed=seed,
                scale=aug_cfg.scale,
                ratio=aug_cfg.ratio,
                hflip=aug_cfg.hflip,
                rand_augment=policy,
            )
            self.augment = BatchAugment(aug_cfg)
        else:  # aug=none: the eval pixels, as the reference path's train_transform gives them
            decoder = eval_decoder(img_size, aug_cfg.crop_pct)
            self.augment = lambda images, _seed: normalize(images)
        num_samples = int(beton.reader.num_samples)
        order = RankOrder(
            num_samples,
            kind=data_cfg.order,
            seed=seed,
            train=True,
            batch_size=args.batch_size,
            rank=args.rank,
            world_size=args.world_size,
        )
        super().__init__(beton, data_cfg, order, decoder, args, guard=guard)
        self.seed, self.rank = seed, args.rank

    def start_at(self, epoch: int, samples_consumed: int = 0) -> None:
        self.order.set_position(epoch, samples_consumed)

    def transform(self, images: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        return self.augment(images, batch_seed(self.seed, epoch, self.rank, position))


class ValBatches(FFCVBatches):
    def __init__(
        self,
        beton: Beton,
        data_cfg: DictConfig,
        crop_pct: float,
        args: LoaderArgs,
        *,
        guard: OneDecodeAtATime,
    ):
        from convnext_train.data.batch_augment import normalize

        self.normalize = normalize
        num_samples = int(beton.reader.num_samples)
        args = dataclasses.replace(args, seed=0)  # nothing random in a validation pass
        order = RankOrder(
            num_samples,
            kind="random",
            seed=0,
            train=False,
            batch_size=args.batch_size,
            rank=args.rank,
            world_size=args.world_size,
        )
        super().__init__(beton, data_cfg, order, eval_decoder(data_cfg.img_size, crop_pct), args, guard=guard)

    def transform(self, images: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        return self.normalize(images)
