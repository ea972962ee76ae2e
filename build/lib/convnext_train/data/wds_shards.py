"""The WebDataset shards of one split, found and counted before any decoding (for data=wds).

`<data.root>/<split>-NNNNNN.tar`, samples as `webdataset.ShardWriter` writes them: `<key>.jpg` (or
`.jpeg`, `.png`) and `<key>.cls` (the integer label). data/write_wds.py writes `<data.root>/<split>.json`
beside them (`INDEX_FORMAT`: class names, per-shard sample counts and bytes); shards written by other
tools have none, and are counted from their tar headers instead (tarfile's random-access mode reads
each member's 512-byte header and seeks over its data, so this costs a few reads per sample, not the
shard's bytes).

The per-epoch plan needs every shard's exact sample count (equal budgets per rank, resume by position):
webdataset itself never counts, so the count is ours, grouping members into samples with
webdataset's own key rule (`tariterators.base_plus_ext`) so that it agrees with what its reader yields.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from convnext_train.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "INDEX_FORMAT",
    "SAMPLE_LAYOUT",
    "INSTALL_HELP",
    "WRITE_HELP",
    "Shard",
    "ShardSet",
    "check_class_lists",
    "count_samples",
    "index_path",
    "open_split",
    "require_webdataset",
]

INDEX_FORMAT = 1  # of write_wds's <split>.json: bump when the shard layout or the index changes
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
INSTALL_HELP = "install it with `pip install 'convnext-train[wds]'`"
WRITE_HELP = "write them from an ImageFolder tree with `python data/write_wds.py <imagefolder_root> <data.root>`"
SAMPLE_LAYOUT = (
    "data=wds reads samples of <key>.jpg (or .jpeg, .png) and <key>.cls as webdataset.ShardWriter writes "
    "them from {'__key__': ..., 'jpg': ..., 'cls': label}"
)
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's reader skips (its skip_meta default)


def require_webdataset():
    """The webdataset module, imported on first use: it is an optional extra."""
    try:
        import webdataset
    except ImportError as error:
        raise UserError(
            f"data.kind=wds needs the webdataset package, which cannot be imported ({error}); {INSTALL_HELP}"
        ) from None
    return webdataset


@dataclass(frozen=True)
class Shard:
    path: Path
    first: int  # the global index of its first sample: shards in name order, samples in file order
    count: int


@dataclass(frozen=True)
class ShardSet:
    root: Path
    split: str
    shards: tuple[Shard, ...]  # non-empty shards only, in name order
    classes: list[str] | None  # from write_wds's index; None: counted from the tar headers

    @property
    def num_samples(self) -> int:
        return self.shards[-1].first + self.shards[-1].count


def index_path(root: Path, split: str) -> Path:
    return root / f"{split}.json"


def open_split(data_cfg: DictConfig, split: str, *, announce: bool) -> ShardSet:
    """The split's shards with their sample counts, checked against data.num_classes where the
    index says how many classes there are. `announce`: say (once, on one rank) that there is no index."""
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise UserError(
            f"data root {root} does not exist or is not a directory; data=wds reads <data.root>/{split}-NNNNNN.tar: {WRITE_HELP}"
        )
    paths = sorted(root.glob(f"{split}-*.tar"))
    if not paths:
        raise UserError(f"no shards {root}/{split}-*.tar: data=wds reads <data.root>/<split>-NNNNNN.tar; {WRITE_HELP}")
    index = _read_index(root, split)
    if index is None:
        counts = [count_samples(path) for path in paths]
        classes = None
        if announce:
            print(
                f"data=wds: no {index_path(root, split).name} beside the shards (data/write_wds.py writes one): "
                f"counted {sum(counts):,} samples in {len(paths)} {split} shards from their tar headers; "
                f"the class count is data.num_classes={data_cfg.num_classes}, from the config",
                flush=True,
            )
    else:
        counts = _indexed_counts(index, paths, index_path(root, split))
        classes = index["classes"]
        if len(classes) != data_cfg.num_classes:
            raise UserError(
                f"{index_path(root, split)} lists {len(classes)} classes but data.num_classes={data_cfg.num_classes}; "
                "set data.num_classes to match the data"
            )
    shards, first = [], 0
    for path, count in zip(paths, counts, strict=True):
        if count:
            shards.append(Shard(path, first, count))
            first += count
    if not shards:
        raise UserError(f"the shards {root}/{split}-*.tar hold no samples; {WRITE_HELP}")
    return ShardSet(root, split, tuple(shards), classes)


def check_class_lists(train: ShardSet, val: ShardSet | None) -> None:
    """Label i must mean one class in both splits; shards without an index are taken as they are."""
    if val is not None and train.classes is not None and val.classes is not None and train.classes != val.classes:
        raise UserError(
            f"{index_path(train.root, train.split)} and {index_path(val.root, val.split)} list different classes; "
            "write both splits from one ImageFolder root with `python data/write_wds.py`"
        )


def count_samples(path: Path) -> int:
    """The samples in one shard, from its tar headers, each checked to have an image and a label."""
    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(path, "r:") as tar:  # random access: headers only, seeking over the data
            names = [member.name for member in tar if member.isreg() and not _META.match(member.name)]
    except (tarfile.TarError, OSError) as error:
        raise UserError(f"{path} is not a readable tar file ({error}); {WRITE_HELP}") from None
    samples: list[tuple[str, set[str]]] = []
    for name in names:
        key, suffix = base_plus_ext(name)
        if key is None:
            continue  # webdataset's reader drops a member without an extension too
        suffix = suffix.lower()
        if not samples or samples[-1][0] != key or suffix in samples[-1][1]:
            samples.append((key, set()))
        samples[-1][1].add(suffix)
    for key, suffixes in samples:
        if "cls" not in suffixes:
            raise UserError(f"{path}: sample {key} has no .cls member (its integer label); {SAMPLE_LAYOUT}")
        if not suffixes & set(IMAGE_EXTENSIONS):
            raise UserError(f"{path}: sample {key} has no .jpg, .jpeg or .png member; {SAMPLE_LAYOUT}")
    return len(samples)


def _read_index(root: Path, split: str) -> dict | None:
    path = index_path(root, split)
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path} is not readable JSON ({error}); rerun `python data/write_wds.py`, or delete it"
        ) from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise UserError(
            f"{path} is not a data/write_wds.py index of format {INDEX_FORMAT}; rerun the writer, or delete it"
        )
    return index


def _indexed_counts(index: dict, paths: list[Path], path: Path) -> list[int]:
    """Per-shard counts from the index, which must describe exactly the shards on disk."""
    recorded = {shard["name"]: shard for shard in index["shards"]}
    on_disk = {p.name: p for p in paths}
    problem = None
    if set(recorded) != set(on_disk):
        extra, missing = sorted(set(on_disk) - set(recorded)), sorted(set(recorded) - set(on_disk))
        problem = f"shards not in it: {extra[:3] or 'none'}; shards it lists that are missing: {missing[:3] or 'none'}"
    else:
        changed = [name for name, p in on_disk.items() if p.stat().st_size != recorded[name]["bytes"]]
        if changed:
            problem = f"{len(changed)} shard(s) changed size since it was written, e.g. {changed[0]}"
    if problem:
        raise UserError(
            f"{path} does not describe the shards beside it ({problem}): rerun `python data/write_wds.py`, "
            f"or delete {path.name} to count the shards from their tar headers"
        )
    return [recorded[p.name]["samples"] for p in paths]
