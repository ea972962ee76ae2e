"""data/prepare_imagenet.py on tiny real trees: a 12-image validation set of 3 classes, laid out from each
label source, and small train/val ImageFolder trees for `check`. Images are real JPEG files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "prepare_imagenet.py"
sys.path.insert(0, str(SCRIPT.parent))  # data/ is a folder of scripts, not a package
import prepare_imagenet as prep  # noqa: E402

WNIDS = ("n01440764", "n01443537", "n02119789")
# Deliberately not the sorted-WNID order, so that reading the ids by position would mislabel images.
ILSVRC2012_IDS = {"n02119789": 1, "n01443537": 2, "n01440764": 3}
VAL_IMAGES = 12
EXPECTED_LABELS = {f"ILSVRC2012_val_{number:08d}.JPEG": WNIDS[number % 3] for number in range(1, VAL_IMAGES + 1)}


def write_jpeg(path: Path, shade: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade % 256, 40, 200)).save(path, "JPEG")


def write_truncated_jpeg(path: Path) -> None:
    """A noisy JPEG cut to 60%: headers intact, image data short, as after an interrupted download."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noise).save(encoded, "JPEG", quality=95)
    path.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) * 6 // 10])


def tree_snapshot(root: Path) -> dict[str, bytes | str]:
    """Every folder, file and link under `root` with its content, to prove that nothing changed."""
    snapshot: dict[str, bytes | str] = {}
    for folder, folder_names, file_names in os.walk(root):
        for name in folder_names:
            snapshot[os.path.relpath(os.path.join(folder, name), root)] = "folder"
        for name in file_names:
            path = Path(folder, name)
            content = f"link to {os.readlink(path)}" if path.is_symlink() else path.read_bytes()
            snapshot[str(path.relative_to(root))] = content
    return snapshot


def write_loc_csv(path: Path, labels: dict[str, str]) -> Path:
    rows = ["ImageId,PredictionString"]
    rows += [f"{name.removesuffix('.JPEG')},{wnid} 1 2 30 40 {wnid} 5 6 7 8 " for name, wnid in labels.items()]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_devkit_folder(parent: Path, meta_mat: bool) -> Path:
    """An extracted devkit: the ground truth always, meta.mat (needs scipy) when asked."""
    data = parent / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ids_in_image_order = [ILSVRC2012_IDS[EXPECTED_LABELS[name]] for name in sorted(EXPECTED_LABELS)]
    (data / prep.GROUND_TRUTH_FILE).write_text("".join(f"{class_id}\n" for class_id in ids_in_image_order))
    if meta_mat:
        from scipy.io import savemat

        synset_fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        synsets = [(class_id, wnid, f"words of {wnid}", 0) for wnid, class_id in ILSVRC2012_IDS.items()]
        synsets.append((1001, "n00001740", "entity", 3))  # the real file also lists the hierarchy above the classes
        savemat(data / prep.META_MAT_FILE, {"synsets": np.array(synsets, dtype=synset_fields).reshape(-1, 1)})
    return parent / "ILSVRC2012_devkit_t12"


def write_synsets_file(path: Path) -> Path:
    path.write_text("".join(f"{class_id} {wnid} words\n" for wnid, class_id in ILSVRC2012_IDS.items()))
    return path


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def assert_laid_out(class_root: Path, original_bytes: dict[str, bytes]) -> None:
    """Every labelled image sits in its class folder with its original content, and nothing else is there."""
    assert sorted(p.name for p in class_root.iterdir() if p.is_dir()) == sorted(WNIDS)
    for name, wnid in EXPECTED_LABELS.items():
        assert (class_root / wnid / name).read_bytes() == original_bytes[name]
    assert sum(len(os.listdir(class_root / wnid)) for wnid in WNIDS) == VAL_IMAGES


@pytest.fixture
def flat_val(tmp_path: Path) -> Path:
    """The validation images as ILSVRC2012_img_val.tar extracts them: one flat folder."""
    folder = tmp_path / "val"
    for number, name in enumerate(EXPECTED_LABELS):
        write_jpeg(folder / name, shade=number * 20)
    return folder


# ---------------------------------------------------------------------------------------------------
# layout-val
# ---------------------------------------------------------------------------------------------------


def test_layout_from_loc_csv_puts_every_image_in_its_class_and_a_rerun_does_nothing(flat_val: Path, tmp_path: Path):
    original_bytes = {p.name: p.read_bytes() for p in flat_val.iterdir()}
    labels = prep.read_loc_val_solution(write_loc_csv(tmp_path / "LOC_val_solution.csv", EXPECTED_LABELS))
    assert labels == EXPECTED_LABELS

    plan = prep.plan_val_layout(labels, flat_val)
    assert plan.problems == [] and len(plan.placements) == VAL_IMAGES and plan.already_placed == 0
    prep.apply_val_layout(plan)
    assert_laid_out(flat_val, original_bytes)
    assert not [p for p in flat_val.iterdir() if p.is_file()]

    again = prep.plan_val_layout(labels, flat_val)
    assert again.problems == [] and again.placements == [] and again.already_placed == VAL_IMAGES


@pytest.mark.parametrize("packed", [False, True], ids=["extracted", "tar.gz"])
def test_devkit_ground_truth_and_meta_mat_give_the_same_labels(tmp_path: Path, packed: bool):
    pytest.importorskip("scipy", reason="writing and reading meta.mat needs scipy")
    devkit = write_devkit_folder(tmp_path, meta_mat=True)
    if packed:
        archive = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(devkit, arcname=devkit.name)
        devkit = archive
    assert prep.read_devkit_labels(devkit) == EXPECTED_LABELS


def test_cli_layout_from_devkit_moves_images(flat_val: Path, tmp_path: Path):
    pytest.importorskip("scipy", reason="writing and reading meta.mat needs scipy")
    original_bytes = {p.name: p.read_bytes() for p in flat_val.iterdir()}
    devkit = write_devkit_folder(tmp_path, meta_mat=True)

    result = run_cli("layout-val", flat_val, "--devkit", devkit)
    assert result.returncode == 0, result.stderr
    assert "Moved 12 images into 3 class folders" in result.stdout
    assert_laid_out(flat_val, original_bytes)


def test_cli_layout_with_synsets_file_copies_and_a_rerun_says_nothing_to_do(flat_val: Path, tmp_path: Path):
    original_bytes = {p.name: p.read_bytes() for p in flat_val.iterdir()}
    devkit = write_devkit_folder(tmp_path, meta_mat=False)
    synsets = write_synsets_file(tmp_path / "synsets.txt")

    first = run_cli("layout-val", flat_val, "--devkit", devkit, "--synsets", synsets, "--copy")
    assert first.returncode == 0, first.stderr
    assert "Copied 12 images" in first.stdout
    assert_laid_out(flat_val, original_bytes)
    assert {p.name for p in flat_val.iterdir() if p.is_file()} == set(EXPECTED_LABELS)  # the originals stay

    before = tree_snapshot(flat_val)
    again = run_cli("layout-val", flat_val, "--devkit", devkit, "--synsets", synsets, "--copy")
    assert again.returncode == 0, again.stderr
    assert "Nothing to do: all 12 labelled images are already in their class folders" in again.stdout
    assert tree_snapshot(flat_val) == before


def test_symlink_layout_into_another_folder_links_to_the_flat_images(flat_val: Path, tmp_path: Path):
    original_bytes = {p.name: p.read_bytes() for p in flat_val.iterdir()}
    class_root = tmp_path / "imagenet" / "val"

    prep.apply_val_layout(prep.plan_val_layout(EXPECTED_LABELS, flat_val, class_root), "symlink")
    assert_laid_out(class_root, original_bytes)
    for name, wnid in EXPECTED_LABELS.items():
        assert (class_root / wnid / name).resolve() == (flat_val / name).resolve()
    assert prep.plan_val_layout(EXPECTED_LABELS, flat_val, class_root).already_placed == VAL_IMAGES


def test_cli_csv_row_for_a_missing_image_changes_nothing(flat_val: Path, tmp_path: Path):
    labels = {**EXPECTED_LABELS, "ILSVRC2012_val_00000013.JPEG": WNIDS[0]}
    csv_path = write_loc_csv(tmp_path / "LOC_val_solution.csv", labels)
    before = tree_snapshot(flat_val)

    result = run_cli("layout-val", flat_val, "--loc-csv", csv_path)
    assert result.returncode == 1
    assert "missing image: ILSVRC2012_val_00000013.JPEG (labelled n01440764)" in result.stdout
    assert "Nothing was changed" in result.stdout
    assert tree_snapshot(flat_val) == before


def test_unexplained_files_are_named_and_block_the_whole_plan(flat_val: Path):
    (flat_val / "notes.txt").write_text("not an image")
    wrong_folder = flat_val / "n01443537"
    wrong_folder.mkdir()
    (flat_val / "ILSVRC2012_val_00000003.JPEG").rename(wrong_folder / "ILSVRC2012_val_00000003.JPEG")

    plan = prep.plan_val_layout(EXPECTED_LABELS, flat_val)
    assert [str(problem) for problem in plan.problems] == [
        f"image in the wrong class folder: {wrong_folder / 'ILSVRC2012_val_00000003.JPEG'} (labelled n01440764)",
        f"unexpected file: {flat_val / 'notes.txt'}",
    ]
    before = tree_snapshot(flat_val)
    with pytest.raises(ValueError):
        prep.apply_val_layout(plan)
    assert tree_snapshot(flat_val) == before


def test_meta_mat_without_scipy_says_how_to_get_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    devkit = write_devkit_folder(tmp_path, meta_mat=False)
    (devkit / "data" / prep.META_MAT_FILE).write_bytes(b"never parsed")
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy...` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(prep.InputError, match=r"needs scipy: `pip install scipy`, or pass --synsets"):
        prep.read_devkit_labels(devkit)


def test_wnid_only_synset_list_is_refused(tmp_path: Path):
    """LOC_synset_mapping.txt is sorted by WNID; its line numbers are not ILSVRC2012_IDs."""
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\n")
    with pytest.raises(prep.InputError, match="expected 'ILSVRC2012_ID WNID'"):
        prep.read_synsets_file(mapping)


@pytest.mark.parametrize(
    "args, message",
    [
        ("layout-val {tmp}/val --devkit {tmp}/nope.tar.gz", "devkit not found"),
        ("layout-val {tmp}/val --loc-csv {tmp}/nope.csv", "imagenet-object-localization-challenge"),
        ("layout-val {tmp}/nope --loc-csv {tmp}/LOC_val_solution.csv", "extracted from ILSVRC2012_img_val.tar"),
        ("check {tmp}/nope", "dataset root not found"),
        ("check {tmp}/tree", "with `prepare_imagenet.py layout-val`"),  # tree/ has train/ but no val/
    ],
    ids=["devkit", "loc-csv", "val-dir", "check-root", "check-val"],
)
def test_missing_paths_exit_2_with_one_line_saying_what_was_expected(
    flat_val: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: str, message: str
):
    write_loc_csv(tmp_path / "LOC_val_solution.csv", EXPECTED_LABELS)
    (tmp_path / "tree" / "train").mkdir(parents=True)
    assert prep.main(args.format(tmp=tmp_path).split()) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error


def test_cli_synsets_with_loc_csv_is_a_usage_error(flat_val: Path, tmp_path: Path):
    result = run_cli("layout-val", flat_val, "--loc-csv", tmp_path / "x.csv", "--synsets", tmp_path / "s.txt")
    assert result.returncode == 2 and "it goes with --devkit" in result.stderr


# ---------------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------------

TINY_EXPECTATIONS = {"expected_train_images": 9, "expected_val_images": 6, "expected_classes": 3}
TINY_EXPECTATION_FLAGS = ["--expect-train", "9", "--expect-val", "6", "--expect-classes", "3"]


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    """An ImageFolder tree of 3 classes: 3 train and 2 val images each."""
    root = tmp_path / "imagenet"
    for class_index, wnid in enumerate(WNIDS):
        for number in range(3):
            write_jpeg(root / "train" / wnid / f"{wnid}_{number}.JPEG", shade=class_index * 50 + number)
        for number in range(2):
            write_jpeg(root / "val" / wnid / f"ILSVRC2012_val_{class_index * 2 + number + 1:08d}.JPEG", shade=number)
    return root


def problem_strings(report: prep.CheckReport) -> list[str]:
    return [str(problem) for problem in report.problems]


def test_check_passes_a_good_tree(tiny_tree: Path):
    report = prep.check_imagefolder_tree(tiny_tree, **TINY_EXPECTATIONS, verify=True, workers=2)
    assert report.ok, problem_strings(report)
    assert report.images_verified == 15
    assert {split: scan.image_count for split, scan in report.splits.items()} == {"train": 9, "val": 6}


def test_cli_check_passes_a_good_tree_and_fails_with_imagenet_expectations(tiny_tree: Path):
    good = run_cli("check", tiny_tree, *TINY_EXPECTATION_FLAGS, "--verify-images", "--workers", "2")
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.rstrip().endswith("OK")

    imagenet = run_cli("check", tiny_tree)
    assert imagenet.returncode == 1
    assert "wrong image count: train has 9 images, expected 1,281,167" in imagenet.stdout
    assert "wrong class count: val has 3 classes, expected 1,000" in imagenet.stdout
    assert imagenet.stdout.rstrip().endswith("FAILED")


def test_cli_check_names_a_truncated_jpeg_which_only_verify_images_catches(tiny_tree: Path):
    truncated = tiny_tree / "val" / WNIDS[1] / "ILSVRC2012_val_00000003.JPEG"
    write_truncated_jpeg(truncated)
    with Image.open(truncated) as image:
        image.verify()  # passes: verify() alone does not decode JPEG data, hence the full decode
    assert prep.check_imagefolder_tree(tiny_tree, **TINY_EXPECTATIONS).ok

    result = run_cli("check", tiny_tree, *TINY_EXPECTATION_FLAGS, "--verify-images", "--workers", "2")
    assert result.returncode == 1
    assert f"unreadable image: {truncated} (OSError: image file is truncated" in result.stdout
    assert "1 problem(s) (unreadable image: 1)" in result.stdout


def test_check_names_a_class_missing_from_val(tiny_tree: Path):
    for image in (tiny_tree / "val" / "n02119789").iterdir():
        image.unlink()
    (tiny_tree / "val" / "n02119789").rmdir()

    report = prep.check_imagefolder_tree(tiny_tree, **TINY_EXPECTATIONS)
    assert problem_strings(report) == [
        "wrong image count: val has 4 images, expected 6",
        "wrong class count: val has 2 classes, expected 3",
        "class missing from val: n02119789 is in train/ only",
    ]


def test_check_reports_counts_that_differ_from_the_expectations(tiny_tree: Path):
    report = prep.check_imagefolder_tree(tiny_tree, expected_train_images=10, expected_val_images=6, expected_classes=4)
    assert problem_strings(report) == [
        "wrong image count: train has 9 images, expected 10",
        "wrong class count: train has 3 classes, expected 4",
        "wrong class count: val has 3 classes, expected 4",
    ]


def test_check_names_empty_classes_non_images_and_files_outside_class_folders(tiny_tree: Path):
    (tiny_tree / "train" / WNIDS[0] / "n01440764.tar").write_bytes(b"an unextracted archive")
    for split in ("train", "val"):
        (tiny_tree / split / "n09999999").mkdir()
    write_jpeg(tiny_tree / "val" / "ILSVRC2012_val_00000099.JPEG", shade=0)

    report = prep.check_imagefolder_tree(tiny_tree, **TINY_EXPECTATIONS)
    problems = problem_strings(report)
    assert f"non-image file: {tiny_tree / 'train' / WNIDS[0] / 'n01440764.tar'} (ImageFolder skips it)" in problems
    assert f"empty class: {tiny_tree / 'train' / 'n09999999'}" in problems
    assert f"empty class: {tiny_tree / 'val' / 'n09999999'}" in problems
    stray = [p for p in problems if p.startswith("file outside class folders")]
    assert len(stray) == 1 and "ILSVRC2012_val_00000099.JPEG" in stray[0] and "layout-val" in stray[0]


def test_report_shows_every_kind_of_problem_however_many_of_another_kind():
    problems = [prep.Problem("file outside class folders", f"val/{n}.JPEG") for n in range(50)]
    problems.append(prep.Problem("class missing from val", "n01440764 is in train/ only"))

    lines = prep.format_problems(problems, max_per_kind=3)
    assert lines[0] == "51 problem(s) (file outside class folders: 50, class missing from val: 1):"
    assert "  class missing from val: n01440764 is in train/ only" in lines
    assert "  ... and 47 more of kind 'file outside class folders'" in lines
    assert len(lines) == 1 + 3 + 1 + 1
