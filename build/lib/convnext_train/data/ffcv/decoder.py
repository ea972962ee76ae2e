"""The decoder, per image in FFCV's compiled threads: JPEG decode, crop (random-resized, or the
official eval crop) and flip, then timm's RandAugment (`rand_augment.py`), the draws keyed by
(seed, epoch, image index) (`compiled.py`).
"""

from __future__ import annotations

import functools

import numpy as np

from convnext_train.data.compiled import image_key, jit, uniform
from convnext_train.data.ffcv.library import (
    IMAGE_MODES,
    Compiler,
    ResizedCropRGBImageDecoder,
    ctypes_memcopy,
    imdecode,
    numba,
    resize_crop,
)

__all__ = [
    "FLIP_DRAW",
    "UINT64",
    "CropDecoder",
    "centre_crop",
    "eval_decoder",
    "mirror",
    "native_helpers",
    "random_crop",
]

UINT64 = (1 << 64) - 1
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
        decode.exact_math = True  # see repairs.compile_with_exact_math
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
