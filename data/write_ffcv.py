#!/usr/bin/env python3
"""Write an ImageFolder tree as the FFCV .beton files `data=ffcv` and `data=imagenet_ffcv` read.

    python data/write_ffcv.py /datasets/imagenet /datasets/imagenet-ffcv
    python data/write_ffcv.py /datasets/imagenet-22k /datasets/in22k-ffcv --splits train

writes <out_dir>/<split>.beton for each split (<root>/train/<class>/*, <root>/val/<class>/*), with the
fields `image` (RGBImageField), `label` (the ImageFolder class index, classes sorted as torchvision's
ImageFolder sorts them, so labels equal the reference path's) and `index` (the image's index in its
ImageFolder split). The defaults are the settings of FFCV's ImageNet example: longer side at most 500
px, each image stored as JPEG (quality 90) with probability 0.5 and as raw pixels otherwise. A full
ImageNet-1K train.beton at these settings is several hundred GB; raw pixels are what make it fast.

Next to each file, <split>.beton.json records what it was written from (the file list with sizes and
modification times, the class folders) and how. A rerun whose source and settings match leaves the
file alone; anything else rewrites it. A file is written under a temporary name and renamed only
when complete, so an interrupted run never leaves a complete-looking .beton behind.

Unreadable images stop the split with an error naming them (all of them, after one pass), unless
--skip-corrupt leaves them out; either way they are counted in the summary.
Exit codes: 0 done, 2 unusable input (one line saying what to fix).

One script, just over 400 lines: its sections (command line; one split, kept up to date; FFCV's
writer with its failure modes closed) are one job read top to bottom, used by nothing else; what
the loaders share with it (`read_record`, `RECORD_FORMAT`) lives in convnext_train/data/ffcv/betons.py.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from convnext_train.atomic import fsync_path, process_alive, write_text_atomically
from convnext_train.data.ffcv import FFCV_IMPORT_ERROR, RECORD_FORMAT, read_record, record_path, require_ffcv
from convnext_train.data.imagefolder import ImageFolderDataset, UnreadableImageError, read_splits
from convnext_train.errors import UserError, exit_on_user_error

if FFCV_IMPORT_ERROR is None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
    from tqdm import tqdm
else:
    DatasetWriter = object  # main() stops at require_ffcv() first

WRITE_MODES = ("proportion", "jpg", "raw")  # per image: JPEG with probability p, always, never
# A stand-in for an unreadable file during the pass that finds them; it never reaches a finished file.
PLACEHOLDER = np.zeros((8, 8, 3), dtype=np.uint8)
NAMED_IN_ERROR = 5  # unreadable files named in the one-line error; the full list goes to a file


@dataclass(frozen=True)
class Settings:
    """How images are stored; a file written with other settings is rewritten."""

    max_resolution: int = 500
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    write_mode: str = "proportion"


@dataclass
class Outcome:
    split: str
    path: Path
    images: int
    skipped: list[str]
    classes: int
    rewritten: bool
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.rewritten:
            return f"{self.path}: up to date ({self.images:,} images, {self.classes} classes; source and settings unchanged), left as it is"
        size = self.path.stat().st_size / 1e9
        return (
            f"{self.path}: {self.images:,} images written, {len(self.skipped):,} skipped as unreadable, "
            f"{self.classes} classes, {size:.2f} GB, {self.seconds:.0f} s"
        )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python data/write_ffcv.py",
        description="Write <root>/<split>/<class>/* ImageFolder splits as <out_dir>/<split>.beton for data=ffcv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", type=Path, help="ImageFolder root: <root>/train/<class>/*, <root>/val/<class>/*")
    parser.add_argument(
        "out_dir", type=Path, help="where <split>.beton and <split>.beton.json go (data.root of data=ffcv)"
    )
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders to write")
    parser.add_argument(
        "--max-resolution", type=int, default=defaults.max_resolution, help="longer side at most this many pixels"
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=defaults.jpeg_quality, help="quality of the images stored as JPEG"
    )
    parser.add_argument(
        "--compress-probability",
        type=float,
        default=defaults.compress_probability,
        help="share of images stored as JPEG (write mode proportion)",
    )
    parser.add_argument(
        "--write-mode", choices=WRITE_MODES, default=defaults.write_mode, help="FFCV's RGBImageField write_mode"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="writer processes")
    parser.add_argument(
        "--skip-corrupt", action="store_true", help="leave unreadable images out (counted) instead of stopping"
    )
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_ffcv()
    settings = Settings(args.max_resolution, args.jpeg_quality, args.compress_probability, args.write_mode)
    check_settings(settings, args.workers)
    for split, images in read_splits(args.root, args.splits).items():
        outcome = write_split(
            split, images, args.out_dir, settings, workers=args.workers, skip_corrupt=args.skip_corrupt
        )
        print(outcome.summary(), flush=True)
    return 0


def check_settings(settings: Settings, workers: int) -> None:
    problems = []
    if not 16 <= settings.max_resolution <= 8192:
        problems.append(f"--max-resolution {settings.max_resolution}: must be in [16, 8192]")
    if not 1 <= settings.jpeg_quality <= 100:
        problems.append(f"--jpeg-quality {settings.jpeg_quality}: must be in [1, 100]")
    if not 0 <= settings.compress_probability <= 1:
        problems.append(f"--compress-probability {settings.compress_probability}: must be in [0, 1]")
    if workers < 1:
        problems.append(f"--workers {workers}: must be at least 1")
    if problems:
        raise UserError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# One split: skip when up to date, otherwise write to a temporary name and rename when complete
# --------------------------------------------------------------------------------------------------
def write_split(
    split: str, images: ImageFolderDataset, out_dir: Path, settings: Settings, *, workers: int, skip_corrupt: bool
) -> Outcome:
    out_dir.mkdir(parents=True, exist_ok=True)
    beton = out_dir / f"{split}.beton"
    record_file = record_path(beton)
    source = source_fingerprint(images)
    record = read_record(beton)
    if record is not None and record["settings"] == asdict(settings) and record["source"]["sha256"] == source["sha256"]:
        return Outcome(split, beton, record["images"], record["skipped"], len(images.classes), rewritten=False)

    remove_abandoned_temporaries(beton)
    temporary = beton.with_name(f".{beton.name}.{os.getpid()}.tmp")
    unreadable_log = temporary.with_name(temporary.name + ".unreadable")
    started = time.perf_counter()
    try:
        indices = list(range(len(images)))
        unreadable = write_beton(
            images, indices, temporary, settings, workers=workers, unreadable_log=unreadable_log, label=f"{split}.beton"
        )
        if unreadable:
            report_unreadable(images, unreadable, out_dir / f"{split}.unreadable.txt", skip_corrupt)
            # Rare enough to pay a second pass for: the file's image count is fixed when writing starts.
            indices = [i for i in indices if i not in unreadable]
            if not indices:
                raise UserError(f"no image in {images.split_dir} can be read")
            unreadable_log.unlink()
            write_beton(
                images,
                indices,
                temporary,
                settings,
                workers=workers,
                unreadable_log=unreadable_log,
                label=f"{split}.beton",
            )
        fsync_path(temporary)  # on disk before it takes the final name
        # The old record goes first: from here until the new one is written, the file is not vouched for.
        record_file.unlink(missing_ok=True)
        os.replace(temporary, beton)
        fsync_path(out_dir)  # the rename itself
    finally:
        temporary.unlink(missing_ok=True)
        unreadable_log.unlink(missing_ok=True)
    skipped = [images.samples[i][0] for i in sorted(set(range(len(images))) - set(indices))]
    record = {
        "format": RECORD_FORMAT,
        "ffcv": importlib.metadata.version("ffcv"),
        "settings": asdict(settings),
        "source": source,
        "classes": images.classes,
        "images": len(indices),
        "skipped": skipped,
        "beton_bytes": beton.stat().st_size,
    }
    write_text_atomically(record_file, json.dumps(record, indent=1) + "\n")
    return Outcome(
        split, beton, len(indices), skipped, len(images.classes), rewritten=True, seconds=time.perf_counter() - started
    )


def source_fingerprint(images: ImageFolderDataset) -> dict:
    """What the file was written from: every image's path (relative to the split), class, size and
    modification time. Moving the tree keeps it; touching, adding, removing or renaming a file changes it."""
    digest = hashlib.sha256()
    for path, target in images.samples:
        stat = os.stat(path)
        digest.update(
            f"{os.path.relpath(path, images.split_dir)}\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return {"split_dir": str(images.split_dir.resolve()), "images": len(images.samples), "sha256": digest.hexdigest()}


def remove_abandoned_temporaries(beton: Path) -> None:
    """Temporary files of writers that died (killed, machine lost); a live writer's file is kept."""
    for temporary in beton.parent.glob(f".{beton.name}.*.tmp*"):
        pid = temporary.name[len(beton.name) + 2 :].split(".")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            temporary.unlink(missing_ok=True)


def report_unreadable(
    images: ImageFolderDataset, unreadable: dict[int, str], list_path: Path, skip_corrupt: bool
) -> None:
    """Stop with the unreadable files named, or (--skip-corrupt) say which ones are left out."""
    lines = [f"{images.samples[i][0]}\t{reason}" for i, reason in sorted(unreadable.items())]
    write_text_atomically(list_path, "\n".join(lines) + "\n")
    named = "; ".join(f"{images.samples[i][0]} ({reason})" for i, reason in sorted(unreadable.items())[:NAMED_IN_ERROR])
    more = f" and {len(unreadable) - NAMED_IN_ERROR} more" if len(unreadable) > NAMED_IN_ERROR else ""
    if not skip_corrupt:
        raise UserError(
            f"{len(unreadable)} unreadable image(s) in {images.split_dir}: {named}{more} (all listed in {list_path}); "
            "replace or delete them, or pass --skip-corrupt to leave them out"
        )
    print(
        f"--skip-corrupt: leaving out {len(unreadable)} unreadable image(s) of {images.split_dir}: {named}{more} (listed in {list_path})",
        flush=True,
    )


# --------------------------------------------------------------------------------------------------
# The FFCV writer, with its failure modes closed
# --------------------------------------------------------------------------------------------------
class WriterSamples:
    """What FFCV's writer processes read: (HWC uint8 image, label, index) of ImageFolder image i.

    An unreadable file must not raise there: FFCV's writer waits forever for a worker that died. It is
    logged (one JSON line per file; O_APPEND lines from several processes do not interleave) and
    written as a placeholder, and the caller decides what to do once the pass is over.
    """

    def __init__(self, images: ImageFolderDataset, unreadable_log: Path):
        self.images, self.unreadable_log = images, unreadable_log

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            image, target, _ = self.images[index]
            pixels = np.asarray(image)
        except UnreadableImageError as error:
            reason = str(error.__cause__ or error).replace("\n", " ")
            with open(self.unreadable_log, "a") as log:
                log.write(json.dumps([int(index), reason]) + "\n")
            pixels, target = PLACEHOLDER, 0
        # write_mode=proportion draws from numpy's global RNG, once per image, in whichever process
        # writes it: seeding by index makes the choice (JPEG or raw) the same on every run.
        np.random.seed(index % 2**32)
        return pixels, target, index


def write_beton(
    images: ImageFolderDataset,
    indices: list[int],
    path: Path,
    settings: Settings,
    *,
    workers: int,
    unreadable_log: Path,
    label: str,
) -> dict[int, str]:
    """Write images[indices] to `path`; return the unreadable ones found ({index: reason})."""
    fields = {
        "image": RGBImageField(
            write_mode=settings.write_mode,
            max_resolution=settings.max_resolution,
            jpeg_quality=settings.jpeg_quality,
            compress_probability=settings.compress_probability,
        ),
        "label": IntField(),
        "index": IntField(),
    }
    writer = Writer(
        str(path),
        fields,
        page_size=page_size_for(settings.max_resolution),
        num_workers=min(workers, max(1, len(indices))),
        label=label,
    )
    writer.from_indexed_dataset(
        WriterSamples(images, unreadable_log), indices=np.asarray(indices, dtype=np.int64), chunksize=64
    )
    if not unreadable_log.exists():
        return {}
    entries = [json.loads(line) for line in unreadable_log.read_text().splitlines() if line.strip()]
    return {index: reason for index, reason in entries}


def page_size_for(max_resolution: int) -> int:
    """FFCV stores an image within one page: a page must hold the largest raw image (its writer
    would otherwise fail, and hang, on the first one)."""
    largest = max_resolution * max_resolution * 3
    return max(4 * MIN_PAGE_SIZE, 1 << (2 * largest - 1).bit_length())


class Writer(DatasetWriter):
    """FFCV's DatasetWriter with its worker orchestration replaced (`_write_common`, the same steps):
    a labelled progress bar, and a worker that dies (out of memory, a bug) fails the write instead of
    leaving FFCV's loop waiting forever for its images."""

    def __init__(self, *args, label: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.label = label

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()  # header and field descriptors; shared memory for the per-image metadata
        work: multiprocessing.Queue = multiprocessing.Queue()
        for chunk in queue_content:
            work.put(chunk)
        for _ in range(self.num_workers):
            work.put(None)  # one stop sign per worker
        tables: multiprocessing.Queue = multiprocessing.Queue()
        done = multiprocessing.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        worker_args = (
            work,
            self.metadata_sm,
            self.metadata_type,
            self.fields,
            allocator,
            done,
            tables,
            *extra_worker_args,
        )
        workers = [
            multiprocessing.Process(target=work_fn, args=worker_args, daemon=True) for _ in range(self.num_workers)
        ]
        try:
            for worker in workers:
                worker.start()
            allocations = self._wait(workers, tables, done)
            self.finalize(allocations)  # metadata, allocation table, header
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _wait(self, workers, tables, done) -> list:
        """Each worker sends its allocation table when it has written all its images."""
        allocations: list = []
        finished = 0
        with tqdm(total=self.num_samples, desc=self.label, unit="img", dynamic_ncols=True, disable=None) as progress:
            while finished < len(workers):
                try:
                    allocations.extend(tables.get(timeout=0.2))
                    finished += 1
                except queue.Empty:
                    dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                    if dead:
                        raise UserError(
                            f"an FFCV writer process died (exit code {dead[0]}; -9 is usually the kernel's out-of-memory "
                            f"killer) while writing {self.label}; nothing was kept: rerun, with fewer --workers if memory is short"
                        ) from None
                progress.update(done.value - progress.n)
        return allocations


if __name__ == "__main__":
    sys.exit(main())
