"""The .beton files: found, and checked before any decoding (fields, labels, class count), with the
record data/write_ffcv.py writes beside each one (`read_record`, `record_path`, `RECORD_FORMAT`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from convnext_train.data.ffcv.library import IntField, Reader, RGBImageField
from convnext_train.errors import UserError

__all__ = [
    "RECORD_FORMAT",
    "WRITE_HELP",
    "Beton",
    "check_class_lists",
    "open_beton",
    "open_reader",
    "read_record",
    "record_path",
]

RECORD_FORMAT = (
    1  # of write_ffcv's records: bump when the field layout or the record changes (older files are rewritten)
)
WRITE_HELP = "write it from the ImageFolder tree with `python data/write_ffcv.py <imagefolder_root> <data.root>`"


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
