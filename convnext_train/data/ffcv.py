"""`data=ffcv`: the fast data path. FFCV reads `.beton` files and, per image in its compiled threads,
decodes, crops, flips and applies RandAugment; the rest of the recipe runs on whole batches.

    python data/write_ffcv.py /datasets/imagenet /datasets/imagenet-ffcv    # train.beton, val.beton
    python train.py model=convnext_t data=imagenet_ffcv data.root=/datasets/imagenet-ffcv

Training, per image in FFCV's pipeline: JPEG decode, random-resized crop with the recipe's scale and
ratio (resized with FFCV's OpenCV INTER_AREA, where the PIL path uses bicubic), horizontal flip, and
timm's RandAugment (`rand_augment.py`, bit-exact with timm's PIL ops); then, per batch on the device,
`BatchAugment` (normalisation, random erasing). Mixup/CutMix stays in the training step, as on the
reference path. Validation: the official resize + centre crop (squash at >= 384 px), normalised.

The same guarantees as the reference path (`loaders.py`):
- order: each epoch's permutation is `EpochSampler`'s, rank r takes every world_size-th image from
  position r, and `start_at(epoch, k)` continues an epoch after the k images this rank has consumed;
- randomness: the crop, flip and RandAugment of image i in epoch e are a pure function of (seed, e, i),
  drawn by a counter-based generator inside the compiled decoder, and a batch's erasing is seeded
  from (seed, epoch, rank, position); so a resumed run sees the same pixels as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from convnext_train.data.compiled import image_key, jit, uniform
from convnext_train.data.loaders import EpochSampler
from convnext_train.errors import UserError

# FFCV (and numba, which comes with it) is an optional extra: this module imports without it, and
# every entry point calls `require_ffcv` first, which turns the import failure into one line.
# Importing FFCV sets torch's CPU thread count to 1 (its compiler's default): the user's is restored.
_torch_threads = torch.get_num_threads()
try:
    import numba
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.memory_managers import OSCacheManager
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
    from ffcv.traversal_order import QuasiRandom
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.traversal_order.quasi_random import generate_order_inner
except (ImportError, OSError) as _error:  # not installed, or its native libraries cannot be loaded
    FFCV_IMPORT_ERROR: Exception | None = _error
    numba = None
    # Placeholders for the base classes below: nothing of this module is built without FFCV.
    ResizedCropRGBImageDecoder = TraversalOrder = EpochIterator = Loader = object
else:
    FFCV_IMPORT_ERROR = None
finally:
    torch.set_num_threads(_torch_threads)

__all__ = ["INSTALL_HELP", "WRITE_HELP", "ffcv_loaders", "ffcv_val_loader", "require_ffcv"]

INSTALL_HELP = (
    "FFCV is an optional extra: install its system libraries, then the extra: "
    "`sudo apt-get install pkg-config libturbojpeg0-dev libopencv-dev && pip install -e '.[ffcv]'`"
)
RECORD_FORMAT = (
    1  # of write_ffcv's records: bump when the field layout or the record changes (older files are rewritten)
)
WRITE_HELP = "write it from the ImageFolder tree with `python data/write_ffcv.py <imagefolder_root> <data.root>`"
UINT64 = (1 << 64) - 1


def require_ffcv() -> None:
    if FFCV_IMPORT_ERROR is not None:
        raise UserError(
            f"data.kind=ffcv needs the ffcv package, which cannot be imported ({FFCV_IMPORT_ERROR}). {INSTALL_HELP}"
        )


# --------------------------------------------------------------------------------------------------
# Entry points (the seam in datasets.py)
# --------------------------------------------------------------------------------------------------
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
    from convnext_train.data.datasets import Loaders  # datasets.py imports this module lazily: no cycle

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


# --------------------------------------------------------------------------------------------------
# The .beton files: found, and checked before any decoding
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Beton:
    path: Path
    reader: Reader  # header, fields and per-image metadata, read once
    record: dict | None  # what data/write_ffcv.py recorded beside it (read_record), if anything


def open_beton(data_cfg: DictConfig, split: str) -> Beton:
    """`<root>/<split>.beton`, checked to be an FFCV file of our layout whose labels fit the model."""
    path = Path(data_cfg.root) / f"{split}.beton"
    if not path.is_file():
        raise UserError(f"{path} not found: data=ffcv reads <data.root>/{split}.beton; {WRITE_HELP}")
    reader = open_reader(path)
    fields = {name: type(field).__name__ for name, field in reader.handlers.items()}
    if not (
        isinstance(reader.handlers.get("image"), RGBImageField) and isinstance(reader.handlers.get("label"), IntField)
    ):
        raise UserError(
            f"{path} has the fields {fields}, not the layout data=ffcv reads (image: RGBImageField, label: IntField, "
            f"optionally index: IntField); {WRITE_HELP}"
        )
    if reader.num_samples == 0:
        raise UserError(f"{path} holds no images; {WRITE_HELP}")
    labels = reader.metadata[f"f{list(reader.handlers).index('label')}"]  # FFCV names metadata columns by position
    if labels.min() < 0 or labels.max() >= data_cfg.num_classes:
        raise UserError(
            f"{path} has labels {labels.min()}..{labels.max()} but data.num_classes={data_cfg.num_classes}; "
            "set data.num_classes to the number of class folders the file was written from"
        )
    record = read_record(path)  # labels alone cannot tell a 10-class file from a 1000-class model
    if record is not None and "classes" in record and len(record["classes"]) != data_cfg.num_classes:
        raise UserError(
            f"{path} was written from {len(record['classes'])} class folders but data.num_classes={data_cfg.num_classes}; "
            "set data.num_classes to match the data"
        )
    return Beton(path, reader, record)


def open_reader(path: Path) -> Reader:
    try:
        return Reader(str(path))
    except (AssertionError, ValueError, IndexError, KeyError, TypeError, OSError) as error:
        raise UserError(
            f"{path} is not a readable FFCV .beton file ({error or type(error).__name__}); {WRITE_HELP}"
        ) from None


def check_class_lists(train_file: Beton, val_file: Beton | None) -> None:
    """Both files must come from one class list, or label i means two classes. The writer records the
    class folders beside each file; files written elsewhere have no record and are taken as they are."""
    if val_file is None:
        return
    records = [train_file.record, val_file.record]
    if all(records) and records[0].get("classes") != records[1].get("classes"):
        raise UserError(
            f"{train_file.path} and {val_file.path} were written from different class folders; "
            "write both from one ImageFolder root with `python data/write_ffcv.py`"
        )


def record_path(beton: Path) -> Path:
    return beton.with_name(beton.name + ".json")


def read_record(beton: Path) -> dict | None:
    """What data/write_ffcv.py recorded beside a complete file it wrote (source, settings, class
    folders). None: no file, no record, or a record for some other file (a size that differs means
    the .beton was replaced or cut short) or of an older format."""
    try:
        record = json.loads(record_path(beton).read_text())
        size = beton.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or record.get("beton_bytes") != size:
        return None
    return record


# --------------------------------------------------------------------------------------------------
# The decoder: JPEG decode, crop and flip, then RandAugment, per image in FFCV's threads
# --------------------------------------------------------------------------------------------------
FLIP_DRAW = 40  # the flip's draw number: after the crop's 10 attempts of 4 draws each


@jit
def random_crop(height, width, key, scale_min, scale_max, log_ratio_min, log_ratio_max, ratio_min, ratio_max, hflip):
    """(top, left, crop height, crop width, flip) of a random-resized crop: torchvision's and timm's
    algorithm (10 tries of an area fraction ~ U(scale) and a log aspect ratio ~ U(log ratio), then the
    whole image clipped to the ratio range), with the draws taken from (key, draw number)."""
    area = np.float64(height * width)
    for attempt in range(10):
        target_area = area * (scale_min + (scale_max - scale_min) * uniform(key, 4 * attempt))
        aspect = np.exp(log_ratio_min + (log_ratio_max - log_ratio_min) * uniform(key, 4 * attempt + 1))
        w = np.int64(round(np.sqrt(target_area * aspect)))
        h = np.int64(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(uniform(key, 4 * attempt + 2) * (height - h + 1))
            left = np.int64(uniform(key, 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w, uniform(key, FLIP_DRAW) < hflip
    in_ratio = width / height
    if in_ratio < ratio_min:
        w = width
        h = np.int64(round(w / ratio_min))
    elif in_ratio > ratio_max:
        h = height
        w = np.int64(round(h * ratio_max))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, uniform(key, FLIP_DRAW) < hflip


@jit
def centre_crop(height, width, img_size, resize_size):
    """The official eval geometry in source pixels: resizing the shorter side to `resize_size`, then
    taking the central img_size square, reads this square of the source."""
    shorter = min(height, width)
    side = min(shorter, np.int64(round(img_size * shorter / resize_size)))
    return (height - side) // 2, (width - side) // 2, side, side


@jit
def mirror(image):
    """Flip an HWC image left-right in place."""
    width = image.shape[1]
    for row in range(image.shape[0]):
        for column in range(width // 2):
            for channel in range(image.shape[2]):
                other = width - 1 - column
                value = image[row, column, channel]
                image[row, column, channel] = image[row, other, channel]
                image[row, other, channel] = value


class CropDecoder(ResizedCropRGBImageDecoder):
    """Decodes an RGBImageField and resizes a crop of it to (size, size), one of three ways:
    - `random`: the recipe's random-resized crop and flip, keyed by (seed, epoch, image index);
    - `centre`: the official eval crop (shorter side to `resize_size`, central `size` square);
    - `squash`: the whole image to a square (the official eval at >= 384 px).
    With `rand_augment` (a `RandAugmentPolicy`, random mode only), timm's RandAugment follows the crop
    and flip, on the image still in cache, its draws keyed like the crop's.

    The epoch is read at run time from a one-number cell owned by the decoder: FFCV compiles the
    pipeline once and freezes everything it closes over, so a new epoch cannot be passed as a
    constant; the cell's address is the constant and its content changes (`set_epoch`).
    """

    def __init__(
        self,
        size: int,
        mode: str,
        *,
        seed: int = 0,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip: float = 0.0,
        resize_size: int = 0,
        rand_augment=None,
    ):
        super().__init__((size, size))
        if rand_augment is not None and mode != "random":
            raise ValueError("RandAugment is for the random (training) crop")
        self.rand_augment = rand_augment
        self.mode, self.seed, self.hflip, self.resize_size = mode, seed & UINT64, float(hflip), resize_size
        self.scale, self.ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        self.epoch_cell = np.zeros(1, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch_cell[0] = epoch

    @property
    def get_crop_generator(self):  # FFCV's abstract hook; generate_code below does not use it
        return None

    def crop_function(self):
        size = self.output_size[0]
        if self.mode == "random":
            (s0, s1), (r0, r1), p = self.scale, self.ratio, self.hflip
            lr0, lr1 = float(np.log(r0)), float(np.log(r1))

            def crop(height, width, key):
                return random_crop(height, width, key, s0, s1, lr0, lr1, r0, r1, p)
        elif self.mode == "centre":
            resize_size = self.resize_size

            def crop(height, width, key):
                top, left, h, w = centre_crop(height, width, size, resize_size)
                return top, left, h, w, False
        elif self.mode == "squash":

            def crop(height, width, key):
                return np.int64(0), np.int64(0), height, width, False
        else:
            raise ValueError(f"unknown crop mode {self.mode!r}")
        return numba.njit(nogil=True)(crop)  # a closure: not cached on disk

    def augment_function(self):
        if self.rand_augment is None:

            def augment(image, key):
                pass
        else:
            from convnext_train.data.rand_augment import rand_augment

            arguments = self.rand_augment.arguments()

            def augment(image, key):
                rand_augment(image, key, *arguments)

        return numba.njit(nogil=True)(augment)

    def generate_code(self):
        jpeg = IMAGE_MODES["jpg"]
        read = self.memory_read
        crop, augment = self.crop_function(), self.augment_function()
        decode_jpeg, resize = native_helpers()
        copy = ctypes_memcopy
        samples = Compiler.get_iterator()
        set_parallel_chunksize = numba.set_parallel_chunksize
        seed = np.uint64(self.seed)
        epoch_address = np.uintp(self.epoch_cell.ctypes.data)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            epoch = np.zeros(1, dtype=np.int64)
            copy(epoch_address, epoch.ctypes.data, 8)
            # Images one at a time to whichever thread is free: their costs differ several-fold (JPEG
            # or raw, RandAugment's ops), and equal shares left a thread idle at the end of each batch.
            chunk_size = set_parallel_chunksize(1)
            for slot in samples(len(batch_indices)):
                index = batch_indices[slot]
                field = metadata[index]
                data = read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                if field["mode"] == jpeg:
                    decode_jpeg(data, scratch[slot], height, width, height, width, 0, 0, 1, 1, False, False)
                    image = scratch[slot].reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                key = image_key(seed, epoch[0], index)
                top, left, h, w, flip = crop(height, width, key)
                resize(image, top, top + h, left, left + w, destination[slot])
                if flip:
                    mirror(destination[slot])
                augment(destination[slot], key)
            set_parallel_chunksize(chunk_size)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        decode.exact_math = True  # see compile_with_exact_math
        return decode


@functools.cache
def native_helpers():
    """FFCV's JPEG decoder and OpenCV resize, compiled once per process for every decoder (FFCV
    compiles them again for each one, seconds each time)."""
    return Compiler.compile(imdecode), Compiler.compile(resize_crop)


def eval_decoder(img_size: int, crop_pct: float) -> CropDecoder:
    """The official eval preprocessing (`transforms.eval_transform`) as a decoder."""
    from convnext_train.data.transforms import SQUASH_FROM_SIZE  # timm: not for data/write_ffcv.py's start-up

    if img_size >= SQUASH_FROM_SIZE:
        return CropDecoder(img_size, "squash")
    return CropDecoder(img_size, "centre", resize_size=int(img_size / crop_pct))


def batch_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of one batch's on-device augmentation: the batch starting at `position` of this
    rank's share of `epoch` (positions, unlike batch numbers, do not move when a run resumes)."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------
# Order: EpochSampler's semantics for FFCV
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Two repairs of FFCV 1.0.2
# --------------------------------------------------------------------------------------------------
def compile_reader_keeping_numba_types(self):
    """`OSCacheManager.compile_reader` without its explicit signature. Building that signature (its
    `state_type`) sets `mutable = False` on numba's interned `uint8[::1]` type in place, which changes
    the hash of a type that compiled functions are keyed by: after a second Loader is built, numba
    fails with a KeyError inside code compiled for the first (in FFCV's thread, see below). Compiled
    on its first call instead, for the types it is called with: a read-only memory map and two tables."""

    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address : address + size]

    return Compiler.compile(read)


def compile_with_exact_math(cls, code, signature=None):
    """FFCV's `Compiler.compile`, without fast-math for code marked `exact_math` (our decoder). FFCV
    compiles every pipeline stage with fastmath=True, and numba compiles what a stage calls under the
    stage's flags: RandAugment's float arithmetic then got fused multiply-adds and came out a grey
    level away from PIL's on some pixels (and `op_argument` gave 0.1666 as 0.16660000000000003)."""
    if not getattr(code, "exact_math", False):
        return _ffcv_compile(cls, code, signature)
    parallel = getattr(code, "is_parallel", False) and cls.num_threads > 1
    return numba.njit(signature, nogil=True, error_model="numpy", parallel=parallel)(code)


if FFCV_IMPORT_ERROR is None:
    OSCacheManager.compile_reader = compile_reader_keeping_numba_types
    _ffcv_compile = Compiler.compile.__func__
    Compiler.compile = classmethod(compile_with_exact_math)


class CheckedEpochIterator(EpochIterator):
    """FFCV's pass over one epoch, except that an error in its decoding thread reaches the consumer:
    FFCV's thread dies with it and the consumer waits forever for the next batch."""

    error: BaseException | None = None

    def run(self):
        try:
            super().run()
        except BaseException as error:  # noqa: BLE001 - handed over to the consumer, raised there
            self.error = error
            while not self.terminate_event.is_set():
                with contextlib.suppress(queue.Full):
                    self.output_queue.put(None, timeout=0.5)
                    return

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise RuntimeError(f"FFCV's decoding thread failed: {self.error!r}") from self.error
            raise


class CheckedLoader(Loader):
    """FFCV's Loader making `CheckedEpochIterator`s. The order object gives the whole pass (our
    epoch and start position; FFCV's own epoch counter is not used)."""

    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        return CheckedEpochIterator(self, self.traversal_order.sample_order(self.next_epoch))


# --------------------------------------------------------------------------------------------------
# The loaders
# --------------------------------------------------------------------------------------------------
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
        *,
        seed: int,
        batch_size: int,
        device: torch.device,
        guard: OneDecodeAtATime,
    ):
        from convnext_train.config import FFCV_ORDERS

        if data_cfg.order not in FFCV_ORDERS:  # train.py has checked it; eval.py and the bench have not
            raise UserError(f"data.order={data_cfg.order}: must be one of {', '.join(FFCV_ORDERS)}")
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
                seed=seed & 0x7FFFFFFF,
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


class TrainBatches(FFCVBatches):
    def __init__(
        self,
        beton: Beton,
        data_cfg: DictConfig,
        aug_cfg: DictConfig,
        *,
        seed: int,
        batch_size: int,
        device: torch.device,
        rank: int,
        world_size: int,
        guard: OneDecodeAtATime,
    ):
        from convnext_train.data.batch_augment import BatchAugment, normalize
        from convnext_train.data.rand_augment import rand_augment_policy

        img_size = data_cfg.img_size
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
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
        )
        super().__init__(beton, data_cfg, order, decoder, seed=seed, batch_size=batch_size, device=device, guard=guard)
        self.seed, self.rank = seed, rank

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
        *,
        batch_size: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        guard: OneDecodeAtATime,
    ):
        from convnext_train.data.batch_augment import normalize

        self.normalize = normalize
        num_samples = int(beton.reader.num_samples)
        order = RankOrder(
            num_samples, kind="random", seed=0, train=False, batch_size=batch_size, rank=rank, world_size=world_size
        )
        super().__init__(
            beton,
            data_cfg,
            order,
            eval_decoder(data_cfg.img_size, crop_pct),
            seed=0,
            batch_size=batch_size,
            device=device,
            guard=guard,
        )

    def transform(self, images: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        return self.normalize(images)
