"""data=ffcv, for real: .beton files written by data/write_ffcv.py from JPEG photos on disk, read by
FFCV through our loaders, and train.py on them (two processes under torchrun, killed and resumed).

What is proven here:
- the writer: counts, labels equal to ImageFolder's class indices, a rerun that leaves a complete file
  alone, rewrites when the source or the settings change, unreadable files named or skipped, and an
  interrupted write that leaves nothing complete-looking behind;
- the reader: each epoch's order is EpochSampler's, two ranks' shards partition it, `start_at` continues
  an epoch without repeating or skipping an image (and with the same pixels), validation shards count
  every image once, the pixels do not depend on the number of decoding threads;
- the augmentation: the crop and flip statistics of the FFCV decoder are timm's, and the batches' pixel
  statistics under the full recipe match the ImageFolder path's (RandAugment and erasing are applied);
- the evaluation: a fixed model scores the same top-1 (within 0.5 points) through both paths;
- the errors: a missing .beton, a wrong field layout, a missing ffcv install: one line, exit code 2;
- DDP and resume end to end: two processes, killed mid-epoch and restarted, end where one process does.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_script, skip_module_without_ffcv
from omegaconf import OmegaConf
from PIL import Image
from scipy.stats import ks_2samp
from test_train import load, read_jsonl, relative_difference
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import nn
from torchvision.datasets import ImageFolder

from convnext_train.configs import CONFIG_DIR

sys.path.insert(0, str(REPO / "data"))  # data/ is a folder of scripts, not a package
import photo_imagefolder  # noqa: E402

skip_module_without_ffcv()

from convnext_train.data.compiled import image_key  # noqa: E402
from convnext_train.data.loaders import EpochSampler  # noqa: E402
from convnext_train.data.sources import LoaderArgs, build_loaders, build_val_loader  # noqa: E402
from convnext_train.errors import UserError  # noqa: E402
from convnext_train.tasks.classification import evaluate  # noqa: E402

CPU = torch.device("cpu")


# FFCV compiles numba code as it is imported (about 10 s): imported by the tests that use it, not
# when pytest collects this module (which every parallel worker does, whichever runs the module).
def ffcv_loaders(*args, **kwargs):
    from convnext_train.data.ffcv import ffcv_loaders

    return ffcv_loaders(*args, **kwargs)


def random_crop(*args, **kwargs):
    from convnext_train.data.ffcv import random_crop

    return random_crop(*args, **kwargs)


def write_ffcv_main(argv: list[str]) -> int:
    """data/write_ffcv.py's main, in this process."""
    import write_ffcv

    return write_ffcv.main(argv)


MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def aug_config(name: str = "recipe", **overrides):
    return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "aug" / f"{name}.yaml"), overrides)


# Crop and flip only: no RandAugment, colour jitter or erasing, so the pixels show the geometry.
GEOMETRY_ONLY = dict(auto_augment=None, color_jitter=None, reprob=0.0, mixup=0.0, cutmix=0.0)


def ffcv_data(root: Path, **overrides):
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "data" / "ffcv.yaml"), {"root": str(root)}, overrides)
    return cfg


def imagefolder_data(root: Path, **overrides):
    base = OmegaConf.load(CONFIG_DIR / "data" / "imagenet.yaml")
    return OmegaConf.merge(base, {"root": str(root), "num_workers": 0, "pin_memory": False}, overrides)


def write(root: Path, out: Path, *options: str) -> None:
    assert write_ffcv_main([str(root), str(out), "--workers", "2", *options]) == 0


def epoch_batches(loaders, epoch: int, start: int = 0) -> list:
    loaders.start_at(epoch, start)
    return list(loaders.train.batches_with_indices())


def indices_of(batches) -> list[int]:
    return [i for batch in batches for i in batch[3].tolist()]


@contextlib.contextmanager
def torch_threads(n: int):
    """Tiny CPU ops run fastest on one thread (and do not stall behind a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Data: written once, before any FFCV loader starts its threads (the writer forks processes)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(module_tmp_path) -> Path:
    """ImageNet-like JPEG photos (about 400 x 350): 4 classes, 40 train and 100 validation images each."""
    root = photo_imagefolder.write_photo_imagefolder(
        module_tmp_path / "photos", classes=4, train_per_class=40, val_per_class=100, seed=1
    )
    write(root, root / "ffcv")
    return root


@pytest.fixture(scope="module")
def coordinates(module_tmp_path) -> Path:
    """32 copies of a 400 x 350 JPEG whose red channel is the x coordinate and green the y coordinate,
    so an output crop says where it came from, how large it was and whether it was flipped."""
    root = module_tmp_path / "coordinates"
    x = np.linspace(0, 255, COORD_W)[None, :].repeat(COORD_H, 0)
    y = np.linspace(0, 255, COORD_H)[:, None].repeat(COORD_W, 1)
    image = Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))
    for split, count in (("train", 32), ("val", 2)):
        folder = root / split / "only"
        folder.mkdir(parents=True)
        for i in range(count):
            image.save(folder / f"{i}.JPEG", quality=95)
    write(root, root / "ffcv")
    return root


@pytest.fixture
def small_tree(tmp_path) -> Path:
    """A few small real JPEGs whose class folders sort differently from how they were made."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(["zebra", "Apple", "mango"]):
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) // 2 + 60 * c
                Image.fromarray(pixels).save(folder / f"{name}_{i}.jpg", quality=90)
    return tmp_path / "tree"


@pytest.fixture(scope="module")
def all_data(photos, coordinates):
    """Every module-wide file is written before the first test, while no FFCV thread runs yet."""
    return photos, coordinates


@pytest.fixture(autouse=True, scope="module")
def _write_first(all_data):
    yield


# --------------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------------
def read_beton(path: Path) -> dict:
    """The .beton's columns, read with FFCV's Reader (no decoding)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    names = list(reader.handlers)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist(), strict=True))
    return {name: reader.metadata[f"f{i}"] for i, name in enumerate(names)} | {
        "num_samples": reader.num_samples,
        "fields": names,
        "sizes": sizes,
    }


def test_writer_stores_every_image_with_imagefolders_label_and_its_pixels(small_tree, tmp_path, capsys):
    out = tmp_path / "out"
    write(small_tree, out)
    summary = capsys.readouterr().out
    assert "train.beton: 12 images written, 0 skipped as unreadable, 3 classes" in summary
    assert "val.beton: 6 images written, 0 skipped" in summary
    reference = ImageFolder(str(small_tree / "train"))
    assert reference.classes == ["Apple", "mango", "zebra"]  # sorted, not in the order they were made
    columns = read_beton(out / "train.beton")
    assert columns["fields"] == ["image", "label", "index"] and columns["num_samples"] == 12
    assert columns["label"].tolist() == reference.targets
    assert columns["index"].tolist() == list(range(12))
    record = json.loads((out / "train.beton.json").read_text())
    assert record["classes"] == reference.classes and record["images"] == 12 and record["skipped"] == []
    assert record["settings"] == {
        "max_resolution": 500,
        "jpeg_quality": 90,
        "compress_probability": 0.5,
        "write_mode": "proportion",
    }
    # The pixels: raw-stored images byte for byte, JPEG-stored ones within JPEG's error.
    data = np.memmap(out / "train.beton", dtype=np.uint8, mode="r")
    image = columns["image"]
    assert set(image["mode"].tolist()) == {0, 1}  # both JPEG and raw with compress_probability 0.5
    for i, (path, _) in enumerate(reference.samples):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        h, w, start = int(image["height"][i]), int(image["width"][i]), int(image["data_ptr"][i])
        stored = data[start : start + columns["sizes"][start]]
        assert (h, w) == pixels.shape[:2]
        if image["mode"][i] == 1:
            assert np.array_equal(stored.reshape(h, w, 3), pixels)
        else:
            decoded = np.asarray(Image.open(io.BytesIO(stored.tobytes())).convert("RGB"))
            assert np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 8


def test_a_complete_file_is_left_alone_and_a_changed_source_or_setting_rewrites_it(small_tree, tmp_path, capsys):
    out = tmp_path / "out"
    write(small_tree, out)
    beton = out / "train.beton"

    def identity():
        return beton.stat().st_ino, beton.stat().st_mtime_ns

    first = identity()
    write(small_tree, out)
    assert "train.beton: up to date (12 images" in capsys.readouterr().out
    assert identity() == first

    write(small_tree, out, "--jpeg-quality", "80")  # other settings
    assert "12 images written" in capsys.readouterr().out
    second = identity()
    assert second != first and json.loads((out / "train.beton.json").read_text())["settings"]["jpeg_quality"] == 80

    touched = next((small_tree / "train" / "mango").iterdir())  # a source file changed
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    write(small_tree, out, "--jpeg-quality", "80")
    third = identity()
    assert third != second

    Image.new("RGB", (40, 30)).save(small_tree / "train" / "mango" / "new.jpg")  # a new file
    write(small_tree, out, "--jpeg-quality", "80")
    assert read_beton(beton)["num_samples"] == 13

    (out / "train.beton.json").unlink()  # killed between the rename and the record: not vouched for
    fourth = identity()
    write(small_tree, out, "--jpeg-quality", "80")
    assert identity() != fourth


def test_unreadable_images_are_named_or_skipped_and_counted(small_tree, tmp_path, capsys):
    broken = small_tree / "train" / "mango" / "mango_2.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # a cut-off download: headers, no image data
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        write_ffcv_main([str(small_tree), str(out), "--workers", "2"])
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: 1 unreadable image(s)") and str(broken) in message and "--skip-corrupt" in message
    assert not (out / "train.beton").exists() and not (out / "train.beton.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    write(small_tree, out, "--skip-corrupt")
    assert "train.beton: 11 images written, 1 skipped as unreadable" in capsys.readouterr().out
    columns = read_beton(out / "train.beton")
    reference = ImageFolder(str(small_tree / "train"))
    kept = [i for i, (path, _) in enumerate(reference.samples) if path != str(broken)]
    assert columns["index"].tolist() == kept  # each image keeps its ImageFolder identity and label
    assert columns["label"].tolist() == [reference.targets[i] for i in kept]
    assert json.loads((out / "train.beton.json").read_text())["skipped"] == [str(broken)]


@pytest.mark.slow  # a writer process killed mid-file: ~15 s
def test_an_interrupted_write_leaves_no_complete_looking_file(photos, tmp_path):
    out = tmp_path / "out"
    writer = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "data" / "write_ffcv.py"),
            str(photos),
            str(out),
            "--splits",
            "val",
            "--workers",
            "1",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its writer processes too: a lost machine stops them all
    )
    deadline = time.monotonic() + 120
    while not list(out.glob(".val.beton.*.tmp")):
        assert writer.poll() is None and time.monotonic() < deadline, "the writer ended before it could be killed"
        time.sleep(0.02)
    os.killpg(writer.pid, signal.SIGKILL)
    writer.wait()
    assert not (out / "val.beton").exists() and not (out / "val.beton.json").exists()
    with pytest.raises(UserError, match="val.beton not found"):
        build_val_loader(ffcv_data(out, num_classes=4), 0.875, LoaderArgs(seed=0, batch_size=8, device=CPU))

    write(photos, out, "--splits", "val")  # the rerun completes and clears the dead writer's file
    assert read_beton(out / "val.beton")["num_samples"] == 400
    assert sorted(p.name for p in out.iterdir()) == ["val.beton", "val.beton.json"]


# --------------------------------------------------------------------------------------------------
# Errors: one line, exit code 2
# --------------------------------------------------------------------------------------------------
def test_a_missing_or_foreign_beton_is_one_clear_line(photos, tmp_path):
    with pytest.raises(UserError, match=r"train.beton not found: .*python data/write_ffcv.py <imagefolder_root>"):
        ffcv_loaders(ffcv_data(tmp_path, num_classes=4), aug_config(), LoaderArgs(seed=0, batch_size=8, device=CPU))
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    DatasetWriter(str(foreign / "train.beton"), {"x": IntField()}, num_workers=1).from_indexed_dataset(
        [(i,) for i in range(4)]
    )
    with pytest.raises(UserError, match=r"has the fields \{'x': 'IntField'\}, not the layout data=ffcv reads"):
        ffcv_loaders(
            ffcv_data(foreign, num_classes=4, val_split=None),
            aug_config(),
            LoaderArgs(seed=0, batch_size=8, device=CPU),
        )
    (foreign / "train.beton").write_bytes(b"not a beton at all" * 100)
    with pytest.raises(UserError, match="is not a readable FFCV .beton file"):
        ffcv_loaders(
            ffcv_data(foreign, num_classes=4, val_split=None),
            aug_config(),
            LoaderArgs(seed=0, batch_size=8, device=CPU),
        )
    with pytest.raises(UserError, match=r"labels 0..3 but data.num_classes=3"):
        ffcv_loaders(
            ffcv_data(photos / "ffcv", num_classes=3), aug_config(), LoaderArgs(seed=0, batch_size=8, device=CPU)
        )
    with pytest.raises(UserError, match=r"train.beton was written from 4 class folders but data.num_classes=5"):
        ffcv_loaders(
            ffcv_data(photos / "ffcv", num_classes=5), aug_config(), LoaderArgs(seed=0, batch_size=8, device=CPU)
        )


# --------------------------------------------------------------------------------------------------
# The reader: order, shards, resume
# --------------------------------------------------------------------------------------------------
BATCH = 16


@pytest.fixture(scope="module")
def two_ranks(photos):
    """Rank 0 and rank 1 of two processes over the 160 training and 400 validation photos."""
    data = ffcv_data(photos / "ffcv", num_classes=4, img_size=32, num_workers=1)
    return [
        ffcv_loaders(data, aug_config(), LoaderArgs(seed=3, batch_size=BATCH, device=CPU, rank=r, world_size=2))
        for r in (0, 1)
    ]


@pytest.fixture(scope="module")
def one_rank(photos):
    data = ffcv_data(photos / "ffcv", num_classes=4, img_size=32, num_workers=1)
    return ffcv_loaders(data, aug_config(), LoaderArgs(seed=3, batch_size=BATCH, device=CPU))


@pytest.mark.slow
def test_each_epoch_is_epoch_samplers_order_and_two_ranks_partition_it(one_rank, two_ranks):
    assert one_rank.train_length == 160
    for epoch in (0, 1):
        batches = epoch_batches(one_rank, epoch)
        expected = EpochSampler(160, seed=3, shuffle=True, drop_last=True)
        expected.set_position(epoch)
        assert indices_of(batches) == expected.order()
        images, targets, replaced, _ = batches[0]
        assert images.shape == (BATCH, 3, 32, 32) and images.dtype == torch.float32
        assert targets.dtype == torch.int64 and replaced.dtype == torch.bool and not replaced.any()
        labels = read_beton(one_rank.train.path)["label"]
        assert [t for b in batches for t in b[1].tolist()] == labels[expected.order()].tolist()

    shards = [indices_of(epoch_batches(loaders, 1)) for loaders in two_ranks]
    assert all(len(shard) == 80 for shard in shards)
    for rank, shard in enumerate(shards):
        sampler = EpochSampler(160, seed=3, shuffle=True, drop_last=True, rank=rank, world_size=2)
        sampler.set_position(1)
        assert shard == sampler.order()
    global_order = EpochSampler(160, seed=3, shuffle=True, drop_last=True)
    global_order.set_position(1)
    interleaved = [i for pair in zip(*shards, strict=True) for i in pair]
    assert interleaved == global_order.order()  # rank r took positions r, r + 2, ...
    assert len(epoch_batches(one_rank, 0)) == len(one_rank.train) == 10


def test_start_at_continues_an_epoch_with_the_same_images_and_pixels(one_rank):
    full = epoch_batches(one_rank, 1)
    resumed = epoch_batches(one_rank, 1, start=6 * BATCH)  # a resume after 6 micro-batches
    assert indices_of(resumed) == indices_of(full)[6 * BATCH :]
    for (a, ta, _, _), (b, tb, _, _) in zip(full[6:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)  # crops, flips, RandAugment, erasing: all keyed
    assert not torch.equal(full[0][0], epoch_batches(one_rank, 2)[0][0])  # another epoch, other pixels


def test_validation_shards_count_every_image_once(photos, two_ranks, one_rank):
    whole = [i for batch in one_rank.val.batches_with_indices() for i in batch[3].tolist()]
    assert whole == list(range(400))
    data = ffcv_data(photos / "ffcv", num_classes=4, img_size=32, num_workers=1)
    odd = [
        ffcv_loaders(data, aug_config(), LoaderArgs(seed=0, batch_size=BATCH, device=CPU, rank=r, world_size=3))
        for r in (0, 1, 2)
    ]
    shards = [[i for batch in loaders.val.batches_with_indices() for i in batch[3].tolist()] for loaders in odd]
    assert [len(s) for s in shards] == [134, 133, 133]  # 400 over 3: uneven, no padding
    assert sorted(i for s in shards for i in s) == list(range(400))
    assert [len(loaders.val) for loaders in odd] == [9, 9, 9]  # the last batch of each is partial


def test_quasi_random_order_is_a_seeded_permutation_shared_out_like_the_random_one(photos):
    data = ffcv_data(photos / "ffcv", num_classes=4, img_size=32, num_workers=1, order="quasi_random", os_cache=False)
    aug = aug_config("none")  # the order is what is tested: the cheapest pixels
    ranks = [
        ffcv_loaders(data, aug, LoaderArgs(seed=5, batch_size=BATCH, device=CPU, rank=r, world_size=2)) for r in (0, 1)
    ]
    epoch0 = [indices_of(epoch_batches(loaders, 0)) for loaders in ranks]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(160))
    assert epoch0[0] == indices_of(epoch_batches(ranks[0], 0))  # the same (seed, epoch): the same order
    assert indices_of(epoch_batches(ranks[0], 1)) != epoch0[0]
    assert indices_of(epoch_batches(ranks[0], 0, start=32)) == epoch0[0][32:]


@pytest.mark.slow
def test_pixels_do_not_depend_on_the_number_of_decoding_threads(photos, one_rank):
    data = ffcv_data(photos / "ffcv", num_classes=4, img_size=32, num_workers=2)
    two_threads = ffcv_loaders(data, aug_config(), LoaderArgs(seed=3, batch_size=BATCH, device=CPU))
    for (a, ta, _, ia), (b, tb, _, ib) in zip(epoch_batches(one_rank, 4), epoch_batches(two_threads, 4), strict=True):
        assert np.array_equal(ia, ib) and torch.equal(ta, tb) and torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# The augmentation: the recipe's statistics
# --------------------------------------------------------------------------------------------------
COORD_W, COORD_H, COORD_OUT = 400, 350, 64


def test_the_decoders_crop_sampler_draws_timms_distribution():
    """Our counter-based random-resized crop against timm's own sampler, 20,000 draws each."""
    draws = 20000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = np.array(
        [
            random_crop(
                COORD_H,
                COORD_W,
                np.uint64(image_key(np.uint64(7), 0, i)),
                *scale,
                math.log(ratio[0]),
                math.log(ratio[1]),
                *ratio,
                0.5,
            )
            for i in range(draws)
        ],
        dtype=np.float64,
    )
    random.seed(0)
    timms = np.array(
        [
            RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (COORD_W, COORD_H)), scale, ratio)
            for _ in range(draws)
        ],
        dtype=np.float64,
    )

    def features(crops):  # area fraction, log aspect ratio, normalised top and left
        top, left, h, w = crops[:, 0], crops[:, 1], crops[:, 2], crops[:, 3]
        return [
            h * w / (COORD_W * COORD_H),
            np.log(w / h),
            top / np.maximum(COORD_H - h, 1),
            left / np.maximum(COORD_W - w, 1),
        ]

    for name, a, b in zip(["area", "log ratio", "top", "left"], features(ours), features(timms), strict=True):
        assert ks_2samp(a, b).pvalue > 1e-3, name
    assert abs(ours[:, 4].mean() - 0.5) < 0.015  # flip: 5 standard deviations of a binomial(20000, 0.5)


def crop_geometry(images: torch.Tensor) -> torch.Tensor:
    """(area fraction, log aspect ratio, flipped) of each crop of the coordinate image, read from the
    slopes of its red (x) and green (y) ramps."""
    pixels = (images * STD + MEAN) * 255
    u = torch.arange(COORD_OUT, dtype=torch.float64) - (COORD_OUT - 1) / 2

    def slope(profiles):
        centred = profiles - profiles.mean(1, keepdim=True)
        return (centred * u).sum(1) / (u**2).sum()

    slope_x, slope_y = slope(pixels[:, 0].mean(1).double()), slope(pixels[:, 1].mean(2).double())
    width = slope_x.abs() * COORD_OUT * (COORD_W - 1) / 255
    height = slope_y * COORD_OUT * (COORD_H - 1) / 255
    return torch.stack([width * height / (COORD_W * COORD_H), (width / height).log(), (slope_x < 0).double()], 1)


def test_crop_and_flip_statistics_match_the_imagefolder_path(coordinates):
    aug = aug_config(**GEOMETRY_ONLY)
    paths = {
        "ffcv": ffcv_loaders(
            ffcv_data(coordinates / "ffcv", num_classes=1, img_size=COORD_OUT, num_workers=1),
            aug,
            LoaderArgs(seed=0, batch_size=32, device=CPU),
        ),
        "imagefolder": build_loaders(
            imagefolder_data(coordinates, num_classes=1, img_size=COORD_OUT),
            aug,
            LoaderArgs(seed=0, batch_size=32, device=CPU),
        ),
    }
    geometry = {}
    for name, loaders in paths.items():
        batches = []
        for epoch in range(8):  # 256 crops
            loaders.start_at(epoch, 0)
            batches += [crop_geometry(images) for images, _, _ in loaders.train]
        geometry[name] = torch.cat(batches)
    ffcv, reference = geometry["ffcv"], geometry["imagefolder"]
    assert len(ffcv) == len(reference) == 256
    assert 0.3 < ffcv[:, 0].mean() < 0.6 and ffcv[:, 0].min() > 0.06  # scale (0.08, 1): a measured check
    for k, name in enumerate(["area", "log aspect ratio"]):
        assert ks_2samp(ffcv[:, k], reference[:, k]).pvalue > 1e-3, name
    for flips in (ffcv[:, 2], reference[:, 2]):
        assert abs(flips.mean() - 0.5) < 0.1  # 3.2 standard deviations of a binomial(256, 0.5)


@pytest.mark.slow
def test_the_decoders_rand_augment_is_the_standalone_one_bit_for_bit(photos, tmp_path):
    """RandAugment inside FFCV's compiled decoder gives each crop exactly what `rand_augment` (tested
    bit for bit against timm's PIL ops) gives it with the image's key, computed in a fresh process
    with its own numba cache. numba compiles what a function calls under that function's flags, and
    FFCV compiles its stages with fast-math: its fused multiply-adds moved pixels by a grey level (and,
    in the same process, the standalone kernels too), before the decoder was compiled without it."""
    data = ffcv_data(photos / "ffcv", num_classes=4, img_size=64, num_workers=2)
    recipe = aug_config(reprob=0.0, mixup=0.0, cutmix=0.0)
    with_rand_augment = ffcv_loaders(
        data, recipe, LoaderArgs(seed=5, batch_size=BATCH, device=CPU)
    ).train.batches_with_indices()
    crops_only = ffcv_loaders(
        data, aug_config(**GEOMETRY_ONLY), LoaderArgs(seed=5, batch_size=BATCH, device=CPU)
    ).train.batches_with_indices()
    augmented, plain, indices = [], [], []
    for (images, *_, index), (crops, *_, same_index), _ in zip(with_rand_augment, crops_only, range(6), strict=False):
        assert np.array_equal(index, same_index)
        augmented.append(uint8_pixels(images))
        plain.append(uint8_pixels(crops))
        indices.append(index)
    np.savez(tmp_path / "crops.npz", crops=np.concatenate(plain), indices=np.concatenate(indices))
    reference = """
import sys, numpy as np
from omegaconf import OmegaConf
from convnext_train.data.compiled import image_key
from convnext_train.data.rand_augment import rand_augment, rand_augment_policy
saved = np.load(sys.argv[1] + "/crops.npz")
arguments = rand_augment_policy(OmegaConf.load("convnext_train/conf/aug/recipe.yaml"), 64).arguments()
out = saved["crops"].copy()
for image, i in zip(out, saved["indices"].tolist()):
    rand_augment(image, np.uint64(image_key(np.uint64(5), 0, i)), *arguments)
np.save(sys.argv[1] + "/expected.npy", out)
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    subprocess.run([sys.executable, "-c", reference, str(tmp_path)], cwd=REPO, env=env, check=True)
    expected, got, crops = np.load(tmp_path / "expected.npy"), np.concatenate(augmented), np.concatenate(plain)
    assert len(got) == 6 * BATCH
    assert (expected != crops).any((1, 2, 3)).mean() > 0.5  # RandAugment changed most of them
    different = (got != expected).any((1, 2, 3))
    assert not different.any(), (
        f"{different.sum()} of {len(got)} images differ, by up to {np.abs(got.astype(int) - expected).max()}"
    )


def uint8_pixels(normalised: torch.Tensor) -> np.ndarray:
    """A normalised batch back to its (N, H, W, 3) uint8 pixels (exact: nothing was erased)."""
    return ((normalised * STD + MEAN) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pixel_statistics(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean (RandAugment's colour ops move it) and mean absolute horizontal gradient
    (random erasing's noise boxes and the geometric ops move it)."""
    gradient = (images[..., 1:] - images[..., :-1]).abs().mean((1, 2, 3))
    return torch.stack([images.mean((1, 2, 3)), gradient], 1)


def recipe_statistics(loaders, epochs: int) -> torch.Tensor:
    out = []
    for epoch in range(epochs):
        loaders.start_at(epoch, 0)
        out += [pixel_statistics(images) for images, _, _ in loaders.train]
    return torch.cat(out)


def test_batches_under_the_full_recipe_have_the_imagefolder_paths_statistics(photos):
    """RandAugment (in the decoder) and random erasing (BatchAugment) run on FFCV's batches: the batch
    statistics match the PIL path's over the same photos, and differ from batches without them."""
    recipe = aug_config(mixup=0.0, cutmix=0.0)  # Mixup/CutMix is the training step's, on both paths
    ffcv_cfg = ffcv_data(photos / "ffcv", num_classes=4, img_size=48, num_workers=1)
    with torch_threads(1):
        ffcv = recipe_statistics(
            ffcv_loaders(ffcv_cfg, recipe, LoaderArgs(seed=0, batch_size=32, device=CPU)), epochs=3
        )
        reference = recipe_statistics(
            build_loaders(
                imagefolder_data(photos, num_classes=4, img_size=48),
                recipe,
                LoaderArgs(seed=0, batch_size=32, device=CPU),
            ),
            epochs=3,
        )
        plain = recipe_statistics(
            ffcv_loaders(ffcv_cfg, aug_config(**GEOMETRY_ONLY), LoaderArgs(seed=0, batch_size=32, device=CPU)), epochs=3
        )
    assert len(ffcv) == len(reference) == 480
    for k, name in enumerate(["mean", "gradient"]):
        assert ks_2samp(ffcv[:, k], reference[:, k]).pvalue > 1e-3, name
    assert ks_2samp(ffcv[:, 1], plain[:, 1]).pvalue < 1e-6  # the test can tell augmented from not
    # The same crops with and without RandAugment and erasing (crops are keyed by image): they leave an image as
    # it is when no RandAugment layer fired (0.5 x 0.5) and no box was erased (0.75), about 1 in 5,
    # or when the ops drawn do nothing to it (AutoContrast on a full-range photo): 0.77 measured.
    changed = ((ffcv - plain).abs() > 1e-6).any(1).double().mean()
    assert 0.65 < changed < 0.85, float(changed)


# --------------------------------------------------------------------------------------------------
# Evaluation: the same model, the same images, the same top-1
# --------------------------------------------------------------------------------------------------
def test_a_fixed_model_scores_the_same_top1_on_both_paths(photos):
    size = 64
    reference_data = imagefolder_data(photos, num_classes=4, img_size=size)
    ffcv_cfg = ffcv_data(photos / "ffcv", num_classes=4, img_size=size, num_workers=1)
    with torch_threads(1):
        # A tiny model, fitted on the spot: a linear classifier of the image's 8 x 8 grid of mean
        # colours, so what it predicts depends on where the crop is as well as on the colours.
        train = build_val_loader(
            OmegaConf.merge(reference_data, {"val_split": "train"}),
            0.875,
            LoaderArgs(seed=0, batch_size=80, device=CPU),
        )
        images, targets = map(torch.cat, zip(*[(b[0], b[1]) for b in train], strict=True))
        model = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(192, 4))
        torch.manual_seed(0)
        features = model[:2](images)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model[2](features), targets).backward()
            optimizer.step()
        settings = dict(device=CPU, autocast=contextlib.nullcontext, memory_format=torch.contiguous_format)
        reference_loader = build_val_loader(reference_data, 0.875, LoaderArgs(seed=0, batch_size=50, device=CPU))
        ffcv_loader = build_val_loader(ffcv_cfg, 0.875, LoaderArgs(seed=0, batch_size=50, device=CPU))
        reference, ffcv = evaluate(model, reference_loader, **settings), evaluate(model, ffcv_loader, **settings)
        assert reference["images"] == ffcv["images"] == 400
        assert 30 < reference["top1"] < 95  # neither always right nor always wrong: the test can fail
        assert abs(ffcv["top1"] - reference["top1"]) <= 0.5
        # Image by image (both paths in file order): the same geometry, nearly the same pixels.
        a, b = torch.cat([batch[0] for batch in reference_loader]), torch.cat([batch[0] for batch in ffcv_loader])
        with torch.no_grad():
            agreement = (model(a).argmax(1) == model(b).argmax(1)).float().mean()
    assert agreement > 0.95
    assert (a - b).abs().mean() < 0.2  # in normalised units; a crop one tenth off-centre gives about 0.5


# --------------------------------------------------------------------------------------------------
# train.py on .beton files: killed and resumed, and under torchrun
# --------------------------------------------------------------------------------------------------
# ConvNeXt-atto at 32 px on the 160 training photos: 5 steps of 32 (2 micro-batches of 16) per epoch.
FFCV_RUN = [
    "data=ffcv",
    "model=convnext_atto",
    "model.drop_path_rate=0.1",
    "data.num_classes=4",
    "data.img_size=32",
    "trainer.epochs=2",
    "trainer.global_batch_size=32",
    "trainer.micro_batch_size=16",
    "trainer.precision=fp32",
    "trainer.log_every=1",
    "checkpoint.every_minutes=0.0001",
    "scheduler.warmup_epochs=1",
    "ema.decay=0.9",
]


def ffcv_run(photos: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*FFCV_RUN, f"data.root={photos / 'ffcv'}", f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_resume_and_train_like_one(photos, tmp_path):
    """torchrun with two processes on .beton files, killed mid-epoch (the whole job, as a lost node
    would be) and run again: it resumes, and ends where one uninterrupted process ends. aug=none and
    no drop path: nothing random per rank, so the global batches are the same images whatever the
    number of processes, and only float summation order may differ. (Bitwise resume with the full
    recipe is `test_start_at_continues_an_epoch_with_the_same_images_and_pixels` plus the trainer's
    own resume tests.)"""
    exact = ["aug=none", "model.drop_path_rate=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
    ]

    one_dir = tmp_path / "one"
    result = run_script(
        "train.py", *ffcv_run(photos, one_dir, *exact, "data.num_workers=1"), env={"OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]

    two_dir = tmp_path / "two"
    args = ffcv_run(photos, two_dir, *exact, "data.num_workers=2")  # two decoding threads: the same pixels
    job = subprocess.Popen(
        [*torchrun, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (two_dir / "checkpoints" / "step_000000007.pt").exists():  # mid-epoch 2
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    result = subprocess.run([*torchrun, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "(2 process(es))" in result.stdout and "resumed from" in result.stdout

    one, two = load(one_dir / "checkpoints" / "last.pt"), load(two_dir / "checkpoints" / "last.pt")
    assert one["step"] == two["step"] == 10
    assert relative_difference(one["model"], two["model"]) < 1e-5
    assert relative_difference(one["model_ema"], two["model_ema"]) < 1e-5
    assert [r["step"] for r in read_jsonl(two_dir / "metrics.jsonl") if "loss" in r] == list(range(1, 11))
    evaluations = [[r for r in read_jsonl(d / "metrics.jsonl") if "top1" in r] for d in (one_dir, two_dir)]
    assert len(evaluations[1]) == 2
    for single, sharded in zip(*evaluations, strict=True):
        assert sharded["val_images"] == single["val_images"] == 400  # 200 + 200: none twice, none dropped
        assert sharded["top1"] == pytest.approx(single["top1"])

    # eval.py on the same .beton scores the final checkpoint as training's last evaluation did.
    result = run_script(
        "eval.py", "model=convnext_atto", f"checkpoint={two_dir / 'checkpoints' / 'last.pt'}", "data=ffcv", f"data.root={photos / 'ffcv'}",
        "data.num_classes=4", "data.img_size=32", "data.num_workers=1", f"hydra.run.dir={tmp_path / 'eval'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scored["images"] == 400 and scored["top1"] == pytest.approx(evaluations[1][-1]["top1"], abs=0.5)
