"""The recipe's last per-image steps on a batch on the training device: normalisation and random erasing.

The FFCV fast path decodes, RandomResizedCrops, flips and RandAugments in FFCV's loader threads
(`ffcv.CropDecoder`, `rand_augment`) and hands over uint8 NCHW batches. What the PIL path does after
that (`transforms.train_transform`: ToTensor + Normalize, then RandomErasing) is done here on the
batch, each image with its own erasing draws, as timm's RandomErasing gives each image.

Randomness: a batch's erasing is a function of (seed, batch): its draws come from generators seeded
by the caller's `seed`, never from the process-wide RNGs, which the training loop draws from (drop
path, Mixup). That is why timm's `RandomErasing` is subclassed with its sampling mirrored rather than
called: it draws from `random` and torch's global generator.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing

from convnext_train.data import compiled
from convnext_train.errors import UserError

__all__ = ["BatchAugment", "normalize"]

# On the CPU, normalisation of NCHW batches runs a few images at a time: the float temporaries then
# stay in cache.
CPU_CHUNK = 2


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW with ImageNet mean/std, with the same float32 operations as
    torchvision's ToTensor + Normalize (x / 255, - mean, / std), so the values equal the PIL path's.
    The output has the input's layout."""
    nhwc = images.permute(0, 2, 3, 1)
    if images.device.type == "cpu" and nhwc.is_contiguous() and compiled.numba is not None:
        # FFCV's channels-last batches on the CPU: torch broadcasts the mean along a last dimension of
        # 3 slowly (27 ms per batch of 128 at 224 px); a table of the 256 values per channel, 13 ms.
        # numpy's allocation, not torch's: torch asks glibc for 64-byte aligned blocks, which glibc
        # cannot hand back out for the next batch, so every batch paged in 77 MB of fresh memory.
        out = np.empty(tuple(nhwc.shape), dtype=np.float32)
        normalize_by_table(nhwc.numpy(), out, _normalize_table())
        return torch.from_numpy(out).permute(0, 3, 1, 2)
    mean, std = _mean_std(images.device)
    out = torch.empty_like(images, dtype=torch.float32)
    for part in _chunks(images.shape[0], images.device):
        out[part].copy_(images[part]).div_(255).sub_(mean).div_(std)
    return out


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, -1, 1, 1)
    return mean, torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, -1, 1, 1)


@functools.cache
def _normalize_table() -> np.ndarray:
    """(3, 256) float32: what `normalize`'s operations give for each level of each channel."""
    mean, std = _mean_std(torch.device("cpu"))
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    return levels.div(255).sub(mean).div(std).view(3, 256).numpy()


@compiled.jit
def normalize_by_table(images, out, table):
    """images (N, H, W, 3) uint8 -> out (N, H, W, 3) float32 through one table per channel."""
    flat, flat_out = images.reshape(-1), out.reshape(-1)
    for i in range(0, flat.size, 3):
        flat_out[i] = table[0, flat[i]]
        flat_out[i + 1] = table[1, flat[i + 1]]
        flat_out[i + 2] = table[2, flat[i + 2]]


def _chunks(n: int, device: torch.device) -> list[slice]:
    size = CPU_CHUNK if device.type == "cpu" else max(n, 1)
    return [slice(i, i + size) for i in range(0, n, size)]


# --------------------------------------------------------------------------------------------------
# Random erasing
# --------------------------------------------------------------------------------------------------


class SeededRandomErasing(RandomErasing):
    """timm's RandomErasing (its parameters and its sampling, line for line), drawing from a
    `random.Random` and a torch generator passed in rather than from the global RNGs."""

    def erase_(self, images: torch.Tensor, rng: random.Random, noise: torch.Generator) -> torch.Tensor:
        _, chan, img_h, img_w = images.shape
        area = img_h * img_w
        batch_start = len(images) // self.num_splits if self.num_splits > 1 else 0
        for img in images[batch_start:]:
            if rng.random() > self.probability:
                continue
            count = self.min_count if self.min_count == self.max_count else rng.randint(self.min_count, self.max_count)
            for _ in range(count):
                for _attempt in range(10):
                    target_area = rng.uniform(self.min_area, self.max_area) * area / count
                    aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
                    h = round(math.sqrt(target_area * aspect_ratio))
                    w = round(math.sqrt(target_area / aspect_ratio))
                    if w < img_w and h < img_h:
                        top = rng.randint(0, img_h - h)
                        left = rng.randint(0, img_w - w)
                        img[:, top : top + h, left : left + w] = self._pixels((chan, h, w), images, noise)
                        break
        return images

    def _pixels(self, size, images, noise):
        if self.per_pixel:
            return torch.randn(size, generator=noise, dtype=images.dtype, device=images.device)
        if self.rand_color:
            return torch.randn((size[0], 1, 1), generator=noise, dtype=images.dtype, device=images.device)
        return torch.zeros((size[0], 1, 1), dtype=images.dtype, device=images.device)


# --------------------------------------------------------------------------------------------------
# The loader's entry point
# --------------------------------------------------------------------------------------------------


class BatchAugment:
    """uint8 NCHW batch (crop, flip and RandAugment already done) -> normalised float32 NCHW, randomly
    erased per sample as the recipe says (`aug.reprob`, `aug.remode`, `aug.recount`)."""

    def __init__(self, aug_cfg):
        self.erasing = None
        if aug_cfg.get("reprob", 0) > 0:
            remode = aug_cfg.get("remode", "pixel")
            try:
                self.erasing = SeededRandomErasing(
                    aug_cfg.reprob, mode=remode, max_count=aug_cfg.get("recount", 1), device="cpu"
                )
            except AssertionError:
                raise UserError(f"remode={remode!r}: random erasing modes are 'const', 'rand' and 'pixel'") from None

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        out = normalize(images)
        if self.erasing is not None:
            erase_seed, noise_seed = torch.randint(
                2**62, (2,), generator=torch.Generator().manual_seed(seed % 2**64)
            ).tolist()
            noise = torch.Generator(device=out.device).manual_seed(noise_seed)
            self.erasing.erase_(out, random.Random(erase_seed), noise)
        return out
