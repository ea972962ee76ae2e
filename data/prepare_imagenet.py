#!/usr/bin/env python3
"""Prepare and check ImageNet-1K in the ImageFolder layout the trainer reads (conf/data/imagenet.yaml).

  layout-val  The official validation images come as 50,000 files in one flat folder, but ImageFolder
              takes each image's class from its folder. Sort them into <val>/<wnid>/ class folders,
              with the labels of the ILSVRC2012 devkit or of Kaggle's LOC_val_solution.csv.
  check       Count a <root>/train, <root>/val tree against ImageNet-1K's 1,281,167 / 50,000 images
              in 1,000 classes, and optionally decode every image, so that a broken download shows
              up now instead of as a wrong accuracy or a crash hours into training.

Needs only the standard library and Pillow; scipy only to read the devkit's meta.mat.
Exit codes: 0 all good, 1 problems found (layout-val then changes nothing), 2 unusable input.

One file on purpose: a self-contained script (nothing of convnext_train), so it runs as it is on
whichever machine holds the download; its sections are the labels, then each subcommand, then the
command line.
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from PIL import Image

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VAL_IMAGES = 50_000
IMAGENET_CLASSES = 1_000

# The suffixes torchvision's ImageFolder loads; it silently skips every other file.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
WNID_PATTERN = re.compile(r"n\d{8}")
# Validation image ids are also file names, so anything else could point outside the class folder.
VAL_IMAGE_ID_PATTERN = re.compile(r"ILSVRC2012_val_\d{8}")

GROUND_TRUTH_FILE = "ILSVRC2012_validation_ground_truth.txt"
META_MAT_FILE = "meta.mat"
DEVKIT_SOURCE = (
    "ILSVRC2012_devkit_t12.tar.gz or its extracted folder, "
    "from https://image-net.org/challenges/LSVRC/2012/2012-downloads.php"
)
LOC_CSV_SOURCE = (
    "Kaggle's LOC_val_solution.csv, from `kaggle competitions download -c imagenet-object-localization-challenge`"
)
FLAT_VAL_SOURCE = "the flat ILSVRC2012_val_*.JPEG files extracted from ILSVRC2012_img_val.tar"

LayoutMode = Literal["move", "copy", "symlink"]


class InputError(Exception):
    """Input the user has to fix (a missing path, a malformed label file); the CLI prints it on one line, exit 2."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong, named so that the user can find it: `kind` groups the report, `detail` names the file."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


# ---------------------------------------------------------------------------------------------------
# Validation labels: image file name -> WNID
# ---------------------------------------------------------------------------------------------------


def val_image_file_name(image_id: str) -> str:
    """The file name of a validation image: ILSVRC2012_img_val.tar and Kaggle both use `<id>.JPEG`."""
    return f"{image_id}.JPEG"


def _add_label(labels: dict[str, str], image_id: str, wnid: str, where: str) -> None:
    """Record one image's class, refusing what would misfile images silently: odd ids, odd WNIDs, repeats."""
    if not VAL_IMAGE_ID_PATTERN.fullmatch(image_id):
        raise InputError(f"{where}: {image_id!r} is not a validation image id like ILSVRC2012_val_00000001")
    if not WNID_PATTERN.fullmatch(wnid):
        raise InputError(f"{where}: {wnid!r} is not a WordNet id like n01440764")
    file_name = val_image_file_name(image_id)
    if file_name in labels:
        raise InputError(f"{where}: {image_id} is labelled a second time")
    labels[file_name] = wnid


def read_loc_val_solution(csv_path: Path) -> dict[str, str]:
    """Labels from Kaggle's LOC_val_solution.csv.

    Each PredictionString lists the image's boxes as `WNID x_min y_min x_max y_max ...`; every box of a
    validation image is of the image's one class, so the first token is its label.
    """
    if not csv_path.is_file():
        raise InputError(f"{csv_path} not found: expected {LOC_CSV_SOURCE}")
    labels: dict[str, str] = {}
    with csv_path.open(newline="") as csv_file:
        rows = csv.reader(csv_file)
        header = next(rows, [])
        if header != ["ImageId", "PredictionString"]:
            raise InputError(
                f"{csv_path}: expected the header 'ImageId,PredictionString' of {LOC_CSV_SOURCE}, "
                f"got {','.join(header)!r}"
            )
        for line_number, row in enumerate(rows, start=2):
            where = f"{csv_path}:{line_number}"
            if len(row) != 2 or not row[1].split():
                raise InputError(f"{where}: expected 'ImageId,WNID x_min y_min x_max y_max ...', got {row!r}")
            _add_label(labels, row[0], row[1].split()[0], where)
    if not labels:
        raise InputError(f"{csv_path} labels no images: expected {LOC_CSV_SOURCE}")
    return labels


def _read_devkit_file(devkit: Path, file_name: str) -> bytes:
    """Read `data/<file_name>` from the devkit archive or from its extracted folder (or the folder above)."""
    if not devkit.exists():
        raise InputError(f"devkit not found: {devkit} (expected {DEVKIT_SOURCE})")
    if devkit.is_dir():
        for candidate in [devkit / "data" / file_name, *sorted(devkit.glob(f"*/data/{file_name}"))]:
            if candidate.is_file():
                return candidate.read_bytes()
    else:
        try:
            with tarfile.open(devkit) as archive:
                for member in archive.getmembers():
                    if member.isfile() and PurePosixPath(member.name).parts[-2:] == ("data", file_name):
                        extracted = archive.extractfile(member)
                        assert extracted is not None  # a regular file member always extracts
                        return extracted.read()
        except tarfile.TarError as error:
            raise InputError(f"{devkit} is not a readable tar archive ({error}): expected {DEVKIT_SOURCE}") from None
    raise InputError(f"{devkit} has no data/{file_name}: expected {DEVKIT_SOURCE}")


def read_meta_mat(meta_mat: bytes) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's meta.mat (a MATLAB struct array `synsets`).

    It lists all 1,860 synsets of the hierarchy; ids 1..1000 are the classes the ground truth uses.
    """
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise InputError(
            "reading the devkit's data/meta.mat needs scipy: `pip install scipy`, "
            "or pass --synsets with one 'ILSVRC2012_ID WNID' line per class"
        ) from None
    try:
        synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"].ravel()
        return {int(synset["ILSVRC2012_ID"]): str(synset["WNID"]) for synset in synsets}
    except (KeyError, ValueError, MatReadError) as error:
        raise InputError(f"the devkit's data/meta.mat has no readable 'synsets' table ({error})") from None


def read_synsets_file(synsets_path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from a text file of `ILSVRC2012_ID WNID [anything]` lines.

    The ids must be written out: the common plain WNID lists (LOC_synset_mapping.txt, synsets.txt) are
    sorted by WNID, not by ILSVRC2012_ID, and reading them by line number would mislabel every image.
    """
    if not synsets_path.is_file():
        raise InputError(f"synsets file not found: {synsets_path} (expected 'ILSVRC2012_ID WNID' lines)")
    id_to_wnid: dict[int, str] = {}
    for line_number, line in enumerate(synsets_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=2)
        where = f"{synsets_path}:{line_number}"
        if len(fields) < 2 or not fields[0].isdigit() or not WNID_PATTERN.fullmatch(fields[1]):
            raise InputError(
                f"{where}: expected 'ILSVRC2012_ID WNID' (e.g. '1 n02119789'), got {line!r}; "
                "WNID-only lists are in another order and cannot be used"
            )
        id_to_wnid[int(fields[0])] = fields[1]
    return id_to_wnid


def read_devkit_labels(devkit: Path, synsets_file: Path | None = None) -> dict[str, str]:
    """Labels from the ILSVRC2012 devkit: line i of the ground truth is the ILSVRC2012_ID of image i.

    The ids are mapped to WNIDs by data/meta.mat, or by `synsets_file` where scipy is not available.
    """
    ground_truth = _read_devkit_file(devkit, GROUND_TRUTH_FILE).decode()
    if synsets_file is not None:
        id_to_wnid = read_synsets_file(synsets_file)
    else:
        id_to_wnid = read_meta_mat(_read_devkit_file(devkit, META_MAT_FILE))
    labels: dict[str, str] = {}
    for image_number, line in enumerate(ground_truth.splitlines(), start=1):
        where = f"{devkit}: {GROUND_TRUTH_FILE} line {image_number}"
        class_id = line.strip()
        if not class_id.isdigit() or int(class_id) not in id_to_wnid:
            raise InputError(f"{where}: {line!r} is not an ILSVRC2012_ID the synsets list")
        _add_label(labels, f"ILSVRC2012_val_{image_number:08d}", id_to_wnid[int(class_id)], where)
    if not labels:
        raise InputError(f"{devkit}: {GROUND_TRUTH_FILE} is empty: expected {DEVKIT_SOURCE}")
    return labels


# ---------------------------------------------------------------------------------------------------
# layout-val
# ---------------------------------------------------------------------------------------------------


@dataclass
class ValLayoutPlan:
    """What layout-val would do, worked out before anything on disk changes so that an inconsistent
    input changes nothing: every labelled image is either already in place or gets one placement."""

    class_root: Path
    # (flat image, its file in the class folder)
    placements: list[tuple[Path, Path]] = field(default_factory=list)
    already_placed: int = 0
    problems: list[Problem] = field(default_factory=list)


def _names_by_type(folder: Path) -> tuple[list[str], list[str]]:
    """The sorted (folder names, other entry names) directly in `folder`; none if it does not exist yet."""
    if not folder.is_dir():
        return [], []
    with os.scandir(folder) as entries:
        entries_sorted = sorted(entries, key=lambda entry: entry.name)
    folders = [entry.name for entry in entries_sorted if entry.is_dir()]
    others = [entry.name for entry in entries_sorted if not entry.is_dir()]
    return folders, others


def plan_val_layout(labels: dict[str, str], flat_dir: Path, class_root: Path | None = None) -> ValLayoutPlan:
    """Plan moving the flat validation images in `flat_dir` to `class_root/<wnid>/` (default: `flat_dir`).

    Images already in their class folder count as done, which makes re-running a finished or an
    interrupted layout safe. Anything else found (an image in the wrong class folder, a labelled image
    that is nowhere, a file or folder the labels do not explain) is a problem that blocks the whole plan.
    """
    if not flat_dir.is_dir():
        raise InputError(f"validation images folder not found: {flat_dir} (expected {FLAT_VAL_SOURCE})")
    class_root = class_root or flat_dir
    plan = ValLayoutPlan(class_root=class_root)
    wnids = set(labels.values())
    flat_folders, flat_files = _names_by_type(flat_dir)
    class_folders, root_files = _names_by_type(class_root)
    if flat_dir.resolve() != class_root.resolve():
        plan.problems += [Problem("unexpected folder", str(flat_dir / name)) for name in flat_folders]
        plan.problems += [Problem("unexpected file", str(class_root / name)) for name in root_files]

    placed: set[str] = set()
    misplaced: set[str] = set()
    for folder in class_folders:
        if folder not in wnids:
            plan.problems.append(Problem("unexpected folder", str(class_root / folder)))
            continue
        for name in sorted(os.listdir(class_root / folder)):
            path = class_root / folder / name
            label = labels.get(name)
            if label is None:
                plan.problems.append(Problem("unexpected file", str(path)))
            elif label != folder:
                plan.problems.append(Problem("image in the wrong class folder", f"{path} (labelled {label})"))
                misplaced.add(name)
            elif not path.exists():
                plan.problems.append(Problem("broken link", str(path)))
            else:
                placed.add(name)
    plan.problems += [Problem("unexpected file", str(flat_dir / name)) for name in flat_files if name not in labels]

    flat_file_names = set(flat_files)
    for name, wnid in sorted(labels.items()):
        if name in placed:
            plan.already_placed += 1
        elif name in flat_file_names:
            plan.placements.append((flat_dir / name, class_root / wnid / name))
        elif name not in misplaced:
            plan.problems.append(Problem("missing image", f"{name} (labelled {wnid}) is not in {flat_dir}"))
    return plan


def _copy_atomically(source: Path, destination: Path) -> None:
    """Copy under a temporary name and rename, so an interrupted run never leaves a truncated image
    under its real name (a re-run would take it for done)."""
    partial = destination.with_name(destination.name + ".partial")
    shutil.copy2(source, partial)
    os.replace(partial, destination)


def _move(source: Path, destination: Path) -> None:
    """Rename, or across file systems copy atomically and only then delete the original."""
    try:
        os.rename(source, destination)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        _copy_atomically(source, destination)
        source.unlink()


def _symlink(source: Path, destination: Path) -> None:
    """Link by absolute path, so the link works whatever the reader's working directory."""
    destination.symlink_to(source.absolute())


def apply_val_layout(plan: ValLayoutPlan, mode: LayoutMode = "move") -> None:
    """Carry out a plan that has no problems. A run stopped part way is finished by planning again."""
    if plan.problems:
        raise ValueError("refusing to apply a plan with problems")
    place = {"move": _move, "copy": _copy_atomically, "symlink": _symlink}[mode]
    for class_folder in sorted({destination.parent for _, destination in plan.placements}):
        class_folder.mkdir(parents=True, exist_ok=True)
    for source, destination in plan.placements:
        place(source, destination)


# ---------------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------------


@dataclass
class SplitScan:
    """What one split folder holds, as ImageFolder will see it."""

    images_per_class: dict[str, int] = field(default_factory=dict)
    image_paths: list[str] = field(default_factory=list)  # kept as str: 1.3 M Path objects cost ~0.5 GB
    problems: list[Problem] = field(default_factory=list)

    @property
    def image_count(self) -> int:
        return sum(self.images_per_class.values())


@dataclass
class CheckReport:
    """The result of `check_imagefolder_tree`: per-split scans, the expectations, and every problem."""

    root: Path
    splits: dict[str, SplitScan]
    expected_images: dict[str, int]
    expected_classes: int
    images_verified: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def _files_under(folder: str) -> Iterator[os.DirEntry[str]]:
    """Every non-folder entry below `folder`, in name order, following folder links as ImageFolder does."""
    with os.scandir(folder) as entries:
        entries_sorted = sorted(entries, key=lambda entry: entry.name)
    for entry in entries_sorted:
        if entry.is_dir():
            yield from _files_under(entry.path)
        else:
            yield entry


def scan_split(split_dir: Path, stray_file_hint: str) -> SplitScan:
    """Count the images of each class folder and name what ImageFolder would skip or choke on.

    `stray_file_hint` explains a file lying directly in the split folder, where only class folders belong.
    """
    scan = SplitScan()
    class_folders, stray_files = _names_by_type(split_dir)
    scan.problems += [
        Problem("file outside class folders", f"{split_dir / name} ({stray_file_hint})") for name in stray_files
    ]
    for class_name in class_folders:
        image_count = 0
        for entry in _files_under(str(split_dir / class_name)):
            if not entry.is_file():
                scan.problems.append(Problem("broken link", entry.path))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                image_count += 1
                scan.image_paths.append(entry.path)
            else:
                scan.problems.append(Problem("non-image file", f"{entry.path} (ImageFolder skips it)"))
        if image_count == 0:
            scan.problems.append(Problem("empty class", str(split_dir / class_name)))
        scan.images_per_class[class_name] = image_count
    return scan


def image_read_error(path: str) -> str | None:
    """Why Pillow cannot read the image at `path`, or None when it can.

    verify() checks the file's structure (and PNG checksums) but never decodes JPEG image data, so a
    JPEG cut short by an interrupted download or copy passes it; decoding it fully, as the training
    data loader will, is what finds the truncation.
    """
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # Pillow signals a bad file with many types: OSError, SyntaxError, ValueError...
        return f"{type(error).__name__}: {error}"
    return None


def verify_images(image_paths: Sequence[str], workers: int) -> list[Problem]:
    """Decode every image in `workers` processes (decoding is CPU bound); name each unreadable one."""
    problems: list[Problem] = []
    chunk_size = max(1, min(256, len(image_paths) // (4 * workers)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        errors = pool.map(image_read_error, image_paths, chunksize=chunk_size)
        for done, (path, error) in enumerate(zip(image_paths, errors, strict=True), start=1):
            if error is not None:
                problems.append(Problem("unreadable image", f"{path} ({error})"))
            if done % 100_000 == 0:
                print(f"  verified {done:,} of {len(image_paths):,} images", file=sys.stderr, flush=True)
    return problems


def check_imagefolder_tree(
    root: Path,
    expected_train_images: int = IMAGENET_TRAIN_IMAGES,
    expected_val_images: int = IMAGENET_VAL_IMAGES,
    expected_classes: int = IMAGENET_CLASSES,
    verify: bool = False,
    workers: int = 1,
) -> CheckReport:
    """Check `root/train/<class>/*` and `root/val/<class>/*` against the expected counts.

    Besides the counts, train and val must have the same class names: ImageFolder numbers classes by
    their sorted names, so one class missing from a split shifts the label of every class after it.
    """
    if not root.is_dir():
        expected = f"{root / 'train'}/<class>/* and {root / 'val'}/<class>/*"
        raise InputError(f"dataset root not found: {root} (expected {expected})")
    split_hints = {
        "train": "extract ILSVRC2012_img_train.tar, then each per-class <wnid>.tar into train/<wnid>/",
        "val": "sort the flat validation images into class folders with `prepare_imagenet.py layout-val`",
    }
    for split, hint in split_hints.items():
        if not (root / split).is_dir():
            raise InputError(f"{root / split} not found: expected class folders there ({hint})")
    splits = {split: scan_split(root / split, hint) for split, hint in split_hints.items()}
    expected_images = {"train": expected_train_images, "val": expected_val_images}

    problems: list[Problem] = []
    for split, scan in splits.items():
        problems += scan.problems
        image_count, class_count = scan.image_count, len(scan.images_per_class)
        if image_count != expected_images[split]:
            detail = f"{split} has {image_count:,} images, expected {expected_images[split]:,}"
            problems.append(Problem("wrong image count", detail))
        if class_count != expected_classes:
            detail = f"{split} has {class_count:,} classes, expected {expected_classes:,}"
            problems.append(Problem("wrong class count", detail))
    for present, absent in [("train", "val"), ("val", "train")]:
        missing = sorted(set(splits[present].images_per_class) - set(splits[absent].images_per_class))
        problems += [Problem(f"class missing from {absent}", f"{name} is in {present}/ only") for name in missing]

    images_verified = 0
    if verify:
        all_images = [path for scan in splits.values() for path in scan.image_paths]
        problems += verify_images(all_images, workers)
        images_verified = len(all_images)
    return CheckReport(root, splits, expected_images, expected_classes, images_verified, problems)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def format_problems(problems: Sequence[Problem], max_per_kind: int) -> list[str]:
    """A count per kind, then the first `max_per_kind` of each kind, so that 50,000 problems of one kind
    do not hide the single problem of another."""
    per_kind = Counter(problem.kind for problem in problems)
    summary = ", ".join(f"{kind}: {count:,}" for kind, count in per_kind.items())
    lines = [f"{len(problems):,} problem(s) ({summary}):"]
    shown: Counter[str] = Counter()
    for problem in problems:
        shown[problem.kind] += 1
        if shown[problem.kind] <= max_per_kind:
            lines.append(f"  {problem}")
    lines += [
        f"  ... and {count - max_per_kind:,} more of kind '{kind}'"
        for kind, count in per_kind.items()
        if count > max_per_kind
    ]
    return lines


def format_check_report(report: CheckReport, max_problems_per_kind: int) -> str:
    """The counts against the expectations, then the problems and the verdict."""
    lines = [
        f"ImageFolder tree {report.root}",
        f"  {'split':<6}{'images':>12}{'expected':>12}{'classes':>10}{'expected':>10}",
    ]
    for split, scan in report.splits.items():
        lines.append(
            f"  {split:<6}{scan.image_count:>12,}{report.expected_images[split]:>12,}"
            f"{len(scan.images_per_class):>10,}{report.expected_classes:>10,}"
        )
    if report.images_verified:
        lines.append(f"  decoded {report.images_verified:,} images with Pillow")
    if report.ok:
        lines.append("OK")
    else:
        lines += format_problems(report.problems, max_problems_per_kind)
        lines.append("FAILED")
    return "\n".join(lines)


def _usable_cpu_count() -> int:
    """CPUs this process may run on (a container or job scheduler often allows fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run_layout_val(args: argparse.Namespace) -> int:
    if args.devkit is not None:
        labels = read_devkit_labels(args.devkit, args.synsets)
    else:
        labels = read_loc_val_solution(args.loc_csv)
    plan = plan_val_layout(labels, args.val_dir, args.out)
    if plan.problems:
        print("\n".join(format_problems(plan.problems, args.max_problems)))
        print(f"Nothing was changed: the labels list {len(labels):,} images; fix the problems above and run again.")
        return 1
    if not plan.placements:
        print(
            f"Nothing to do: all {plan.already_placed:,} labelled images are already in their class folders"
            f" under {plan.class_root}."
        )
        return 0
    try:
        apply_val_layout(plan, args.mode)
    except OSError as error:
        print(f"error: {error}; images placed so far stay placed, run again to finish", file=sys.stderr)
        return 1
    verb = {"move": "Moved", "copy": "Copied", "symlink": "Linked"}[args.mode]
    class_count = len({destination.parent for _, destination in plan.placements})
    print(
        f"{verb} {len(plan.placements):,} images into {class_count:,} class folders under {plan.class_root}"
        f" ({plan.already_placed:,} were already in place)."
    )
    return 0


def _run_check(args: argparse.Namespace) -> int:
    report = check_imagefolder_tree(
        args.root,
        expected_train_images=args.expect_train,
        expected_val_images=args.expect_val,
        expected_classes=args.expect_classes,
        verify=args.verify_images,
        workers=args.workers,
    )
    print(format_check_report(report, args.max_problems))
    return 0 if report.ok else 1


MAX_PROBLEMS_HELP = "list at most N problems of each kind (default 20)"


def _positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_imagenet.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subcommands = parser.add_subparsers(dest="command", required=True)

    layout = subcommands.add_parser(
        "layout-val",
        help="sort the flat validation images into <wnid>/ class folders",
        description="Sort the 50,000 flat ILSVRC2012_val_*.JPEG files into <wnid>/ class folders. Checks the "
        "whole plan first and changes nothing if any image is missing or any file is unexplained; "
        "re-running on a finished layout does nothing.",
    )
    layout.add_argument("val_dir", type=Path, help=f"folder holding {FLAT_VAL_SOURCE}")
    label_source = layout.add_mutually_exclusive_group(required=True)
    label_source.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12.tar.gz or its extracted folder")
    label_source.add_argument("--loc-csv", type=Path, help="Kaggle's LOC_val_solution.csv")
    layout.add_argument(
        "--synsets",
        type=Path,
        help="with --devkit: a file of 'ILSVRC2012_ID WNID' lines, read instead of meta.mat (which needs scipy)",
    )
    layout.add_argument("--out", type=Path, help="make the class folders here instead of in val_dir")
    how = layout.add_mutually_exclusive_group()
    how.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy instead of moving")
    how.add_argument("--symlink", dest="mode", action="store_const", const="symlink", help="link instead of moving")
    layout.set_defaults(mode="move", handler=_run_layout_val)
    layout.add_argument("--max-problems", type=_positive_int, default=20, metavar="N", help=MAX_PROBLEMS_HELP)

    check = subcommands.add_parser(
        "check",
        help="check an ImageFolder tree against ImageNet-1K's counts",
        description="Check <root>/train/<class>/* and <root>/val/<class>/*: image and class counts, same classes "
        "in both splits, empty classes, non-image files and, with --verify-images, that every image decodes.",
    )
    check.add_argument("root", type=Path, help="the folder holding train/ and val/")
    for option, default, what in [
        ("--expect-train", IMAGENET_TRAIN_IMAGES, "train images"),
        ("--expect-val", IMAGENET_VAL_IMAGES, "val images"),
        ("--expect-classes", IMAGENET_CLASSES, "classes in each split"),
    ]:
        check.add_argument(option, type=int, default=default, metavar="N", help=f"{what} (default {default:,})")
    check.add_argument(
        "--verify-images", action="store_true", help="decode every image with Pillow and name the unreadable ones"
    )
    check.add_argument(
        "--workers",
        type=_positive_int,
        default=_usable_cpu_count(),
        metavar="N",
        help="processes for --verify-images (default: all usable CPUs)",
    )
    check.add_argument("--max-problems", type=_positive_int, default=20, metavar="N", help=MAX_PROBLEMS_HELP)
    check.set_defaults(handler=_run_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "layout-val" and args.synsets is not None and args.devkit is None:
        parser.error("--synsets maps the devkit's ILSVRC2012_IDs; it goes with --devkit, not --loc-csv")
    try:
        return args.handler(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
