#!/usr/bin/env python3
"""Regenerate ImageNet-C from the validation set, for users who cannot download the released one.

    python data/make_imagenet_c.py /datasets/imagenet/val /datasets/imagenet-c
    python eval.py checkpoint=... data=imagenet_c data.root=/datasets/imagenet-c

writes <out_dir>/<corruption>/<severity>/<wnid>/<image> for the benchmark's 15 corruptions at
severities 1..5, the layout of the release (and of `data=imagenet_c`). Each validation image is
prepared as the authors did (resize the shorter side to 256, centre-crop 224), corrupted with their
code (the `imagecorruptions` package: pip install -e '.[robustness]'; see
convnext_train/data/corruptions.py for the shims it needs today) and saved as JPEG, quality 85.

The numbers on a regenerated set are close to, not identical with, the released set's: the
corruptions draw random noise (seeded here per image, corruption and severity, so a rerun writes
the same files; the release's draws are not recorded) and the library versions differ.

Every core works (--workers, one source image per task); a progress bar counts images. Resumable:
each file is written under a temporary name and renamed when complete, and a rerun skips the files
that exist, so a killed run goes on where it stopped. Exit codes: 0 done, 2 unusable input.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from convnext_train.atomic import write_atomically
from convnext_train.data.corruptions import corrupt_function
from convnext_train.data.imagefolder import ImageFolderDataset, load_image
from convnext_train.data.robustness import CORRUPTIONS, SEVERITIES
from convnext_train.errors import UserError, exit_on_user_error

RESIZE, CROP, JPEG_QUALITY = 256, 224, 85  # the authors' make_imagenet_c.py


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python data/make_imagenet_c.py",
        description="Corrupt <val_dir>/<wnid>/* into <out_dir>/<corruption>/<severity>/<wnid>/* (ImageNet-C).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("val_dir", type=Path, help="the validation set by class: <val_dir>/<wnid>/*.JPEG")
    parser.add_argument("out_dir", type=Path, help="ImageNet-C's root (data.root of data=imagenet_c)")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=CORRUPTIONS, metavar="NAME")
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), choices=SEVERITIES)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.val_dir.is_dir():
        raise UserError(f"{args.val_dir} is not a directory; expected the validation set as <val_dir>/<wnid>/*.JPEG")
    corrupt_function()  # a missing or broken imagecorruptions stops here, before any work
    images = ImageFolderDataset(args.val_dir.parent, args.val_dir.name)
    outputs = [(corruption, severity) for corruption in args.corruptions for severity in args.severities]
    tasks = []
    for path, _target in images.samples:
        relative = Path(path).relative_to(args.val_dir)
        todo = [(c, s) for c, s in outputs if not _output(args.out_dir, c, s, relative).exists()]
        if todo:
            tasks.append((path, str(relative), todo))
    print(
        f"{len(images.samples)} images x {len(outputs)} corruption/severity folders: "
        f"{len(tasks)} images still to do, {args.workers} workers",
        flush=True,
    )
    work = [(path, relative, todo, str(args.out_dir)) for path, relative, todo in tasks]
    with multiprocessing.Pool(max(1, args.workers)) as pool:
        for _ in tqdm(pool.imap_unordered(_corrupt_one, work), total=len(work), unit="image", file=sys.stdout):
            pass
    print(f"done: {args.out_dir}")
    return 0


_CORRUPT = None


def _corrupt_one(task: tuple[str, str, list[tuple[str, int]], str]) -> None:
    """Every missing output of one source image (decoded and cropped once)."""
    global _CORRUPT
    if _CORRUPT is None:
        _CORRUPT = corrupt_function()
    path, relative, todo, out_dir = task
    image = np.asarray(_resize_and_crop(load_image(path)))
    for corruption, severity in todo:
        # Seeded per output, so a rerun (or a resume) writes the same file; the draws are NumPy's global ones.
        np.random.seed(_seed(relative, corruption, severity))
        corrupted = np.uint8(np.clip(_CORRUPT(image, corruption, severity), 0, 255))
        buffer = io.BytesIO()
        Image.fromarray(corrupted).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        write_atomically(
            _output(Path(out_dir), corruption, severity, Path(relative)), lambda f, b=buffer: f.write(b.getvalue())
        )


def _resize_and_crop(image: Image.Image) -> Image.Image:
    """torchvision's Resize(256) + CenterCrop(224), as the authors' script prepares each image."""
    from torchvision import transforms

    return transforms.CenterCrop(CROP)(transforms.Resize(RESIZE)(image))


def _seed(relative: str, corruption: str, severity: int) -> int:
    digest = hashlib.sha256(f"{relative}|{corruption}|{severity}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _output(out_dir: Path, corruption: str, severity: int, relative: Path) -> Path:
    return out_dir / corruption / str(severity) / relative


if __name__ == "__main__":
    sys.exit(main())
