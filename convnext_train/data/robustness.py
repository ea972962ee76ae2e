"""The robustness sets, each read in the layout its authors distribute, as (image, label set) items.

| `data.kind` | layout | label |
|---|---|---|
| `imagenet_v2` | `<root>/<0..999>/*.jpeg` | the folder's number (not its place in a string sort: `10` sorts before `2`) |
| `imagenet_real` | `<root>/<val_split>[/<wnid>]/ILSVRC2012_val_<n>.JPEG` | ReaL's label set of image n; an empty set leaves the image out |
| `imagenet_a`, `imagenet_r` | `<root>/<wnid>/*` (200 WordNet ids) | the wnid's ImageNet-1K index; scored over those 200 classes only |
| `imagenet_sketch` | `<root>/<wnid>/*` (1000 WordNet ids) | the wnid's ImageNet-1K index |
| `imagenet_c` | `<root>/<corruption>/<severity>/<wnid>/*` | the wnid's index, per (corruption, severity) |

Every label is an ImageNet-1K class index, i.e. the place of its WordNet id in timm's synset list
(`timm.data.ImageNetInfo`, the sorted wnids the checkpoints were trained with), so a set with some
classes missing still maps each folder to the right head output. The A/R class lists and the ReaL
labels are timm's own files (`timm/data/_info/`), not copies. Each item's target is a row of class
indices padded with -1, so one scorer serves single labels and ReaL's sets alike.
"""

from __future__ import annotations

import json
import os
import pkgutil
import re
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from timm.data import ImageNetInfo
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from convnext_train.data.imagefolder import UnreadableImageError, load_image
from convnext_train.data.loaders import SeededSamples
from convnext_train.data.sources import ROBUSTNESS_SETS, Source
from convnext_train.data.transforms import eval_transform
from convnext_train.errors import UserError

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "LabelSets",
    "class_subset",
    "corruption_folders",
    "robustness_dataset",
]

# The 15 corruptions of the benchmark (Hendrycks & Dietterich, ICLR 2019), in its table's order;
# the release's 4 extra "validation" corruptions (speckle_noise, gaussian_blur, spatter, saturate)
# are not part of mCE.
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)
REAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
REAL_DOWNLOAD = "https://github.com/google-research/reassessed-imagenet (real.json)"

LAYOUTS = {
    "imagefolder": "<root>/<val_split>/<wnid>/*.JPEG (ImageNet's validation set by class; python data/prepare_imagenet.py layout-val)",
    "imagenet_v2": "<root>/<class index 0..999>/*.jpeg (the released imagenetv2-matched-frequency-format-val folder)",
    "imagenet_real": "<root>/<val_split>/<wnid>/ILSVRC2012_val_<8 digits>.JPEG (the ImageNet validation set; python data/prepare_imagenet.py layout-val)",
    "imagenet_a": "<root>/<wnid>/*.jpg with ImageNet-A's 200 WordNet ids (the released imagenet-a folder)",
    "imagenet_r": "<root>/<wnid>/*.jpg with ImageNet-R's 200 WordNet ids (the released imagenet-r folder)",
    "imagenet_sketch": "<root>/<wnid>/*.JPEG with ImageNet's WordNet ids (the released sketch folder)",
    "imagenet_c": "<root>/<corruption>/<severity 1..5>/<wnid>/*.JPEG (the released ImageNet-C tars, extracted into one folder)",
}


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1K's WordNet ids in class-index order (timm's list: the sorted wnids)."""
    return tuple(ImageNetInfo().label_names())


def _timm_info(name: str) -> bytes:
    return pkgutil.get_data("timm.data", f"_info/{name}")


@cache
def class_subset(kind: str) -> tuple[int, ...] | None:
    """The ImageNet-1K indices a 200-class set holds (timm's imagenet_a/r_indices.txt), or None."""
    if kind not in ("imagenet_a", "imagenet_r"):
        return None
    name = kind.removeprefix("imagenet_")
    return tuple(int(line) for line in _timm_info(f"imagenet_{name}_indices.txt").decode().split())


def _allowed_wnids(kind: str) -> dict[str, int]:
    wnids = imagenet_wnids()
    subset = class_subset(kind)
    indices = subset if subset is not None else range(len(wnids))
    return {wnids[i]: i for i in indices}


class LabelSets(Dataset):
    """(PIL image, label row, replaced) items; the rows are class indices padded with -1 to one width.

    skip_corrupt: an unreadable image is served by the next readable one with its labels (as
    ImageFolderDataset does), flagged `replaced`.
    """

    def __init__(self, samples: Sequence[tuple[str, Sequence[int]]], skip_corrupt: bool, excluded: int = 0):
        self.samples = list(samples)
        self.width = max((len(labels) for _, labels in self.samples), default=1)
        self.skip_corrupt = skip_corrupt
        self.excluded = excluded  # images left out (ReaL: an empty label set)

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self, index: int) -> torch.Tensor:
        labels = list(self.samples[index][1])
        return torch.tensor(labels + [-1] * (self.width - len(labels)), dtype=torch.long)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, bool]:
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            try:
                image = load_image(self.samples[position][0])
            except UnreadableImageError:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"data.skip_corrupt: skipping unreadable image {self.samples[position][0]}", stacklevel=2)
                continue
            return image, self.labels(position), offset > 0
        raise UserError("no image of this set can be read, so data.skip_corrupt has nothing to use")


def robustness_dataset(
    data_cfg: DictConfig, crop_pct: float, *, corruption: str | None = None, severity: int | None = None
) -> SeededSamples:
    """One set (for imagenet_c: one corruption at one severity) with the official eval transform."""
    kind = data_cfg.kind
    root = Path(data_cfg.root)
    if kind not in _READERS:
        raise UserError(f"data.kind={kind}: not a robustness set (one of {', '.join(ROBUSTNESS_SETS)})")
    if not root.is_dir():
        raise UserError(f"data.root={root} (data={kind}) is not a directory; expected {LAYOUTS[kind]}")
    if corruption is not None:  # ImageNet-C: one corruption's severity is a tree of its own
        root = root / corruption / str(severity)
    samples, excluded = _READERS[kind](root, data_cfg)
    return SeededSamples(
        LabelSets(samples, data_cfg.skip_corrupt, excluded), eval_transform(data_cfg.img_size, crop_pct), seed=0
    )


def _in_wnid_folders(kind: str, split_key: str | None = None):
    """A reader of `<root>[/<split>]/<wnid>/*` trees: the images of the set's WordNet ids."""

    def read(root: Path, data_cfg: DictConfig) -> tuple[list, int]:
        folder = root / data_cfg[split_key] if split_key else root
        return _wnid_samples(folder, kind, _allowed_wnids(kind)), 0

    return read


# How each set's layout is read: (samples, images left out). `imagefolder` is the clean ImageNet
# validation set of the robustness table.
_READERS = {
    "imagefolder": _in_wnid_folders("imagefolder", "val_split"),
    "imagenet_v2": lambda root, _data_cfg: (_v2_samples(root), 0),
    "imagenet_real": lambda root, data_cfg: _real_samples(root / data_cfg.val_split, data_cfg.get("real_labels")),
    "imagenet_a": _in_wnid_folders("imagenet_a"),
    "imagenet_r": _in_wnid_folders("imagenet_r"),
    "imagenet_sketch": _in_wnid_folders("imagenet_sketch"),
    "imagenet_c": _in_wnid_folders("imagenet_c"),
}

SOURCES = {kind: Source(root_hint=f"the set's folder, {LAYOUTS[kind]}") for kind in ROBUSTNESS_SETS}


def corruption_folders(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageNet-C's (corruption, severity) folders under root, in benchmark order, and the names of
    the benchmark's folders that are missing. Other folders (the extra corruptions) are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"ImageNet-C root {root} is not a directory; expected {LAYOUTS['imagenet_c']}")
    present, missing = [], []
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            if (root / corruption / str(severity)).is_dir():
                present.append((corruption, severity))
            else:
                missing.append(f"{corruption}/{severity}")
    if not present:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())[:5]
        raise UserError(
            f"{root} holds none of ImageNet-C's corruption folders (found: {', '.join(found) or 'nothing'}); "
            f"expected {LAYOUTS['imagenet_c']}, e.g. {root}/gaussian_noise/1/n01440764/"
        )
    return present, missing


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _refuse_empty(samples: list, root: Path, kind: str) -> list:
    if not samples:
        raise UserError(f"{root} (data={kind}) has no images; expected {LAYOUTS[kind]}")
    return samples


def _wnid_samples(root: Path, kind: str, allowed: dict[str, int]) -> list[tuple[str, tuple[int]]]:
    if not root.is_dir():
        raise UserError(f"{root} (data={kind}) is not a directory; expected {LAYOUTS[kind]}")
    samples = []
    for folder in _subfolders(root):
        if folder.name not in allowed:
            what = f"one of this set's {len(allowed)} WordNet ids" if len(allowed) < 1000 else "an ImageNet WordNet id"
            raise UserError(
                f"{root} does not match data={kind}: its folder {folder.name!r} is not {what}; expected {LAYOUTS[kind]}"
            )
        samples += [(path, (allowed[folder.name],)) for path in _images_in(folder)]
    return _refuse_empty(samples, root, kind)


def _v2_samples(root: Path) -> list[tuple[str, tuple[int]]]:
    samples = []
    count = len(imagenet_wnids())
    for folder in _subfolders(root):
        # The folder name is the class index itself; "007" or "n01440764" would be another layout.
        if not (folder.name.isdigit() and str(int(folder.name)) == folder.name and int(folder.name) < count):
            raise UserError(
                f"{root} does not match data=imagenet_v2: its folder {folder.name!r} is not a class index "
                f"0..{count - 1}; expected {LAYOUTS['imagenet_v2']}"
            )
        samples += [(path, (int(folder.name),)) for path in _images_in(folder)]
    return _refuse_empty(samples, root, "imagenet_v2")


def _real_samples(val_dir: Path, labels_path: str | None) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """Each validation image with its ReaL set, found by the number in its file name; images whose
    set is empty are left out (counted), as the ReaL authors score."""
    if not val_dir.is_dir():
        raise UserError(f"{val_dir} (data=imagenet_real) is not a directory; expected {LAYOUTS['imagenet_real']}")
    real = _real_labels(labels_path)
    files = _images_in(val_dir) + [path for folder in _subfolders(val_dir) for path in _images_in(folder)]
    samples, excluded = [], 0
    for path in files:
        match = REAL_FILE.search(path)
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(real):
            raise UserError(
                f"{path} is not an ImageNet validation image name (ILSVRC2012_val_00000001.JPEG .. "
                f"ILSVRC2012_val_{len(real):08d}.JPEG): ReaL's labels are found by that number; "
                f"expected {LAYOUTS['imagenet_real']}"
            )
        labels = real[number - 1]
        if labels:
            samples.append((path, tuple(labels)))
        else:
            excluded += 1
    if not samples:
        raise UserError(f"{val_dir} has no validation image with a ReaL label; expected {LAYOUTS['imagenet_real']}")
    return samples, excluded


def _real_labels(path: str | None) -> list[list[int]]:
    """ReaL's real.json: one list of class indices per validation image, in file-number order;
    timm's copy unless data.real_labels names another."""
    if path is None:
        return json.loads(_timm_info("imagenet_real_labels.json"))
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(
            f"data.real_labels={path}: cannot read it ({error}); download it from {REAL_DOWNLOAD}"
        ) from error
    if not (isinstance(labels, list) and all(isinstance(row, list) for row in labels)):
        raise UserError(f"data.real_labels={path} is not ReaL's real.json (a list of label lists); see {REAL_DOWNLOAD}")
    return labels
