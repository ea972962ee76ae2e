"""The input pipeline: transforms against the official protocol, augmentation statistics, Mixup
targets, the loss choice, ImageFolder errors and skip_corrupt, and the digits demo tree.

Images are real photographs: the JPEGs bundled with scikit-learn, read from disk.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from sklearn.datasets import load_digits
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import functional as TF

from convnext_train.configs import CONFIG_DIR
from convnext_train.data.digits import COMPLETE_MARKER, write_digits_imagefolder
from convnext_train.data.imagefolder import (
    ImageFolderDataset,
    UnreadableImageError,
    load_image,
    train_and_val_datasets,
)
from convnext_train.data.transforms import (
    eval_transform,
    mixup_fn,
    posterize_zero_bits_black,
    train_loss,
    train_transform,
)
from convnext_train.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PHOTO_DIR = Path(sklearn.datasets.__file__).parent / "images"
CHINA_JPEG = PHOTO_DIR / "china.jpg"  # 640 x 427, a temple: no mirror symmetry
FLOWER_JPEG = PHOTO_DIR / "flower.jpg"

RECIPE_RAND_AUGMENT_OPS = [  # timm's increasing-severity set, selected by `inc1`
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
]  # fmt: skip


def aug_config(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "aug" / f"{name}.yaml"), overrides)


def seed_everything(seed: int) -> None:
    """timm's crop/erasing/RandAugment draw from `random` and numpy, torchvision's flip from torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def normalized(image: Image.Image) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(image), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return load_image(CHINA_JPEG)


@pytest.fixture(scope="module")
def square_photo(photo) -> Image.Image:
    """Small and square, so RandomResizedCrop with scale = ratio = 1 takes the whole image."""
    return photo.crop((100, 0, 527, 427)).resize((48, 48), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------------
# Eval transform
# --------------------------------------------------------------------------------------------------
def test_eval_transform_below_384_resizes_shorter_side_to_size_over_crop_pct_then_centre_crops(photo):
    out = eval_transform(224, crop_pct=0.875)(photo)

    width, height = photo.size  # 640 x 427: the shorter side (height) becomes int(224 / 0.875) = 256
    resized = photo.resize((int(256 * width / height), 256), Image.Resampling.BICUBIC)
    left, top = round((resized.width - 224) / 2), round((resized.height - 224) / 2)
    expected = normalized(resized.crop((left, top, left + 224, top + 224)))
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_eval_transform_at_384_squashes_the_whole_image_without_cropping(photo):
    out = eval_transform(384, crop_pct=0.875)(photo)

    expected = normalized(photo.resize((384, 384), Image.Resampling.BICUBIC))
    assert out.shape == (3, 384, 384)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    shorter_side_384 = photo.resize((int(384 * 640 / 427), 384), Image.Resampling.BICUBIC)
    cropped = normalized(shorter_side_384.crop((96, 0, 480, 384)))
    assert (out - cropped).abs().mean() > 0.1  # keeping the full width is not the same as cropping


# --------------------------------------------------------------------------------------------------
# Train transform
# --------------------------------------------------------------------------------------------------
def test_recipe_train_transform_is_the_papers_pipeline():
    steps = train_transform(aug_config("recipe"), img_size=64).transforms
    # Six steps: no ColorJitter, which RandAugment replaces (in timm and in the paper).
    crop, flip, rand_augment, _to_tensor, normalize, erasing = steps
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert crop.size == (64, 64) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(rand_augment, RandAugment) and rand_augment.num_layers == 2
    assert [op.name for op in rand_augment.ops] == RECIPE_RAND_AUGMENT_OPS
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in rand_augment.ops} == {(9, 0.5, 0.5)}
    assert {op.kwargs["resample"] for op in rand_augment.ops} == {Image.Resampling.BICUBIC}
    (posterize,) = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    assert posterize.aug_fn is posterize_zero_bits_black
    assert isinstance(normalize, transforms.Normalize)
    assert normalize.mean.tolist() == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert normalize.std.tolist() == pytest.approx(IMAGENET_DEFAULT_STD)
    assert isinstance(erasing, RandomErasing)
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)


def test_recipe_train_transform_gives_a_different_normalized_crop_each_call(photo):
    transform = train_transform(aug_config("recipe"), img_size=64)
    seed_everything(0)
    outputs = [transform(photo) for _ in range(8)]
    assert all(out.shape == (3, 64, 64) and out.dtype == torch.float32 for out in outputs)
    assert all(not torch.equal(outputs[0], out) for out in outputs[1:])


def test_recipe_erases_a_quarter_of_the_images(square_photo):
    # Crop, flip and colour changes switched off so that any change is the erasing.
    isolated = dict(auto_augment=None, color_jitter=None, hflip=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0])
    unerased = train_transform(aug_config("recipe", **isolated, reprob=0.0), img_size=48)(square_photo)
    transform = train_transform(aug_config("recipe", **isolated), img_size=48)
    seed_everything(0)
    trials = 800
    erased = sum(not torch.equal(transform(square_photo), unerased) for _ in range(trials))
    assert abs(erased / trials - 0.25) < 0.05  # 3.3 standard deviations of a binomial(800, 0.25)


def test_recipe_flips_half_of_the_images(square_photo):
    isolated = dict(auto_augment=None, color_jitter=None, reprob=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0])
    unflipped = train_transform(aug_config("recipe", **isolated, hflip=0.0), img_size=48)(square_photo)
    mirrored = unflipped.flip(-1)
    assert (unflipped - mirrored).abs().mean() > 0.1  # the photo is not mirror-symmetric
    transform = train_transform(aug_config("recipe", **isolated), img_size=48)
    seed_everything(0)
    trials = 800
    outputs = [transform(square_photo) for _ in range(trials)]
    assert all(torch.equal(out, unflipped) or torch.equal(out, mirrored) for out in outputs)
    flipped = sum(torch.equal(out, mirrored) for out in outputs)
    assert abs(flipped / trials - 0.5) < 0.06  # 3.4 standard deviations of a binomial(800, 0.5)


def test_aug_none_train_transform_is_the_deterministic_eval_transform(photo):
    transform = train_transform(aug_config("none"), img_size=64)
    reference = eval_transform(64, crop_pct=0.875)(photo)
    for seed in range(3):
        seed_everything(seed)
        assert torch.equal(transform(photo), reference)


# --------------------------------------------------------------------------------------------------
# The posterize trap (Pillow >= 12 rejects the 0 bits RandAugment asks for at magnitude 10)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_with_zero_bits_gives_a_black_image_of_the_same_size_and_mode(photo, mode):
    image = photo.convert(mode)
    black = posterize_zero_bits_black(image, 0)
    assert (black.size, black.mode) == (image.size, image.mode)
    assert not np.asarray(black).any()
    assert np.asarray(image).any()


def test_posterize_keeps_pillows_result_for_1_to_8_bits(photo):
    for bits in range(1, 8):
        ours, pillows = posterize_zero_bits_black(photo, bits), ImageOps.posterize(photo, bits)
        assert np.array_equal(np.asarray(ours), np.asarray(pillows))
    assert posterize_zero_bits_black(photo, 8) is photo


def test_recipe_posterize_op_blackens_as_often_as_the_magnitude_reaches_10(photo):
    rand_augment = train_transform(aug_config("recipe"), img_size=64).transforms[2]
    (posterize,) = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    small = photo.resize((16, 11))
    seed_everything(0)
    trials = 8000
    black = sum(not np.asarray(posterize(small)).any() for _ in range(trials))
    # applied with p 0.5, magnitude ~ N(9, 0.5) reaches the clip at 10 with P(z >= 2) = 0.02275
    expected = trials * 0.5 * 0.02275
    assert abs(black - expected) < 4 * expected**0.5


def test_recipe_rand_augment_runs_through_the_zero_bit_draws(photo):
    rand_augment = train_transform(aug_config("recipe"), img_size=64).transforms[2]
    small = photo.resize((64, 43))
    all_black = []
    for seed in range(3000):  # unrepaired, timm + Pillow 13 raise ValueError at 6 of these seeds
        seed_everything(seed)
        if not np.asarray(rand_augment(small)).any():
            all_black.append(seed)
    assert all_black  # posterize to 0 bits happened (as the last op) and gave black, not an error


# --------------------------------------------------------------------------------------------------
# Mixup / CutMix and the loss
# --------------------------------------------------------------------------------------------------
def test_no_mixup_without_alphas():
    assert mixup_fn(aug_config("none"), num_classes=10) is None


def test_mixup_takes_every_value_from_the_config():
    mix = mixup_fn(aug_config("recipe"), num_classes=10)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.cutmix_minmax) == (0.8, 1.0, None)
    assert (mix.mix_prob, mix.switch_prob, mix.mode) == (1.0, 0.5, "batch")
    assert (mix.label_smoothing, mix.num_classes) == (0.1, 10)
    changed = aug_config(
        "recipe", mixup=0.3, cutmix=0.0, mixup_prob=0.7, mixup_switch_prob=0.2, mixup_mode="elem", label_smoothing=0.2
    )
    mix = mixup_fn(changed, num_classes=5)
    assert (mix.mixup_alpha, mix.cutmix_alpha) == (0.3, 0.0)
    assert (mix.mix_prob, mix.switch_prob, mix.mode) == (0.7, 0.2, "elem")
    assert (mix.label_smoothing, mix.num_classes) == (0.2, 5)


@pytest.mark.parametrize("smoothing", [0.1, 0.0])
def test_recipe_mixup_soft_targets_match_the_mixed_pixels(smoothing):
    num_classes, batch = 10, 8
    mix = mixup_fn(aug_config("recipe", label_smoothing=smoothing), num_classes=num_classes)
    off = smoothing / num_classes  # label smoothing spread over the classes
    on = 1 - smoothing + off
    labels = torch.arange(batch)
    partners = labels.flip(0)  # batch mode mixes each image with the reversed batch
    values = (labels + 1).float()  # image i is the constant i + 1
    seed_everything(0)
    trials, cutmix_batches = 200, 0
    for _ in range(trials):
        images = values.view(batch, 1, 1, 1).expand(batch, 3, 16, 16).clone()
        mixed, targets = mix(images, labels.clone())

        assert targets.shape == (batch, num_classes)
        torch.testing.assert_close(targets.sum(1), torch.ones(batch))
        assert targets.min().item() == pytest.approx(off)  # the smoothing floor, on unmixed classes
        lam = (targets[labels, labels] - off) / (on - off)
        torch.testing.assert_close(lam, lam[:1].expand(batch))  # one lambda per batch
        torch.testing.assert_close(targets[labels, partners], (1 - lam) * on + lam * off)

        own = mixed == values.view(batch, 1, 1, 1)
        is_cutmix = bool(own.any() and (own | (mixed == values.flip(0).view(batch, 1, 1, 1))).all())
        if is_cutmix:  # a box from the partner: lambda is the share of own pixels
            cutmix_batches += 1
            torch.testing.assert_close(own.float().mean((1, 2, 3)), lam)
        else:  # a blend of the two images with weight lambda
            torch.testing.assert_close(mixed[:, 0, 0, 0], lam * values + (1 - lam) * values.flip(0))
    assert abs(cutmix_batches / trials - 0.5) < 0.12  # switch_prob 0.5; 3.4 std of binomial(200, 0.5)


def test_loss_follows_the_official_choice():
    assert isinstance(train_loss(aug_config("recipe")), SoftTargetCrossEntropy)
    assert isinstance(train_loss(aug_config("recipe", mixup=0.0)), SoftTargetCrossEntropy)  # CutMix alone
    smoothing = train_loss(aug_config("recipe", mixup=0.0, cutmix=0.0))
    assert isinstance(smoothing, LabelSmoothingCrossEntropy) and smoothing.smoothing == 0.1
    plain = train_loss(aug_config("none"))
    assert type(plain) is torch.nn.CrossEntropyLoss and plain.label_smoothing == 0.0


# --------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------
def write_jpeg(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)
    return path


def photo_tiles(count: int) -> list[Image.Image]:
    """Distinct real-photo tiles, 40 x 30."""
    china, flower = load_image(CHINA_JPEG), load_image(FLOWER_JPEG)
    return [(china, flower)[i % 2].crop((40 * i, 30 * i, 40 * i + 40, 30 * i + 30)) for i in range(count)]


@pytest.fixture
def imagenet_like(tmp_path) -> Path:
    """<root>/{train,val}/{n01,n02}/*.JPEG: 3 train and 1 val image per class."""
    tiles = iter(photo_tiles(8))
    for synset in ("n01", "n02"):
        for i in range(3):
            write_jpeg(tmp_path / "train" / synset / f"{synset}_{i}.JPEG", next(tiles))
        write_jpeg(tmp_path / "val" / synset / f"val_{synset}.JPEG", next(tiles))
    return tmp_path


def write_truncated_jpeg(path: Path) -> Path:
    data = write_jpeg(path, photo_tiles(1)[0]).read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header parses; decoding runs out of data
    return path


def assert_layout_help(message: str) -> None:
    assert "<root>/train/<class>/*.JPEG" in message and "<root>/val/<class>/*.JPEG" in message
    assert "python data/prepare_imagenet.py layout-val" in message


def test_dataset_lists_classes_and_samples_in_sorted_order(imagenet_like):
    train, val = train_and_val_datasets(imagenet_like, "train", "val", None, None, num_classes=2)
    assert train.classes == val.classes == ["n01", "n02"]
    assert [(Path(path).name, target) for path, target in train.samples] == [
        ("n01_0.JPEG", 0), ("n01_1.JPEG", 0), ("n01_2.JPEG", 0),
        ("n02_0.JPEG", 1), ("n02_1.JPEG", 1), ("n02_2.JPEG", 1),
    ]  # fmt: skip
    sample = train[4]
    assert sample.target == 1 and sample.replaced is False
    assert np.array_equal(np.asarray(sample.image), np.asarray(load_image(train.samples[4][0])))


def test_load_image_returns_rgb_for_greyscale_files(tmp_path):
    path = write_jpeg(tmp_path / "grey.JPEG", photo_tiles(1)[0].convert("L"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_missing_root_says_what_to_lay_out(tmp_path):
    with pytest.raises(UserError, match="does not exist") as error:
        ImageFolderDataset(tmp_path / "imagenet", "train")
    assert str(tmp_path / "imagenet") in str(error.value)
    assert_layout_help(str(error.value))


def test_missing_split_names_it(imagenet_like):
    with pytest.raises(UserError, match="split 'validation' not found") as error:
        ImageFolderDataset(imagenet_like, "validation")
    assert_layout_help(str(error.value))


def test_split_without_class_folders_is_refused(imagenet_like):
    (imagenet_like / "flat").mkdir()
    write_jpeg(imagenet_like / "flat" / "ILSVRC2012_val_00000001.JPEG", photo_tiles(1)[0])
    with pytest.raises(UserError, match="split 'flat' .* has no usable images") as error:
        ImageFolderDataset(imagenet_like, "flat")
    assert_layout_help(str(error.value))


def test_class_folder_without_images_is_refused(imagenet_like):
    (imagenet_like / "train" / "n03").mkdir()
    with pytest.raises(UserError, match="n03") as error:
        ImageFolderDataset(imagenet_like, "train")
    assert_layout_help(str(error.value))


def test_train_and_val_class_mismatch_names_the_difference(imagenet_like):
    (imagenet_like / "val" / "n02").rename(imagenet_like / "val" / "n03")
    with pytest.raises(UserError, match="only in train: n02; only in val: n03"):
        train_and_val_datasets(imagenet_like, "train", "val", None, None)


def test_class_count_must_match_num_classes(imagenet_like):
    with pytest.raises(UserError, match="2 class folders but data.num_classes=1000"):
        train_and_val_datasets(imagenet_like, "train", "val", None, None, num_classes=1000)


@pytest.mark.parametrize("breakage", ["truncated", "not an image"])
def test_unreadable_image_names_the_file_and_the_way_out(imagenet_like, breakage):
    path = imagenet_like / "train" / "n01" / "n01_1.JPEG"
    if breakage == "truncated":
        write_truncated_jpeg(path)
    else:
        path.write_bytes(b"<html>404 Not Found</html>")
    dataset = ImageFolderDataset(imagenet_like, "train")
    assert dataset[0].replaced is False
    with pytest.raises(UnreadableImageError) as error:
        dataset[1]
    assert isinstance(error.value, UserError)
    assert str(path) in str(error.value) and "data.skip_corrupt=true" in str(error.value)


def test_unreadable_image_stops_a_worker_loader_with_a_user_error(imagenet_like):
    path = write_truncated_jpeg(imagenet_like / "train" / "n02" / "n02_0.JPEG")
    dataset = ImageFolderDataset(imagenet_like, "train", transforms.ToTensor())
    try:
        list(DataLoader(dataset, batch_size=2, num_workers=2))
    except UserError as error:
        message = str(error)
        # The traceback holds the loader in a reference cycle; freed by a later garbage collection
        # instead of now, the loader's shutdown waits 5 s per worker.
        error.__traceback__ = None
    else:
        pytest.fail("the unreadable image did not stop the loader")
    assert str(path) in message and "data.skip_corrupt=true" in message


def test_skip_corrupt_serves_the_next_readable_image_and_flags_it(imagenet_like):
    train = imagenet_like / "train"
    write_truncated_jpeg(train / "n01" / "n01_1.JPEG")
    (train / "n01" / "n01_2.JPEG").write_bytes(b"not a jpeg")
    write_truncated_jpeg(train / "n02" / "n02_2.JPEG")  # the last index: wraps around to index 0
    dataset = ImageFolderDataset(imagenet_like, "train", skip_corrupt=True)

    with pytest.warns(UserWarning) as warned:
        sample = dataset[1]
    assert ["n01_1.JPEG" in str(w.message) for w in warned] == [True, False]
    assert ["n01_2.JPEG" in str(w.message) for w in warned] == [False, True]
    assert sample.replaced and sample.target == 1  # indices 1 and 2 unreadable: index 3 is n02_0
    assert np.array_equal(np.asarray(sample.image), np.asarray(load_image(train / "n02" / "n02_0.JPEG")))
    with pytest.warns(UserWarning, match="n02_2.JPEG"):
        sample = dataset[5]
    assert sample.replaced and sample.target == 0
    assert np.array_equal(np.asarray(sample.image), np.asarray(load_image(train / "n01" / "n01_0.JPEG")))
    assert dataset[4].replaced is False


@pytest.mark.filterwarnings("ignore:data.skip_corrupt")  # raised in the workers, which inherit the filters
def test_skip_corrupt_count_crosses_worker_processes_in_the_batches(imagenet_like):
    for name in ("n01/n01_1.JPEG", "n02/n02_0.JPEG", "n02/n02_2.JPEG"):
        write_truncated_jpeg(imagenet_like / "train" / name)
    dataset = ImageFolderDataset(imagenet_like, "train", transforms.ToTensor(), skip_corrupt=True)
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert all(batch.replaced.dtype == torch.bool for batch in batches)
    assert sum(int(batch.replaced.sum()) for batch in batches) == 3
    assert torch.cat([batch.target for batch in batches]).tolist() == [0, 0, 0, 1, 1, 0]


def test_skip_corrupt_with_nothing_readable_is_refused(imagenet_like):
    for path in (imagenet_like / "val").rglob("*.JPEG"):
        write_truncated_jpeg(path)
    dataset = ImageFolderDataset(imagenet_like, "val", skip_corrupt=True)
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no image in .* can be read"):
        dataset[0]


# --------------------------------------------------------------------------------------------------
# Digits demo dataset
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def digits_root(module_tmp_path) -> Path:
    return write_digits_imagefolder(module_tmp_path / "digits")


def files_per_class(split_dir: Path) -> dict[int, int]:
    return {int(class_dir.name): len(list(class_dir.glob("*.png"))) for class_dir in split_dir.iterdir()}


def test_digits_tree_holds_all_1797_images_in_a_stratified_split(digits_root, digits):
    per_class = Counter(digits.target.tolist())
    train, val = files_per_class(digits_root / "train"), files_per_class(digits_root / "val")
    assert sum(train.values()) + sum(val.values()) == 1797
    assert sum(val.values()) == 360  # ceil(0.2 * 1797)
    assert sorted(train) == sorted(val) == list(range(10))
    for digit, count in per_class.items():
        assert train[digit] + val[digit] == count
        assert abs(val[digit] - 0.2 * count) <= 1  # every digit keeps its share of the held-out set
    train_indices = {int(p.stem) for p in (digits_root / "train").rglob("*.png")}
    val_indices = {int(p.stem) for p in (digits_root / "val").rglob("*.png")}
    assert train_indices.isdisjoint(val_indices) and train_indices | val_indices == set(range(1797))


def test_digits_images_are_the_original_digits_upscaled_with_their_labels(digits_root, digits):
    for path in sorted((digits_root / "val").rglob("*.png"))[:50]:
        index = int(path.stem)
        image = Image.open(path)
        assert image.size == (32, 32) and image.mode == "L" and int(path.parent.name) == digits.target[index]
        original = Image.fromarray(np.rint(digits.images[index] * 255 / 16).astype(np.uint8))
        assert np.array_equal(np.asarray(image), np.asarray(original.resize((32, 32), Image.Resampling.BICUBIC)))
        # Shrunk back to 8x8, it is still the scanned digit (bicubic keeps the strokes where they were).
        back = np.asarray(image.resize((8, 8), Image.Resampling.BOX), dtype=float).ravel()
        assert np.corrcoef(back, np.asarray(original, dtype=float).ravel())[0, 1] > 0.95


def test_digits_tree_reads_as_an_imagefolder(digits_root):
    train, val = train_and_val_datasets(digits_root, "train", "val", None, None, num_classes=10)
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == [str(d) for d in range(10)]


def test_digits_writer_does_nothing_the_second_time(digits_root):
    stamps = {p: p.stat().st_mtime_ns for p in digits_root.rglob("*")}
    assert write_digits_imagefolder(digits_root) == digits_root
    assert {p: p.stat().st_mtime_ns for p in digits_root.rglob("*")} == stamps


def test_digits_writer_rewrites_an_interrupted_tree_and_a_tree_with_other_parameters(tmp_path):
    root = tmp_path / "digits"
    staging = tmp_path / ".digits.partial"  # what an interrupted call leaves behind
    write_jpeg(staging / "train" / "3" / "0001.png", photo_tiles(1)[0])
    write_digits_imagefolder(root, img_size=8)
    assert not staging.exists()
    assert len(list(root.rglob("*.png"))) == 1797 and (root / COMPLETE_MARKER).is_file()

    write_digits_imagefolder(root, img_size=16)
    assert {Image.open(p).size for p in root.rglob("*.png")} == {(16, 16)}
    assert json.loads((root / COMPLETE_MARKER).read_text())["parameters"]["img_size"] == 16


def test_digits_writer_refuses_a_directory_it_did_not_write(tmp_path):
    keep = write_jpeg(tmp_path / "photos" / "holiday.JPEG", photo_tiles(1)[0])
    with pytest.raises(UserError, match="not empty and was not written by write_digits_imagefolder"):
        write_digits_imagefolder(tmp_path / "photos")
    assert keep.is_file() and len(list((tmp_path / "photos").iterdir())) == 1
