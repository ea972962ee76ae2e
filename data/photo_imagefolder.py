#!/usr/bin/env python3
"""Write an ImageFolder tree of ImageNet-like JPEG photos, without a download: for the FFCV tests and
the loader benchmark (`data/loader_benchmark.py`).

    python data/photo_imagefolder.py /tmp/photos --classes 10 --train-per-class 200 --val-per-class 10

Each image is a random crop of one of the two photographs bundled with scikit-learn (640 x 427),
resized to a random ImageNet-like size (shorter side 250..450, aspect 0.75..1.45: about 400 x 370 on
average, as ImageNet's images are), slightly tinted by its class, and saved as a quality-90 JPEG.
Class c's tint is `TINT_STRENGTH` x a random amount in one channel direction: classes overlap, so a
small model learns them well but not perfectly (the FFCV evaluation-equivalence test needs a model
that is neither always right nor always wrong). Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

TINT_STRENGTH = 24.0  # at most this much added to the class's colour direction (0..255 scale)


def class_tint(c: int, classes: int) -> np.ndarray:
    """Unit colour directions spread around the hue circle, one per class."""
    angle = 2 * np.pi * c / classes
    direction = np.array([np.cos(angle), np.cos(angle - 2 * np.pi / 3), np.cos(angle + 2 * np.pi / 3)])
    return direction / np.abs(direction).max()


def photo_image(photos: list[np.ndarray], label: int, classes: int, rng: np.random.Generator) -> Image.Image:
    photo = photos[rng.integers(len(photos))]
    height, width = photo.shape[:2]
    crop_h = int(rng.integers(height // 2, height + 1))
    crop_w = int(min(width, crop_h * rng.uniform(0.8, 1.5)))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    shorter = int(rng.integers(250, 451))
    aspect = rng.uniform(0.75, 1.45)
    size = (int(shorter * aspect), shorter) if aspect >= 1 else (shorter, int(shorter / aspect))
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = (
        pixels + TINT_STRENGTH * rng.uniform(0, 1) * class_tint(label, classes) + rng.normal(0, 12)
    )  # tint, brightness
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_photo_imagefolder(
    root: Path, *, classes: int, train_per_class: int, val_per_class: int, seed: int = 0, quality: int = 90
) -> Path:
    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                photo_image(photos, c, classes, rng).save(folder / f"{split}_{c:03d}_{i:05d}.JPEG", quality=quality)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_photo_imagefolder(
        args.root,
        classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
    )
    print(
        f"{args.root}: {args.classes * (args.train_per_class + args.val_per_class)} JPEG photos in {args.classes} classes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
