#!/usr/bin/env python3
"""Write an ImageFolder tree as the WebDataset tar shards `data=wds` reads.

    python data/write_wds.py /datasets/imagenet /datasets/imagenet-wds
    python data/write_wds.py /datasets/imagenet-22k /datasets/in22k-wds --splits train

writes <out_dir>/<split>-NNNNNN.tar with `webdataset.ShardWriter`, one sample per image: `__key__` (the
image's index in its ImageFolder split, nine digits), `jpg` or `png` (the file's own bytes, not
re-encoded; other formats are stored as PNG) and `cls` (the ImageFolder class index, classes sorted as
torchvision sorts them, so labels equal the reference path's). The images are written in a
permutation seeded by --seed, --shard-size to a shard: ImageFolder order is class by class, and the
loader's shuffle (shard order plus a buffer) needs shards that each hold a mix of classes.

Every image is decoded once (in --workers processes) before it is stored, so a file training could not
read is found now. An unreadable one stops the split at the end of its shard with the files named
(replace or delete them and rerun), unless --skip-corrupt leaves it out (counted, and listed in the index).

Resumable: a shard is written under a temporary name and renamed when complete, and recorded (its
images' sizes and modification times, its sample count and bytes) in <out_dir>/.<split>.progress.json.
A rerun keeps every complete shard whose images are unchanged and writes the others. The index
<out_dir>/<split>.json (class names, per-shard sample counts and bytes), which the loader reads, is
written last, when every shard is complete; a rerun with nothing to do leaves everything alone.
Shards `<split>-*.tar` in out_dir that the split does not consist of are removed.
Exit codes: 0 done, 2 unusable input (one line saying what to fix).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from convnext_train.atomic import fsync_path, process_alive, write_text_atomically
from convnext_train.data.imagefolder import ImageFolderDataset, UnreadableImageError, load_image, read_splits
from convnext_train.data.wds_shards import INDEX_FORMAT, index_path, require_webdataset
from convnext_train.errors import UserError, exit_on_user_error

NAMED_IN_ERROR = 5  # unreadable files named in the one-line error; the index or the list file has all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python data/write_wds.py",
        description="Write <root>/<split>/<class>/* ImageFolder splits as <out_dir>/<split>-NNNNNN.tar for data=wds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", type=Path, help="ImageFolder root: <root>/train/<class>/*, <root>/val/<class>/*")
    parser.add_argument("out_dir", type=Path, help="where the shards and <split>.json go (data.root of data=wds)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders to write")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (ImageNet: ~110 MB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order the images are written in")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes reading and checking images")
    parser.add_argument(
        "--skip-corrupt", action="store_true", help="leave unreadable images out (counted) instead of stopping"
    )
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_webdataset()
    if args.shard_size < 1 or args.workers < 1 or not 0 <= args.seed < 2**32:
        raise UserError("--shard-size and --workers must be at least 1, --seed in [0, 2**32)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, images in read_splits(args.root, args.splits).items():
        print(write_split(split, images, args), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# One split: the plan, the shards kept, the shards written, the index last
# --------------------------------------------------------------------------------------------------
def write_split(split: str, images: ImageFolderDataset, args: argparse.Namespace) -> str:
    started = time.perf_counter()
    out, size = args.out_dir, args.shard_size
    order = np.random.default_rng(args.seed).permutation(len(images)).tolist()
    plan = plan_digest(images, order, size)
    groups = [order[start : start + size] for start in range(0, len(order), size)]
    names = [f"{split}-{k:06d}.tar" for k in range(len(groups))]
    progress_file = out / f".{split}.progress.json"
    done = previous_records(out, split, plan)
    records = {
        name: done[name]
        for k, name in enumerate(names)
        if still_complete(out / name, done.get(name), images, groups[k])
    }
    kept = set(records)
    if len(kept) == len(names) and index_path(out, split).is_file():
        return f"{out}/{split}-*.tar: up to date ({len(names)} shards; source unchanged), left as they are"
    remove_abandoned_temporaries(out, split)
    todo = [k for k, name in enumerate(names) if name not in kept]
    from tqdm import tqdm

    with (
        multiprocessing.Pool(args.workers) as pool,
        tqdm(total=sum(len(groups[k]) for k in todo), desc=split, unit="img", disable=None) as bar,
    ):
        for k in todo:
            records[names[k]] = write_shard(out, split, k, images, groups[k], pool, bar, skip_corrupt=args.skip_corrupt)
            write_text_atomically(progress_file, json.dumps({"plan": plan, "shards": records}) + "\n")
    for stale in set(out.glob(f"{split}-*.tar")) - {out / name for name in names}:
        stale.unlink()
    index = {
        "format": INDEX_FORMAT,
        "webdataset": importlib.metadata.version("webdataset"),
        "plan": plan,
        "source": str(images.split_dir.resolve()),
        "classes": images.classes,
        "images": sum(r["samples"] for r in records.values()),
        "skipped": [path for name in names for path in records[name]["skipped"]],
        "shards": [{"name": name, **records[name]} for name in names],
    }
    write_text_atomically(index_path(out, split), json.dumps(index, indent=1) + "\n")
    progress_file.unlink(missing_ok=True)
    gigabytes = sum(r["bytes"] for r in records.values()) / 1e9
    return (
        f"{out}/{split}-*.tar: {index['images']:,} images in {len(names)} shards ({len(kept)} kept, {len(todo)} "
        f"written), {len(index['skipped']):,} skipped as unreadable, {len(images.classes)} classes, "
        f"{gigabytes:.2f} GB, {time.perf_counter() - started:.0f} s"
    )


def plan_digest(images: ImageFolderDataset, order: list[int], shard_size: int) -> str:
    """Which image goes to which shard: the file list and classes, the order and the shard size.
    Shards written under another plan hold other images and are all rewritten."""
    digest = hashlib.sha256(f"{INDEX_FORMAT}\0{shard_size}\0{images.classes}\n".encode())
    for i in order:
        path, target = images.samples[i]
        digest.update(f"{os.path.relpath(path, images.split_dir)}\0{target}\n".encode())
    return digest.hexdigest()


def group_fingerprint(images: ImageFolderDataset, group: list[int]) -> str:
    """A shard's images as they are on disk (size and modification time): a replaced file changes it."""
    digest = hashlib.sha256()
    for i in group:
        stat = os.stat(images.samples[i][0])
        digest.update(f"{i}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def still_complete(shard: Path, record: dict | None, images: ImageFolderDataset, group: list[int]) -> bool:
    """Written by an earlier run of the same plan, untouched since, and from images unchanged since."""
    return (
        record is not None
        and shard.is_file()
        and shard.stat().st_size == record["bytes"]
        and record["source"] == group_fingerprint(images, group)
    )


def previous_records(out: Path, split: str, plan: str) -> dict[str, dict]:
    """The shards an earlier run of the same plan completed: from its progress file (interrupted) or
    its index (finished). Anything unreadable or of another plan counts as nothing."""
    for path in (out / f".{split}.progress.json", index_path(out, split)):
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(recorded, dict) or recorded.get("plan") != plan:
            continue
        shards = recorded["shards"]
        if isinstance(shards, list):  # the index: a list in shard order
            return {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in shards}
        return shards
    return {}


def write_shard(out: Path, split: str, k: int, images, group: list[int], pool, bar, *, skip_corrupt: bool) -> dict:
    """Write shard k under a temporary name with webdataset's ShardWriter and rename it when complete."""
    import webdataset

    name = f"{split}-{k:06d}.tar"
    pattern = f"{str(out).replace('%', '%%')}/.{split.replace('%', '%%')}-%06d.tar.{os.getpid()}.tmp"
    temporary = Path(pattern % k)
    unreadable, samples = [], 0
    try:
        # One shard per writer: the plan, not a running count, says where a shard ends. mtime=0: the
        # same images give the same bytes, whichever run wrote them.
        with webdataset.ShardWriter(pattern, maxcount=len(group), start_shard=k, verbose=0, mtime=0) as sink:
            paths = [images.samples[i][0] for i in group]
            for i, (payload, extension) in zip(group, pool.imap(read_image, paths, chunksize=8), strict=True):
                bar.update()
                if payload is None:
                    unreadable.append(f"{images.samples[i][0]} ({extension})")
                    continue
                sink.write({"__key__": f"{i:09d}", extension: payload, "cls": images.samples[i][1]})
                samples += 1
        if unreadable and not skip_corrupt:
            more = f" and {len(unreadable) - NAMED_IN_ERROR} more" if len(unreadable) > NAMED_IN_ERROR else ""
            raise UserError(
                f"{len(unreadable)} unreadable image(s) in {images.split_dir}: {'; '.join(unreadable[:NAMED_IN_ERROR])}"
                f"{more}; replace or delete them and rerun (the complete shards are kept), or pass --skip-corrupt "
                "to leave them out"
            )
        if unreadable:
            print(f"\n--skip-corrupt: leaving out of {name}: {'; '.join(unreadable)}", flush=True)
        fsync_path(temporary)  # on disk before it takes the final name
        os.replace(temporary, out / name)
        fsync_path(out)
    finally:
        temporary.unlink(missing_ok=True)
    return {
        "samples": samples,
        "bytes": (out / name).stat().st_size,
        "source": group_fingerprint(images, group),
        "skipped": [entry.rsplit(" (", 1)[0] for entry in unreadable],
    }


def read_image(path: str) -> tuple[bytes | None, str]:
    """(bytes to store, extension), or (None, why) for a file that does not decode completely."""
    data = Path(path).read_bytes()
    try:
        image = load_image(io.BytesIO(data))
    except UnreadableImageError as error:
        return None, str(error.__cause__ or error).replace("\n", " ")
    kind = Image.open(io.BytesIO(data)).format
    if kind in ("JPEG", "PNG"):
        return data, "jpg" if kind == "JPEG" else "png"
    stored = io.BytesIO()
    image.save(stored, format="PNG")  # lossless, and one of the formats the loader reads
    return stored.getvalue(), "png"


def remove_abandoned_temporaries(out: Path, split: str) -> None:
    """Temporary shards of writers that died (killed, machine lost); a live writer's are kept."""
    for temporary in out.glob(f".{split}-*.tar.*.tmp"):
        pid = temporary.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            temporary.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
