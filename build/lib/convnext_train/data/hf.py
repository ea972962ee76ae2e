"""`data=hf`: datasets made by Hugging Face `datasets`, read from local disk (never downloaded).

`data.root` holds one of two layouts:
- a DatasetDict written by `save_to_disk` (`<root>/dataset_dict.json`, a folder per split), opened
  by `datasets.load_from_disk`, memory-mapped;
- parquet shards per split, as the hub ships datasets: `<root>/data/<split>-00000-of-00294.parquet`
  (ILSVRC/imagenet-1k: `train`, `validation`, `test`), or `<root>/<split>/*.parquet`, read by
  `datasets.load_dataset("parquet", data_files=...)`, which converts them to Arrow files in the
  datasets cache once (`HF_DATASETS_CACHE`; about the shards' size) and memory-maps those after.

Each split becomes an "images" dataset like `ImageFolderDataset`: `images[i]` is a `Sample` of an
RGB PIL image, its label and a `replaced` flag, so `SeededSamples` and `EpochSampler` give it the
recipe, the per-epoch order, the process sharding and the mid-epoch resume of the reference path.
Written here by hand, as `datasets` has no equivalent: the checks that turn a wrong split, column or
class count into one line, and the row -> Sample step, which decodes the stored bytes with Pillow
itself (rather than through the Image feature) so that an unreadable image can be named by row and
file name and `data.skip_corrupt` serves the next readable row, as ImageFolder does.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from convnext_train.data.imagefolder import DECODE_ERRORS, Sample, UnreadableImageError
from convnext_train.data.loaders import SeededSamples, seeded_loaders, seeded_val_loader
from convnext_train.data.sources import LoaderArgs, Source
from convnext_train.data.transforms import eval_transform, train_transform
from convnext_train.errors import UserError

INSTALL_HELP = "pip install 'convnext-train[hf]' (or: pip install 'datasets>=2.19')"
LAYOUT_HELP = (
    "data=hf reads a DatasetDict written by save_to_disk (<root>/dataset_dict.json) or parquet shards "
    "per split (<root>/data/<split>-00000-of-00042.parquet as the hub ships them, or <root>/<split>/*.parquet)"
)
# A hub dataset's shard: `<split>-00000-of-00294.parquet` (some add `-<hash>`); split names are words.
SHARD_NAME = re.compile(r"(\w+(?:\.\w+)*)(?:-.*)?\.parquet")


def hf_samples(data_cfg: DictConfig, aug_cfg: DictConfig, *, seed: int) -> tuple[SeededSamples, SeededSamples | None]:
    """(train, val) with the recipe's transforms; val is None when `data.val_split` is null."""
    splits = [data_cfg.train_split] + ([] if data_cfg.val_split is None else [data_cfg.val_split])
    images = [HFImages(table, data_cfg, split) for split, table in open_splits(data_cfg.root, splits).items()]
    train = SeededSamples(images[0], train_transform(aug_cfg, data_cfg.img_size), seed)
    if data_cfg.val_split is None:
        return train, None
    if images[0].classes != images[1].classes:
        raise UserError(
            f"splits {data_cfg.train_split!r} and {data_cfg.val_split!r} of {data_cfg.root} name their classes "
            f"differently ({_first_difference(images[0].classes, images[1].classes)}): one label must mean one "
            "class in both; use splits of one dataset"
        )
    return train, SeededSamples(images[1], eval_transform(data_cfg.img_size, aug_cfg.crop_pct), seed)


def _loaders(data_cfg: DictConfig, aug_cfg: DictConfig, args: LoaderArgs):
    train, val = hf_samples(data_cfg, aug_cfg, seed=args.seed)
    return seeded_loaders(train, val, data_cfg.num_workers, args, pin_memory=data_cfg.pin_memory)


def _val_loader(data_cfg: DictConfig, crop_pct: float, args: LoaderArgs):
    """The validation split alone, with the official eval transform (for eval.py)."""
    (table,) = open_splits(data_cfg.root, [data_cfg.val_split]).values()
    images = HFImages(table, data_cfg, data_cfg.val_split)
    return seeded_val_loader(
        SeededSamples(images, eval_transform(data_cfg.img_size, crop_pct), 0), data_cfg.num_workers, args
    )


SOURCES = {
    "hf": Source(
        loaders=_loaders,
        val_loader=_val_loader,
        root_hint="a save_to_disk directory, or parquet shards <root>/data/<split>-*.parquet",
    )
}


# --------------------------------------------------------------------------------------------------
# Opening the splits
# --------------------------------------------------------------------------------------------------
def require_datasets():
    """The `datasets` module, imported on first use: it is an optional extra."""
    # A name that is not on disk must never turn into a hub request (the root is checked before this).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError as error:
        raise UserError(f"data.kind=hf needs the Hugging Face datasets package ({error}): {INSTALL_HELP}") from error
    return datasets


def open_splits(root_text: str, splits: list[str]) -> dict[str, Any]:
    """{split: datasets.Dataset} for the splits asked for, from either layout under root."""
    root = Path(root_text)
    if not root.is_dir():
        raise UserError(_not_on_disk(str(root_text)))
    datasets = require_datasets()
    if (root / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(root))
        _require_splits(root, splits, list(saved))
        return {split: saved[split] for split in splits}
    if (root / "state.json").is_file():
        raise UserError(
            f"{root} holds one dataset without splits (Dataset.save_to_disk); data=hf reads named splits: save a "
            "DatasetDict instead, e.g. DatasetDict(train=train, validation=val).save_to_disk(...)"
        )
    shards = parquet_shards(root)
    if not shards:
        raise UserError(f"{root} holds no dataset data=hf can read; {LAYOUT_HELP}")
    _require_splits(root, splits, list(shards))
    return {
        split: datasets.load_dataset("parquet", data_files={split: [str(p) for p in shards[split]]}, split=split)
        for split in splits
    }


def parquet_shards(root: Path) -> dict[str, list[Path]]:
    """{split: shard files}: the hub's `<root>/data/<split>-*.parquet`, else `<root>/<split>/*.parquet`."""
    shards: dict[str, list[Path]] = {}
    for path in sorted((root / "data").glob("*.parquet")):
        match = SHARD_NAME.fullmatch(path.name)
        if match:
            shards.setdefault(match.group(1), []).append(path)
    if not shards:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.parquet"))
            if files:
                shards[folder.name] = files
    return shards


def _require_splits(root: Path, wanted: list[str], present: list[str]) -> None:
    for split in wanted:
        if split not in present:
            key = "data.train_split" if split == wanted[0] else "data.val_split"
            raise UserError(
                f"split {split!r} not found in {root} (its splits: {', '.join(sorted(present))}); set {key} to one "
                "of them" + (", or data.val_split=null for none" if key == "data.val_split" else "")
            )


def _not_on_disk(root: str) -> str:
    """A hub id (`owner/name`) or a bare name (`imagenet-1k`) that is not a directory here."""
    looks_like_hub_id = not Path(root).is_absolute() and root.count("/") <= 1 and not root.startswith(".")
    repo = root if looks_like_hub_id and "/" in root else "ILSVRC/imagenet-1k"
    local = f"/datasets/{repo.split('/')[-1]}"
    return (
        f"data.root={root} is not a directory on this machine: data=hf reads datasets from local disk only, never "
        f"from the hub. Download it first, e.g. `hf download {repo} --repo-type dataset --local-dir {local}` "
        f"(`huggingface-cli download` on older huggingface_hub), then pass data.root={local}"
    )


def _first_difference(a: list[str], b: list[str]) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} class names"
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"class {i} is {a[i]!r} in one and {b[i]!r} in the other"


# --------------------------------------------------------------------------------------------------
# One split as an "images" dataset
# --------------------------------------------------------------------------------------------------
class HFImages(Dataset):
    """`images[i]` -> Sample(RGB PIL image, label, replaced) from row i of one split, checked on
    construction: the columns exist, the image column holds encoded images, the labels are integers
    in [0, data.num_classes) and a ClassLabel's class count is data.num_classes.

    Unreadable images behave as in `ImageFolderDataset`: without skip_corrupt the row is named in an
    UnreadableImageError; with it, row i is served by the first readable row among i+1, i+2, ...
    (wrapping around), with that row's label, `replaced` True and a warning naming the row."""

    def __init__(self, table: Any, data_cfg: DictConfig, split: str):
        from datasets import ClassLabel, Value
        from datasets import Image as ImageFeature

        self.where = f"split {split!r} of {data_cfg.root}"
        self.image_column, self.label_column = data_cfg.image_column, data_cfg.label_column
        self.skip_corrupt = data_cfg.skip_corrupt
        for key in ("image_column", "label_column"):
            if data_cfg[key] not in table.column_names:
                raise UserError(
                    f"{self.where} has no column {data_cfg[key]!r} (its columns: {', '.join(table.column_names)}); "
                    f"set data.{key} to one of them"
                )
        table = table.select_columns([self.image_column, self.label_column])
        image, label = table.features[self.image_column], table.features[self.label_column]
        if isinstance(image, ImageFeature):
            table = table.cast_column(self.image_column, ImageFeature(decode=False))  # the stored bytes
        elif not (isinstance(image, Value) and image.dtype in ("binary", "large_binary")):
            raise UserError(
                f"column {self.image_column!r} of {self.where} holds {image}, not images: data.image_column must "
                "name an Image feature or a column of encoded image bytes"
            )
        self.classes = label.names if isinstance(label, ClassLabel) else None
        self.table = table
        self._check_labels(table, label, data_cfg.num_classes)

    def _check_labels(self, table: Any, feature: Any, num_classes: int | None) -> None:
        import pyarrow.compute  # datasets' own dependency: there when datasets is
        from datasets import ClassLabel, Value

        where = f"the label column {self.label_column!r} of {self.where}"
        if isinstance(feature, ClassLabel):
            if num_classes != feature.num_classes:
                raise UserError(
                    f"{where} is a ClassLabel of {feature.num_classes} classes but data.num_classes={num_classes}; "
                    f"set data.num_classes={feature.num_classes}"
                )
        elif not (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
            raise UserError(f"{where} holds {feature}, not class indices: data.label_column must name integer labels")
        elif num_classes is None:
            raise UserError(f"{where} is not a ClassLabel, so it does not say how many classes: set data.num_classes")
        # One pass over the label column in Arrow (1.28M integers for ImageNet: milliseconds).
        labels = table.with_format("arrow")[self.label_column]
        bounds = pyarrow.compute.min_max(labels)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if labels.null_count or (low is not None and (low < 0 or high >= num_classes)):
            raise UserError(
                f"{where} has labels {low}..{high}{' and missing ones' if labels.null_count else ''}, outside "
                f"0..{num_classes - 1} (data.num_classes={num_classes}); unlabelled rows (label -1, as in the hub's "
                "ImageNet test split) can be neither trained on nor scored: use a labelled split"
            )

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Sample:
        count = len(self.table)
        for offset in range(count):
            position = (index + offset) % count
            row = self.table[position]
            value = row[self.image_column]
            # An Image feature's {bytes, path} (the hub embeds the bytes), or plain bytes.
            data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
            name = f"image at row {position} of {self.where}" + (f" ({path})" if path else "")
            try:
                image = decode_rgb(data, path, name)
            except UnreadableImageError:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"data.skip_corrupt: skipping the unreadable {name}", stacklevel=2)
                continue
            return Sample(image, int(row[self.label_column]), replaced=offset > 0)
        raise UserError(f"no image in {self.where} can be read, so data.skip_corrupt has nothing to use")


def decode_rgb(data: bytes | None, path: str | None, name: str) -> Image.Image:
    """Encoded bytes (or, without them, the file at path) decoded completely, as RGB."""
    try:
        if data is None and path is None:
            raise ValueError("the row holds no image")
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            return image.convert("RGB")
    except DECODE_ERRORS as error:
        raise UnreadableImageError(
            f"cannot read {name}: {error}. Repair or drop the row, or set data.skip_corrupt=true to train on the "
            "next readable image instead (each one is counted)"
        ) from error
