"""data=hf, for real: the tiny ImageFolder tree's JPEG files stored with Hugging Face `datasets`
(an Image feature and a ClassLabel) in each layout data=hf reads: a DatasetDict's `save_to_disk`
directory, parquet shards in the hub's layout (`data/train-00000-of-00002.parquet`, `validation`, an
unlabelled `test` split as ImageNet-1k has), and parquet shards in a folder per split.

What is proven here:
- every layout yields the ImageFolder path's batches bit for bit (the same order, pixels under the
  full recipe, targets, validation images), and `start_at` continues an epoch mid-way;
- the errors: a missing split, column or dataset, a ClassLabel count that is not data.num_classes,
  labels that are not classes (unlabelled rows, integers without num_classes, out of range), train
  and validation splits with different classes, a name that is not on disk, no `datasets` install:
  one line each; an undecodable image is named, or skipped and flagged with data.skip_corrupt;
- train.py end to end (slow): a run killed mid-epoch resumes bitwise equal to an uninterrupted one;
  two processes under torchrun train like one (so each epoch's global batches hold the same images:
  every image once); eval.py scores the same top-1 on data=imagenet_hf as on the ImageFolder tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import REPO, run_script
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from omegaconf import OmegaConf
from test_resume import EVERY_STEP, assert_ends_like, kill_once_saved
from test_train import TINY_RUN, load, read_jsonl, relative_difference
from torchvision.datasets import ImageFolder

from convnext_train.configs import CONFIG_DIR
from convnext_train.data.hf import hf_samples
from convnext_train.data.imagefolder import UnreadableImageError
from convnext_train.data.sources import LoaderArgs, build_loaders, build_val_loader
from convnext_train.errors import UserError

CPU = torch.device("cpu")
LAYOUTS = ("save_to_disk", "hub parquet", "split folders")


def aug_config(name: str = "recipe", **overrides):
    return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "aug" / f"{name}.yaml"), overrides)


def hf_data(root: Path | str, **overrides):
    base = OmegaConf.load(CONFIG_DIR / "data" / "hf.yaml")
    settings = {"root": str(root), "num_classes": 4, "img_size": 32, "num_workers": 0, "pin_memory": False}
    return OmegaConf.merge(base, settings, overrides)


def imagefolder_data(root: Path, **overrides):
    base = OmegaConf.load(CONFIG_DIR / "data" / "imagenet.yaml")
    settings = {"root": str(root), "num_classes": 4, "img_size": 32, "num_workers": 0, "pin_memory": False}
    return OmegaConf.merge(base, settings, overrides)


def split_rows(tree: Path, split: str, classes: list[str] | None = None) -> Dataset:
    """One ImageFolder split as the hub stores images: each file's bytes and name, in ImageFolder's
    order, labelled by a ClassLabel of its class folders."""
    folder = ImageFolder(str(tree / split))
    images = [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p, _ in folder.samples]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=classes or folder.classes)})
    return Dataset.from_dict({"image": images, "label": folder.targets}, features=features)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module", autouse=True)
def _datasets_cache(module_tmp_path):
    """The parquet layouts' Arrow conversion goes under this module's directory, in this process
    and in the train.py / eval.py processes it starts, instead of the user's ~/.cache."""
    cache = module_tmp_path / "hf-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield


@pytest.fixture(scope="module")
def layouts(tiny_imagefolder, module_tmp_path) -> dict[str, Path]:
    """The tiny tree (4 classes, 64 training and 16 validation JPEGs) in each layout."""
    train, val = split_rows(tiny_imagefolder, "train"), split_rows(tiny_imagefolder, "val")
    saved = module_tmp_path / "saved"
    DatasetDict(train=train, validation=val).save_to_disk(str(saved))

    hub = module_tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    for i in range(2):
        train.shard(2, i, contiguous=True).to_parquet(str(hub / "data" / f"train-{i:05d}-of-00002.parquet"))
    val.to_parquet(str(hub / "data" / "validation-00000-of-00001.parquet"))
    unlabelled = Dataset.from_dict({"image": val[:2]["image"], "label": [-1, -1]}, features=val.features)
    unlabelled.to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))

    folders = module_tmp_path / "folders"
    for split in ("train", "validation"):
        (folders / split).mkdir(parents=True)
        for shard in (hub / "data").glob(f"{split}-*.parquet"):
            os.link(shard, folders / split / shard.name)
    return {"save_to_disk": saved, "hub parquet": hub, "split folders": folders}


# --------------------------------------------------------------------------------------------------
# The same batches as the ImageFolder path
# --------------------------------------------------------------------------------------------------
def passes(loaders, epoch: int = 1, start: int = 0) -> tuple[list, list]:
    loaders.start_at(epoch, start)
    return list(loaders.train), list(loaders.val)


@pytest.fixture(scope="module")
def imagefolder_batches(tiny_imagefolder):
    """Epoch 1 of the reference path under the full recipe (RandAugment, erasing), and its validation."""
    return passes(
        build_loaders(imagefolder_data(tiny_imagefolder), aug_config(), LoaderArgs(seed=3, batch_size=16, device=CPU))
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_yields_the_imagefolder_paths_batches_bit_for_bit(layout, layouts, imagefolder_batches):
    loaders = build_loaders(hf_data(layouts[layout]), aug_config(), LoaderArgs(seed=3, batch_size=16, device=CPU))
    assert loaders.train_length == 64
    train, val = passes(loaders)
    reference_train, reference_val = imagefolder_batches
    assert len(train) == len(reference_train) == 4 and sum(len(b[0]) for b in val) == 16
    for (images, targets, replaced), (same_images, same_targets, _) in zip(
        train + val, reference_train + reference_val, strict=True
    ):
        assert torch.equal(targets, same_targets) and torch.equal(images, same_images)
        assert not replaced.any()
    assert len(set(torch.cat([b[1] for b in train]).tolist())) == 4  # the batches hold every class
    resumed, _ = passes(loaders, start=32)  # after 2 micro-batches of this epoch
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, train[2:], strict=True)) and len(resumed) == 2


def test_eval_pys_loader_reads_the_validation_split_as_the_imagefolder_path_does(layouts, tiny_imagefolder):
    hf = build_val_loader(hf_data(layouts["hub parquet"]), 0.875, LoaderArgs(seed=0, batch_size=10, device=CPU))
    reference = build_val_loader(
        imagefolder_data(tiny_imagefolder), 0.875, LoaderArgs(seed=0, batch_size=10, device=CPU)
    )
    batches = list(zip(hf, reference, strict=True))
    assert sum(len(a[0]) for a, _ in batches) == 16
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in batches)


# --------------------------------------------------------------------------------------------------
# Errors: one line each
# --------------------------------------------------------------------------------------------------
def build(root: Path | str, **overrides):
    return hf_samples(hf_data(root, **overrides), aug_config("none"), seed=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_missing_split_or_column_or_a_wrong_class_count_is_one_line(layout, layouts):
    root = layouts[layout]
    splits = "test, train, validation" if layout == "hub parquet" else "train, validation"
    with pytest.raises(UserError) as error:
        build(root, val_split="val")
    assert one_line(error) == (
        f"split 'val' not found in {root} (its splits: {splits}); set data.val_split to one of them, "
        "or data.val_split=null for none"
    )
    with pytest.raises(UserError, match=r"split 'training' not found .* set data.train_split to one of them$"):
        build(root, train_split="training")
    with pytest.raises(UserError) as error:
        build(root, image_column="img")
    assert one_line(error).endswith(
        "has no column 'img' (its columns: image, label); set data.image_column to one of them"
    )
    with pytest.raises(UserError) as error:
        build(root, num_classes=5)
    assert one_line(error) == (
        f"the label column 'label' of split 'train' of {root} is a ClassLabel of 4 classes but data.num_classes=5; "
        "set data.num_classes=4"
    )
    with pytest.raises(UserError, match=r"column 'label' of split 'train' .* holds ClassLabel.*, not images"):
        build(root, image_column="label")
    train, val = build(root)  # and with the right settings, it opens
    assert len(train) == 64 and len(val) == 16


def test_labels_that_are_not_classes_are_one_line(layouts, tiny_imagefolder, tmp_path):
    with pytest.raises(UserError) as error:
        build(layouts["hub parquet"], train_split="test", val_split=None)
    assert "split 'test'" in one_line(error) and "has labels -1..-1, outside 0..3" in one_line(error)
    assert "use a labelled split" in one_line(error)

    # Plain integer labels: data.num_classes is the only class count there is, and it is checked.
    rows = split_rows(tiny_imagefolder, "val")
    plain = rows.cast_column("label", Value("int64"))
    DatasetDict(train=plain, validation=plain).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(UserError) as error:
        build(tmp_path / "plain", num_classes=None)
    assert "is not a ClassLabel, so it does not say how many classes: set data.num_classes" in one_line(error)
    with pytest.raises(UserError, match=r"has labels 0..3, outside 0..2 \(data.num_classes=3\)"):
        build(tmp_path / "plain", num_classes=3)
    train, _ = build(tmp_path / "plain", num_classes=4)
    assert [train.images[i].target for i in range(len(train))] == rows["label"]

    # Train and validation splits that name their classes differently.
    renamed = split_rows(tiny_imagefolder, "val", classes=["cat", "dog", "emu", "fox"])
    DatasetDict(train=rows, validation=renamed).save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(UserError) as error:
        build(tmp_path / "renamed")
    assert "name their classes differently (class 0 is 'class_0' in one and 'cat' in the other)" in one_line(error)


def test_a_name_that_is_not_on_disk_says_how_to_download_it(tmp_path):
    with pytest.raises(UserError) as error:
        build("imagenet-1k")
    message = one_line(error)
    assert message.startswith("data.root=imagenet-1k is not a directory on this machine")
    assert "hf download ILSVRC/imagenet-1k --repo-type dataset --local-dir /datasets/imagenet-1k" in message
    with pytest.raises(UserError, match="hf download timm/mini-imagenet --repo-type dataset"):
        build("timm/mini-imagenet")
    with pytest.raises(UserError, match=r"holds no dataset data=hf can read; data=hf reads a DatasetDict"):
        build(tmp_path)
    Dataset.from_dict({"label": [0]}).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(UserError, match=r"holds one dataset without splits .* save a DatasetDict instead"):
        build(tmp_path / "single")


def test_an_undecodable_image_is_named_or_skipped_and_flagged(tiny_imagefolder, tmp_path):
    rows = split_rows(tiny_imagefolder, "val")
    images = list(rows.cast_column("image", ImageFeature(decode=False))["image"])
    images[1]["bytes"] = images[1]["bytes"][:200]  # a cut-off download: headers, no image data
    broken = Dataset.from_dict({"image": images, "label": rows["label"]}, features=rows.features)
    DatasetDict(train=broken, validation=rows).save_to_disk(str(tmp_path / "broken"))

    train, _ = build(tmp_path / "broken")
    assert train.images[0].target == rows["label"][0]
    with pytest.raises(UnreadableImageError) as error:
        train.images[1]
    assert one_line(error).startswith(
        f"cannot read image at row 1 of split 'train' of {tmp_path / 'broken'} ({images[1]['path']}): "
    )
    assert "data.skip_corrupt=true" in one_line(error)

    train, _ = build(tmp_path / "broken", skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"data.skip_corrupt: skipping the unreadable image at row 1 of split 'train'"):
        image, target, replaced = train.images[1]
    neighbour = train.images[2]
    assert replaced and not neighbour.replaced and target == neighbour.target == rows["label"][2]
    assert image.tobytes() == neighbour.image.tobytes()


# --------------------------------------------------------------------------------------------------
# train.py and eval.py on data=imagenet_hf: killed and resumed, two processes, the same top-1
# --------------------------------------------------------------------------------------------------
# TINY_RUN (ConvNeXt-atto, 32 px, 2 epochs of 4 steps of 16 in 2 micro-batches, the recipe, EMA) without
# the per-rank randomness (drop path, Mixup/CutMix), so that a run's global batches are the same
# images, augmented the same way, whatever the number of processes.
HF_RUN = [*TINY_RUN, "data=imagenet_hf", "data.num_classes=4", "model.drop_path_rate=0", "aug.mixup=0", "aug.cutmix=0"]


def hf_run(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*HF_RUN, f"data.root={root}", f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def uninterrupted(layouts, module_tmp_path) -> Path:
    run_dir = module_tmp_path / "uninterrupted"
    result = run_script("train.py", *hf_run(layouts["hub parquet"], run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_bitwise_equal(uninterrupted, layouts, tmp_path):
    run_dir = tmp_path / "killed"
    # One loader worker here, none in the uninterrupted run: the dataset is pickled into a worker
    # process, and what it yields must not depend on that either.
    args = hf_run(layouts["hub parquet"], run_dir, EVERY_STEP, "data.num_workers=1")
    kill_once_saved(args, run_dir / "checkpoints" / "step_000000006.pt")  # mid-epoch 2
    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_ends_like(uninterrupted, run_dir)


@pytest.mark.slow
def test_two_processes_train_like_one_and_eval_py_scores_as_on_the_imagefolder_tree(
    uninterrupted, layouts, tiny_imagefolder, tmp_path
):
    """Two ranks whose shards held other images, or an image twice, would compute other gradients:
    ending where one process ends (to float summation order) says every global batch was the same."""
    two_dir = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, str(REPO / "train.py"), *hf_run(layouts["hub parquet"], two_dir)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "(2 process(es))" in result.stdout
    one, two = load(uninterrupted / "checkpoints" / "last.pt"), load(two_dir / "checkpoints" / "last.pt")
    assert one["step"] == two["step"] == 8
    assert relative_difference(one["model"], two["model"]) < 1e-5
    assert relative_difference(one["model_ema"], two["model_ema"]) < 1e-5
    evaluations = [[r for r in read_jsonl(d / "metrics.jsonl") if "top1" in r] for d in (uninterrupted, two_dir)]
    for single, sharded in zip(*evaluations, strict=True):
        assert sharded["val_images"] == single["val_images"] == 16  # 8 + 8: none twice, none dropped
        assert sharded["top1"] == pytest.approx(single["top1"])

    # eval.py on the final weights: data=imagenet_hf and the ImageFolder tree score alike, and as
    # training's last evaluation did.
    checkpoint = uninterrupted / "checkpoints" / "last.pt"
    scores = {}
    for name, data in (("hf", ["data=imagenet_hf", f"data.root={layouts['hub parquet']}"]),
                       ("imagefolder", ["data=imagenet", f"data.root={tiny_imagefolder}"])):  # fmt: skip
        result = run_script(
            "eval.py", "model=convnext_atto", f"checkpoint={checkpoint}", *data, "data.num_classes=4",
            "data.img_size=32", "data.num_workers=0", f"hydra.run.dir={tmp_path / name}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        scores[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert scores["hf"]["images"] == scores["imagefolder"]["images"] == 16
    assert scores["hf"]["top1"] == scores["imagefolder"]["top1"]
    assert scores["hf"]["top1"] == pytest.approx(evaluations[0][-1]["top1"])
