"""The robustness table (clean, ImageNet-V2, ReaL, -A, -R, -Sketch, -C mCE) on generated trees.

The oracle: a ConvNeXt-atto with fixed random weights (its head scaled up, so the arg-maxes are
clear) whose logits for every image are computed here, from the JPEG files on disk, before any
tree is laid out. Each tree then puts each image in the class folder (or, for ReaL, under the
validation-file number) that makes it right or wrong on purpose, so every expected score is a
count made here: which images restricting to 200 classes rescues, which ReaL sets hold the
prediction, which folder number is which class, and mCE from error rates chosen per corruption.
The ReaL labels and the A/R class lists are read from timm's own files, as the code does; AlexNet's
clean error comes from torchvision's weight metadata, its per-corruption means from the paper.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, build_model, photo_crops, randomize_, run_script, sample_photos
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from timm.data import ImageNetInfo

from convnext_train.configs import CONFIG_DIR
from convnext_train.data.corruptions import corrupt_function
from convnext_train.data.robustness import CORRUPTIONS, class_subset, corruption_folders, robustness_dataset
from convnext_train.data.transforms import eval_transform
from convnext_train.errors import UserError
from convnext_train.imagenet_c import ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, corruption_errors
from convnext_train.inference import Inference
from convnext_train.robustness import Scorer, score_sets
from convnext_train.robustness import format_table as robustness_table

IMG = 32
POOL = 40  # distinct images; the trees reuse them
WNIDS = ImageNetInfo().label_names()
A_CLASSES = [int(x) for x in pkgutil.get_data("timm.data", "_info/imagenet_a_indices.txt").split()]
R_CLASSES = [int(x) for x in pkgutil.get_data("timm.data", "_info/imagenet_r_indices.txt").split()]
REAL = json.loads(pkgutil.get_data("timm.data", "_info/imagenet_real_labels.json"))
# Hendrycks & Dietterich (ICLR 2019), AlexNet's CE per corruption (the mean over severities), as the
# paper's table and many evaluation codes print it: a check on the per-severity constants' typing.
ALEXNET_CE = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
EVAL = ["data.num_workers=0", "eval.crop_pct=1.0", "eval.batch_size=16", "eval.channels_last=false"]


@dataclass
class Oracle:
    checkpoint: Path
    images: list[Path]
    full: list[int]  # arg-max over the 1000 classes
    a: list[int]  # arg-max over ImageNet-A's 200
    r: list[int]  # over ImageNet-R's 200
    model: torch.nn.Module


def restricted_argmax(logits: torch.Tensor, classes: list[int]) -> list[int]:
    index = torch.tensor(classes)
    return index[logits[:, index].argmax(1)].tolist()


def clear_margin(logits: torch.Tensor, classes: list[int] | None = None) -> torch.Tensor:
    """Images whose winning logit leads the next by a margin float noise cannot close."""
    chosen = logits if classes is None else logits[:, classes]
    top2 = chosen.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > 0.05


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches on a loaded 2-core machine: one intra-op thread is several times faster than
    two that wait on each other (the eval.py subprocesses get OMP_NUM_THREADS=1 alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle(module_tmp_path) -> Oracle:
    model = randomize_(build_model("convnext_atto", num_classes=1000)).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)
    checkpoint = module_tmp_path / "atto_1000.pt"
    torch.save(model.state_dict(), checkpoint)
    pool = module_tmp_path / "pool"
    pool.mkdir()
    paths = []
    for i, photo in enumerate(photo_crops(sample_photos(), 3 * POOL, IMG, seed=1)):
        paths.append(pool / f"image_{i}.jpg")
        photo.save(paths[-1], quality=95)
    # From the files, as a reader would decode them, at the size the eval runs use (crop_pct 1.0).
    transform = eval_transform(IMG, 1.0)
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    keep = clear_margin(logits) & clear_margin(logits, A_CLASSES) & clear_margin(logits, R_CLASSES)
    chosen = [i for i in range(len(paths)) if keep[i]][:POOL]
    assert len(chosen) == POOL
    logits = logits[chosen]
    return Oracle(
        checkpoint,
        [paths[i] for i in chosen],
        logits.argmax(1).tolist(),
        restricted_argmax(logits, A_CLASSES),
        restricted_argmax(logits, R_CLASSES),
        model,
    )


def put(image: Path, folder: Path, name: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, folder / (name or image.name))  # the same bytes: the same decoded pixels


def other(cls: int, classes: list[int] | None = None) -> int:
    """A class that is not `cls` (from `classes` when given)."""
    classes = classes or list(range(1000))
    return classes[(classes.index(cls) + 7) % len(classes)] if cls in classes else classes[0]


@dataclass
class Trees:
    root: Path
    expected: dict  # set name -> expected top-1 (%), and the other expected numbers
    unrestricted: dict  # A, R: the score without the 200-class restriction


def lay_out(o: Oracle, root: Path) -> Trees:
    expected, unrestricted = {}, {}
    n = len(o.images)

    # ImageNet-A and -R: an image whose 1000-way arg-max is outside the set but whose 200-way one is
    # the folder's class is right only with the restriction; one in its 1000-way class is right either way.
    for name, dirname, sub, classes in (("imagenet_a", "imagenet-a", o.a, A_CLASSES), ("imagenet_r", "imagenet-r", o.r, R_CLASSES)):  # fmt: skip
        labels = []
        for i in range(n - 3):  # an odd count: two processes get unequal shards
            inside = o.full[i] in classes
            label = o.full[i] if inside else (sub[i] if i % 3 else other(sub[i], classes))
            put(o.images[i], root / dirname / WNIDS[label])
            labels.append(label)
        expected[name] = 100 * np.mean([label == sub[i] for i, label in enumerate(labels)])
        unrestricted[name] = 100 * np.mean([label == o.full[i] for i, label in enumerate(labels)])

    # ImageNet-V2: folders named by class number; three in four images in their predicted class's.
    labels = []
    for i in range(n):
        label = o.full[i] if i % 4 else other(o.full[i])
        put(o.images[i], root / "imagenetv2-matched-frequency-format-val" / str(label))
        labels.append(label)
    expected["imagenet_v2"] = 100 * np.mean([label == o.full[i] for i, label in enumerate(labels)])
    # What reading the folders in string order (ImageFolder's) would score instead.
    folders = sorted({str(label) for label in labels})
    expected["v2_as_strings"] = 100 * np.mean([folders.index(str(lab)) == o.full[i] for i, lab in enumerate(labels)])

    # ReaL over the clean validation tree: each image gets a validation-file number whose ReaL set
    # holds its prediction (not as the first label where one exists), does not, or is empty; its
    # class folder says the opposite, so the clean top-1 of the same tree differs.
    used: set[int] = set()

    def number(accept) -> int | None:
        found = next((k for k in range(len(REAL)) if k not in used and accept(REAL[k])), None)
        if found is not None:
            used.add(found)
            return found + 1
        return None

    right = wrong = empty = 0
    for i in range(n):
        p = o.full[i]
        kind = ("right", "wrong", "empty")[i % 3]
        if kind == "right":
            k = number(lambda s, p=p: p in s and s[0] != p) or number(lambda s, p=p: p in s)
            folder, right = other(p), right + 1
        elif kind == "wrong":
            k, folder, wrong = number(lambda s, p=p: s and p not in s), p, wrong + 1
        else:
            k, folder, empty = number(lambda s: not s), p, empty + 1
        put(o.images[i], root / "imagenet" / "val" / WNIDS[folder], f"ILSVRC2012_val_{k:08d}.JPEG")
    expected["imagenet_real"] = 100 * right / (right + wrong)
    expected["real_excluded"] = empty
    expected["imagenet"] = 100 * (wrong + empty) / n  # the folders agree with the prediction there

    # ImageNet-Sketch: an ordinary 1000-class tree.
    labels = []
    for i in range(n - 1):
        label = o.full[i] if i % 2 else other(o.full[i])
        put(o.images[i], root / "sketch" / WNIDS[label])
        labels.append(label)
    expected["imagenet_sketch"] = 100 * np.mean([label == o.full[i] for i, label in enumerate(labels)])

    # ImageNet-C: 15 corruptions x 5 severities of 3 images each, (c + s) % 4 of them right (capped at 3).
    errors = {}
    for c, corruption in enumerate(CORRUPTIONS):
        errors[corruption] = []
        for severity in range(1, 6):
            hits = min((c + severity) % 4, 3)
            for j in range(3):
                i = (5 * c + severity + j) % n
                label = o.full[i] if j < hits else other(o.full[i])
                put(o.images[i], root / "imagenet-c" / corruption / str(severity) / WNIDS[label])
            errors[corruption].append(1 - hits / 3)
    expected["c_errors"] = errors
    return Trees(root, expected, unrestricted)


def hand_mce(errors: dict, clean_error: float) -> tuple[float, float]:
    """Hendrycks & Dietterich's definitions, written out here."""
    alexnet_clean = 1 - 0.56522  # torchvision's AlexNet_Weights.IMAGENET1K_V1 metadata: acc@1 56.522
    ce = [sum(errors[c]) / sum(ALEXNET_ERRORS[c]) for c in CORRUPTIONS]
    rel = [
        sum(e - clean_error for e in errors[c]) / sum(a - alexnet_clean for a in ALEXNET_ERRORS[c]) for c in CORRUPTIONS
    ]
    return 100 * sum(ce) / 15, 100 * sum(rel) / 15


@pytest.fixture(scope="module")
def trees(oracle, module_tmp_path) -> Trees:
    return lay_out(oracle, module_tmp_path / "datasets")


def scorer(model) -> Scorer:
    return Scorer(model, Inference(torch.device("cpu"), channels_last=False, batch_size=16, num_workers=0))


def set_cfg(kind: str, root: Path, **extra):
    return OmegaConf.create(
        {"kind": kind, "root": str(root), "img_size": IMG, "skip_corrupt": False, "val_split": "val", **extra}
    )


# --------------------------------------------------------------------------------------------------
# Constants and formulas
# --------------------------------------------------------------------------------------------------
def test_alexnet_constants_match_the_published_ones():
    from torchvision.models import AlexNet_Weights

    for name, per_severity in ALEXNET_ERRORS.items():
        assert sum(per_severity) / 5 == pytest.approx(ALEXNET_CE[name], abs=1e-6), name
    assert list(ALEXNET_ERRORS) == list(ALEXNET_CE)  # the 15, in the benchmark's order
    accuracy = AlexNet_Weights.IMAGENET1K_V1.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert ALEXNET_CLEAN_ERROR == pytest.approx(1 - accuracy / 100)


def test_mce_and_relative_mce_equal_a_hand_computation():
    # AlexNet's own errors: 100 and 100 by definition.
    alexnet = corruption_errors(ALEXNET_ERRORS, ALEXNET_CLEAN_ERROR)
    assert alexnet["mce"] == pytest.approx(100) and alexnet["relative_mce"] == pytest.approx(100)
    # Errors chosen here: 0.5 at every severity of every corruption but fog (0.2), clean error 0.1.
    chosen = {c: [0.2] * 5 if c == "fog" else [0.5] * 5 for c in CORRUPTIONS}
    result = corruption_errors(chosen, 0.1)
    fog_ce = 1.0 / (0.67474 + 0.7605 + 0.84378 + 0.8726 + 0.945)  # 5 x 0.2 over fog's AlexNet sum
    fog_relative = (5 * 0.1) / (0.67474 + 0.7605 + 0.84378 + 0.8726 + 0.945 - 5 * (1 - 0.56522))
    assert result["corruptions"]["fog"]["ce"] == pytest.approx(100 * fog_ce)
    assert result["corruptions"]["fog"]["relative_ce"] == pytest.approx(100 * fog_relative)
    assert (result["mce"], result["relative_mce"]) == pytest.approx(hand_mce(chosen, 0.1))
    # Fewer than 15 corruptions: no mCE (a partial mean is not the benchmark's number).
    partial_errors = dict(list(chosen.items())[:14])
    assert corruption_errors(partial_errors, 0.1)["mce"] is None
    assert corruption_errors(chosen, None)["relative_mce"] is None


# --------------------------------------------------------------------------------------------------
# The readers and the scorer, in this process
# --------------------------------------------------------------------------------------------------
def test_restricting_to_200_classes_changes_the_score_exactly_where_expected(oracle, trees):
    for kind, dirname in (("imagenet_a", "imagenet-a"), ("imagenet_r", "imagenet-r")):
        dataset = robustness_dataset(set_cfg(kind, trees.root / dirname), 1.0)
        restricted = scorer(oracle.model).top1(dataset, class_subset(kind))
        unrestricted = scorer(oracle.model).top1(dataset, None)
        assert restricted["top1"] == pytest.approx(trees.expected[kind])
        assert unrestricted["top1"] == pytest.approx(trees.unrestricted[kind])
        assert restricted["top1"] > unrestricted["top1"]  # the tree holds images only the restriction gets right


def test_v2_numeric_folders_map_to_their_class_and_real_sets_count_membership(oracle, trees):
    v2 = robustness_dataset(set_cfg("imagenet_v2", trees.root / "imagenetv2-matched-frequency-format-val"), 1.0)
    assert scorer(oracle.model).top1(v2, None)["top1"] == pytest.approx(trees.expected["imagenet_v2"])
    assert trees.expected["imagenet_v2"] != pytest.approx(trees.expected["v2_as_strings"])

    real = robustness_dataset(set_cfg("imagenet_real", trees.root / "imagenet"), 1.0)
    scores = scorer(oracle.model).top1(real, None)
    assert scores["top1"] == pytest.approx(trees.expected["imagenet_real"])
    assert real.images.excluded == trees.expected["real_excluded"] > 0
    assert scores["images"] == len(oracle.images) - trees.expected["real_excluded"]


def test_a_tree_that_does_not_match_its_set_is_one_clear_line(trees, tmp_path):
    cases = [
        # V2's numbered folders read as ImageNet-A: not A's WordNet ids.
        (set_cfg("imagenet_a", trees.root / "imagenetv2-matched-frequency-format-val"), "is not one of this set's 200"),
        # A's WordNet-id folders read as V2: not class numbers.
        (set_cfg("imagenet_v2", trees.root / "imagenet-a"), "is not a class index 0..999"),
        (set_cfg("imagenet_sketch", tmp_path / "nowhere"), "is not a directory"),
    ]
    (tmp_path / "renamed" / "val" / "n01440764").mkdir(parents=True)
    Image.new("RGB", (IMG, IMG)).save(tmp_path / "renamed" / "val" / "n01440764" / "photo.jpg")
    cases.append((set_cfg("imagenet_real", tmp_path / "renamed"), "is not an ImageNet validation image name"))
    cases.append((set_cfg("imagenet_real", trees.root / "imagenet", real_labels=str(tmp_path / "no.json")), "reassessed-imagenet"))  # fmt: skip
    for cfg, words in cases:
        with pytest.raises(UserError, match=words) as raised:
            robustness_dataset(cfg, 1.0)
        message = str(raised.value)
        assert "\n" not in message and ("expected" in message or "download" in message), message
    with pytest.raises(UserError, match="none of ImageNet-C's corruption folders"):
        corruption_folders(trees.root / "sketch")


def test_every_benchmark_corruption_runs_with_the_installed_libraries():
    corrupt = corrupt_function()
    image = np.asarray(photo_crops(sample_photos(), 1, 64, seed=3)[0])
    for name in CORRUPTIONS:
        out = corrupt(image, name, 3)
        assert out.shape == image.shape and np.abs(out.astype(int) - image).mean() > 0.5, name


# --------------------------------------------------------------------------------------------------
# eval.py: the one-command table, on one process and on two
# --------------------------------------------------------------------------------------------------
def eval_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.json").read_text())


@pytest.fixture(scope="module")
def table_run(oracle, trees, module_tmp_path):
    run_dir = module_tmp_path / "eval_one"
    args = [f"checkpoint={oracle.checkpoint}", f"robustness.root={trees.root}", f"data.img_size={IMG}", *EVAL]
    result = run_script("eval.py", *args, f"hydra.run.dir={run_dir}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result, eval_json(run_dir), args


@pytest.mark.slow
def test_one_command_scores_every_set_present_as_the_oracle_counts(table_run, trees):
    result, scores, _ = table_run
    sets = scores["robustness"]
    for name in ("imagenet", "imagenet_v2", "imagenet_real", "imagenet_a", "imagenet_r", "imagenet_sketch"):
        assert sets[name]["top1"] == pytest.approx(trees.expected[name]), name
    assert sets["imagenet_real"]["excluded"] == trees.expected["real_excluded"]
    clean_error = 1 - trees.expected["imagenet"] / 100
    mce, relative = hand_mce(trees.expected["c_errors"], clean_error)
    assert sets["imagenet_c"]["mce"] == pytest.approx(mce)
    assert sets["imagenet_c"]["relative_mce"] == pytest.approx(relative)
    # The printed table: its columns, and one row with every cell filled.
    header = next(line for line in result.stdout.splitlines() if line.startswith("| model"))
    for column in ("clean top-1", "V2", "ReaL", "A", "R", "Sketch", "C mCE", "C rel. mCE"):
        assert f"| {column} |" in header + " |", column
    row = next(line for line in result.stdout.splitlines() if line.startswith("| convnext_atto"))
    assert "–" not in row and f"{mce:.2f}" in row and f"{trees.expected['imagenet_v2']:.2f}" in row


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(table_run, module_tmp_path):
    _, one, args = table_run
    run_dir = module_tmp_path / "eval_two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, str(REPO / "eval.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    two = eval_json(run_dir)["robustness"]
    for name, scores in one["robustness"].items():
        for key in ("top1", "images", "excluded", "mce", "relative_mce"):
            assert two[name].get(key) == pytest.approx(scores.get(key)), (name, key)
    assert result.stdout.count("| model |") == 1  # rank 0 alone prints the table


def composed(*overrides: str):
    """conf/eval.yaml as eval.py composes it, with the run's image size already taken from the checkpoint."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("eval", overrides=[*overrides, f"data.img_size={IMG}", *EVAL])


def test_missing_sets_are_dashes_with_their_paths_and_one_set_scores_alone(oracle, trees, tmp_path):
    # A root holding ImageNet-A only, V2 pointed at elsewhere: two numbers, five dashes, no error.
    root = tmp_path / "some"
    shutil.copytree(trees.root / "imagenet-a", root / "imagenet-a")
    v2 = trees.root / "imagenetv2-matched-frequency-format-val"
    cfg = composed(f"robustness.root={root}", f"robustness.paths.imagenet_v2={v2}")
    sets = score_sets(cfg, scorer(oracle.model), on_main=False)
    assert sets["imagenet_a"]["top1"] == pytest.approx(trees.expected["imagenet_a"])
    assert sets["imagenet_v2"]["top1"] == pytest.approx(trees.expected["imagenet_v2"])
    table = robustness_table([{"model": "m", "checkpoint": "c", "ema": False, "img_size": IMG, "robustness": sets}])
    for name, dirname in (("imagenet", "imagenet"), ("imagenet_real", "imagenet"), ("imagenet_r", "imagenet-r"), ("imagenet_sketch", "sketch"), ("imagenet_c", "imagenet-c")):  # fmt: skip
        assert sets[name]["missing"] == str(root / dirname)
        assert f"- {name}: not found at {root / dirname} (expected <root>/" in table
    row = next(line for line in table.splitlines() if line.startswith("| m |"))
    assert row.count("–") == 6  # clean, ReaL, R, Sketch, mCE, relative mCE

    # data=<set> with data.root: that set alone, through the same scorer.
    for kind, folder in (("imagenet_v2", v2), ("imagenet_real", trees.root / "imagenet")):
        alone = score_sets(composed(f"data={kind}", f"data.root={folder}"), scorer(oracle.model), on_main=False)
        assert list(alone) == [kind] and alone[kind]["top1"] == pytest.approx(trees.expected[kind])
    alone = score_sets(
        composed("data=imagenet_c", f"data.root={trees.root / 'imagenet-c'}"), scorer(oracle.model), False
    )
    mce, _ = hand_mce(trees.expected["c_errors"], clean_error=0.0)
    assert alone["imagenet_c"]["mce"] == pytest.approx(mce) and alone["imagenet_c"]["relative_mce"] is None


@pytest.mark.slow
def test_a_tree_of_another_layout_stops_eval_py_with_one_line(oracle, trees, tmp_path):
    v2 = trees.root / "imagenetv2-matched-frequency-format-val"
    args = [f"checkpoint={oracle.checkpoint}", f"data.img_size={IMG}", *EVAL, f"hydra.run.dir={tmp_path}"]
    wrong = run_script("eval.py", *args, "data=imagenet_a", f"data.root={v2}")
    assert wrong.returncode == 2
    assert "Traceback" not in wrong.stderr and "is not one of this set's 200 WordNet ids" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# data/make_imagenet_c.py
# --------------------------------------------------------------------------------------------------
def make_imagenet_c(argv: list[str]) -> int:
    """data/make_imagenet_c.py's main, run in this process (its workers are forked from it)."""
    spec = importlib.util.spec_from_file_location("make_imagenet_c", REPO / "data" / "make_imagenet_c.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_imagenet_c"] = module  # where the workers' pickles find its functions
    spec.loader.exec_module(module)
    return module.main(argv)


def test_make_imagenet_c_writes_the_release_layout_and_resumes(oracle, tmp_path, capsys):
    val = tmp_path / "val"
    for i, wnid in enumerate(WNIDS[:3]):
        put(oracle.images[i], val / wnid, f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    out = tmp_path / "imagenet-c"
    argv = [str(val), str(out), "--corruptions", "gaussian_noise", "fog", "--severities", "1", "5", "--workers", "2"]
    assert make_imagenet_c(argv) == 0
    assert "3 images still to do" in capsys.readouterr().out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.JPEG"))
    assert len(written) == 3 * 2 * 2 and written[0] == f"fog/1/{WNIDS[0]}/ILSVRC2012_val_00000001.JPEG"
    assert all(Image.open(out / p).size == (224, 224) for p in written)
    stamps = {p: (out / p).stat().st_mtime_ns for p in written}
    # A killed run's missing file is written again (the same bytes: seeded); the rest are left alone.
    first = (out / written[0]).read_bytes()
    (out / written[0]).unlink()
    assert make_imagenet_c(argv) == 0
    assert "1 images still to do" in capsys.readouterr().out
    assert (out / written[0]).read_bytes() == first
    assert all((out / p).stat().st_mtime_ns == stamps[p] for p in written[1:])
    present, missing = corruption_folders(out)
    assert present == [("gaussian_noise", 1), ("gaussian_noise", 5), ("fog", 1), ("fog", 5)]
    assert len(missing) == 71
    # A corrupted image is not its source: the corruption ran.
    source = np.asarray(Image.open(val / WNIDS[0] / "ILSVRC2012_val_00000001.JPEG").convert("RGB").resize((224, 224)))
    noisy = np.asarray(Image.open(out / f"gaussian_noise/5/{WNIDS[0]}/ILSVRC2012_val_00000001.JPEG"))
    assert np.abs(noisy.astype(int) - source).mean() > 10
