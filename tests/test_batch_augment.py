"""BatchAugment, the FFCV path's on-device augmentation, against timm's PIL path: each RandAugment op
against timm's PIL op, the per-image draws against timm's policy, the augmented distribution against
timm's `rand_augment_transform`, random erasing against timm's RandomErasing, plus reproducibility,
the aug=none identity and the config errors.

Images are real photographs: the JPEGs bundled with scikit-learn, read from disk.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy import stats
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, LEVEL_TO_ARG, NAME_TO_OP, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import functional as TF

import convnext_train.data.transforms  # noqa: F401  (installs the repo's zero-bit posterize repair in timm's op table)
from convnext_train.data import batch_augment
from convnext_train.data.batch_augment import OPS, BatchAugment, normalize, op_argument
from convnext_train.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PHOTO_DIR = Path(sklearn.datasets.__file__).parent / "images"
# What timm's create_transform gives RandAugment: the ImageNet mean as fill, bicubic resampling.
FILL = tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)
PIL_KWARGS = {"fillcolor": FILL, "resample": Image.Resampling.BICUBIC}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


def aug_config(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(REPO / "conf" / "aug" / f"{name}.yaml"), overrides)


def recipe_hparams(img_size: int) -> dict:
    return BatchAugment(aug_config("recipe"), img_size).rand_augment.hparams


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.open(PHOTO_DIR / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]


def crops(photos, count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """`count` different size x size views: random squares of 1-2.5x the size, resized down."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(size * rng.uniform(1, 2.5))
        left, top = rng.integers(0, photo.width - side), rng.integers(0, photo.height - side)
        out.append(photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))
    return out


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def pixels(normalized: torch.Tensor) -> torch.Tensor:
    """Back from BatchAugment's output to uint8 pixel values (exact without erasing)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return ((normalized * std + mean) * 255).round().to(torch.uint8)


@contextmanager
def global_rngs_kept():
    """timm's PIL code draws from the global `random`, numpy and torch RNGs: seed them inside only."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def timm_argument(name: str, arg: torch.Tensor | None) -> tuple:
    """Our argument tensor as the Python value timm's LEVEL_TO_ARG hands its PIL op (ints for bits/thresholds)."""
    if arg is None:
        return ()
    value = arg.item()
    return (int(value),) if name.startswith(("Posterize", "Solarize")) else (value,)


# --------------------------------------------------------------------------------------------------
# Each op against timm's PIL op
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def op_photos(photos) -> list[Image.Image]:
    """A 224 x 224 view and an odd-sized one (edges, non-square)."""
    return [crops(photos, 1, 224, seed=1)[0], photos[1].crop((300, 120, 431, 217))]


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_timms_pil_op(name, op_photos):
    """Colour and point ops: bit-exact. Geometric ops: PIL's own bicubic filter and fill, so only
    float32-vs-double rounding differs: at most 1 level, on well under 1% of values. A skipped or
    sign-flipped op is off by tens of levels, a wrong fill by 4 to 24 (128 grey vs the mean)."""
    hparams = recipe_hparams(224)
    changed = cases = 0
    for image in op_photos:
        batch = to_batch([image])
        for magnitude in (0.0, 2.5, 5.0, 7.3, 9.0, 10.0):
            for sign in (1.0, -1.0):
                arg = op_argument(
                    name, torch.tensor([magnitude], dtype=torch.float64), torch.tensor([sign], dtype=torch.float64), hparams
                )
                expected = to_batch([NAME_TO_OP[name](image, *timm_argument(name, arg), **PIL_KWARGS)])
                got = OPS[name][1](batch.clone(), None if arg is None else arg.view(-1, 1, 1, 1), FILL)
                if name in GEOMETRIC:
                    diff = (got.int() - expected.int()).abs()
                    assert diff.max() <= 1, (image.size, magnitude, sign)
                    assert diff.float().mean() < 0.005, (image.size, magnitude, sign)
                else:
                    assert torch.equal(got, expected), (image.size, magnitude, sign)
                changed += not torch.equal(expected, batch)
                cases += 1
    assert changed >= cases // 2  # the comparisons are about images the op really changes


@pytest.mark.parametrize("name", sorted(n for n in OPS if OPS[n][0] is not None))
def test_argument_is_timms_level_to_arg_for_either_sign(name):
    """timm flips the sign of some arguments with the global `random`; over 24 calls each magnitude
    shows both values, which must be ours for sign +1 and -1."""
    hparams = recipe_hparams(224)
    for magnitude in (0.0, 0.37, 1.0, 2.5, 4.99, 5.0, 7.3, 8.88, 9.0, 9.51, 10.0):
        with global_rngs_kept():
            random.seed(0)
            theirs = {LEVEL_TO_ARG[name](magnitude, hparams)[0] for _ in range(24)}
        ours = {
            op_argument(
                name, torch.tensor([magnitude], dtype=torch.float64), torch.tensor([sign], dtype=torch.float64), hparams
            ).item()
            for sign in (1.0, -1.0)
        }
        assert theirs == ours, magnitude


def test_zero_bit_posterize_gives_black_as_the_repaired_timm_op_does(op_photos):
    """Magnitude 10 asks PosterizeIncreasing for 0 bits; the repo's timm repair gives black (Pillow 13 raises)."""
    image = op_photos[0]
    arg = op_argument("PosterizeIncreasing", torch.tensor([10.0], dtype=torch.float64), torch.ones(1, dtype=torch.float64), {})
    assert arg.item() == 0
    out = OPS["PosterizeIncreasing"][1](to_batch([image]), arg.view(-1, 1, 1, 1), FILL)
    assert not out.any()
    assert not np.asarray(NAME_TO_OP["PosterizeIncreasing"](image, 0)).any()


# --------------------------------------------------------------------------------------------------
# The policy: draws, unchanged fraction, independence, distribution
# --------------------------------------------------------------------------------------------------
def test_draws_follow_timms_rand_m9_mstd05_inc1_policy():
    """Ops uniform with replacement from timm's increasing set, each applied with p = 0.5, magnitude
    N(9, 0.5) clipped to [0, 10], a fair sign, independently per image and layer."""
    policy = BatchAugment(aug_config("recipe"), 224).rand_augment
    assert [op.name for op in policy.ops] == _RAND_INCREASING_TRANSFORMS
    assert policy.num_layers == 2
    layers = policy.draw(30_000, torch.Generator().manual_seed(0))
    for layer in layers:
        assert stats.chisquare(torch.bincount(layer.op, minlength=15).numpy()).pvalue > 1e-3
        assert abs(layer.applied.double().mean().item() - 0.5) < 0.01
        assert abs((layer.sign < 0).double().mean().item() - 0.5) < 0.01
        magnitude = layer.magnitude.numpy()
        assert magnitude.min() >= 0 and magnitude.max() == 10.0
        assert abs((magnitude == 10).mean() - stats.norm.sf(2)) < 0.004  # N(9, 0.5) beyond 10 is clipped
        below = stats.truncnorm(-np.inf, 2.0, loc=9.0, scale=0.5)
        assert stats.kstest(magnitude[magnitude < 10], below.cdf).pvalue > 1e-3
    first, second = layers
    assert abs((first.op == second.op).double().mean().item() - 1 / 15) < 0.006
    assert abs(np.corrcoef(first.magnitude.numpy(), second.magnitude.numpy())[0, 1]) < 0.03


def test_fraction_of_images_left_unchanged_is_two_layers_at_p_one_half(photos):
    """Images stretched to the full range in every channel, so AutoContrast is the one op that
    leaves them unchanged (checked with timm's op): an image comes through a layer unchanged when
    the op is skipped (1/2) or is AutoContrast (1/2 * 1/15), or through both layers when Invert is
    applied twice."""
    images = [full_range(im) for im in crops(photos, 1024, 24)]
    assert all(np.array_equal(np.asarray(NAME_TO_OP["AutoContrast"](im)), np.asarray(im)) for im in images)
    batch = to_batch(images)
    out = BatchAugment(aug_config("recipe", reprob=0.0), 24)(batch, seed=0)
    unchanged = (out == normalize(batch)).flatten(1).all(1).double().mean().item()
    expected = (0.5 + 0.5 / 15) ** 2 + (0.5 / 15) ** 2
    assert abs(unchanged - expected) < 0.04, unchanged


def full_range(image: Image.Image) -> Image.Image:
    """Each channel stretched to exactly 0..255."""
    x = np.asarray(image).astype(np.float64)
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    return Image.fromarray(np.round((x - lo) * 255 / (hi - lo)).astype(np.uint8))


def test_each_image_gets_its_own_ops_and_magnitudes(photos):
    """64 copies of one image in a batch: apart from the ~28% RandAugment leaves as they are, each
    comes out differently."""
    batch = to_batch(crops(photos, 1, 64) * 64)
    out = BatchAugment(aug_config("recipe", reprob=0.0), 64)(batch, seed=3)
    distinct = len({image.numpy().tobytes() for image in out})
    assert distinct >= 36, distinct


def test_augmented_distribution_matches_timms_pil_rand_augment(photos):
    """Our batch path and timm's `rand_augment_transform` applied image by image, on the same 400
    images: per-image pixel mean and std (their mean and spread over images), the fraction of
    images left unchanged and the mean change agree within 3 standard deviations of their
    difference over seeds (measured: 4.2, 1.6, 1.7, 0.65 levels, 0.026, 4.1 levels). p = 1 or
    p = 1/4 instead of 1/2 moves the last two by 10 and 6 of those."""
    size = 64
    images = crops(photos, 400, size, seed=5)
    batch = to_batch(images)
    ours = pixels(BatchAugment(aug_config("recipe", reprob=0.0), size)(batch, seed=0)).float()
    hparams = {"translate_const": int(size * 0.45), "img_mean": FILL, "interpolation": Image.Resampling.BICUBIC}
    timm_rand_augment = rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
    with global_rngs_kept():
        random.seed(0)
        np.random.seed(0)
        theirs = to_batch([timm_rand_augment(im) for im in images]).float()

    def summary(x):
        mean, std = x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))
        change = (x - batch.float()).abs().mean(dim=(1, 2, 3))
        return {
            "mean of means": (mean.mean().item(), 13),
            "spread of means": (mean.std().item(), 5),
            "mean of stds": (std.mean().item(), 5.5),
            "spread of stds": (std.std().item(), 2),
            "unchanged": ((change == 0).double().mean().item(), 0.08),
            "mean change": (change.mean().item(), 12),
        }

    for (key, (value, tolerance)), (_, (reference, _)) in zip(summary(ours).items(), summary(theirs).items()):
        assert abs(value - reference) < tolerance, (key, value, reference)


# --------------------------------------------------------------------------------------------------
# Normalisation, erasing, reproducibility
# --------------------------------------------------------------------------------------------------
def test_aug_none_is_exactly_the_pil_paths_normalisation(photos):
    images = crops(photos, 8, 64)
    batch = to_batch(images)
    out = BatchAugment(aug_config("none"), 64)(batch, seed=0)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert torch.equal(out, normalize(batch))
    reference = torch.stack([TF.normalize(TF.to_tensor(im), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) for im in images])
    assert torch.equal(out, reference)


def test_random_erasing_hits_a_quarter_of_the_images_with_unit_normal_boxes_like_timms(photos):
    batch = to_batch(crops(photos, 800, 32))
    clean = normalize(batch)
    out = BatchAugment(aug_config("recipe", auto_augment=None, color_jitter=None), 32)(batch, seed=0)
    erased = (out != clean).any(1)  # (N, H, W)
    hit = erased.flatten(1).any(1)
    assert abs(hit.double().mean().item() - 0.25) < 0.04
    areas = []
    for mask in erased[hit]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert box.all()  # one filled rectangle (recount 1)
        areas.append(box.numel() / mask.numel())
    assert 0.015 < min(areas) and max(areas) < 0.4  # timm: 2% to 1/3 of the image, up to rounding
    noise = out.permute(1, 0, 2, 3)[:, erased]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02  # remode pixel: N(0, 1)

    with global_rngs_kept():
        random.seed(0)
        torch.manual_seed(0)
        timm_out = RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")(clean.clone())
    timm_erased = (timm_out != clean).any(1)
    timm_hit = timm_erased.flatten(1).any(1)
    assert abs(hit.double().mean().item() - timm_hit.double().mean().item()) < 0.05
    timm_area = timm_erased[timm_hit].double().mean().item()
    assert abs(np.mean(areas) - timm_area) < 0.25 * timm_area


def test_same_seed_same_batch_and_the_callers_rngs_untouched(photos):
    batch = to_batch(crops(photos, 16, 64))
    before = batch.clone()
    aug = BatchAugment(aug_config("recipe"), 64)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()

    first, again, other = aug(batch, seed=7), aug(batch, seed=7), aug(batch, seed=8)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(batch, before)  # the input is not modified
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_whole_groups_give_what_the_cpus_small_chunks_give(photos, monkeypatch):
    """On a GPU each op runs once over its whole group of images; on the CPU a few at a time. Same
    pixels, also for the ops that look at whole images (AutoContrast, Equalize, Contrast): each image
    gets its own range of levels here, so mixing statistics across images would show."""
    rng = np.random.default_rng(0)
    batch = to_batch(crops(photos, 128, 40)).float()
    low, high = rng.uniform(0, 80, (128, 1, 1, 1)), rng.uniform(160, 255, (128, 1, 1, 1))
    batch = (torch.from_numpy(low) + batch * torch.from_numpy((high - low) / 255)).round().to(torch.uint8)
    aug = BatchAugment(aug_config("recipe"), 40)
    small_chunks = aug(batch, seed=4)
    monkeypatch.setattr(batch_augment, "CPU_CHUNK", 1000)
    assert torch.equal(aug(batch, seed=4), small_chunks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpus_rand_augment(photos):
    """The draws come from a CPU generator, so both devices apply the same ops and magnitudes."""
    batch = to_batch(crops(photos, 32, 96))
    aug = BatchAugment(aug_config("recipe", reprob=0.0), 96)
    cpu = pixels(aug(batch, seed=11)).int()
    cuda = pixels(aug(batch.cuda(), seed=11).cpu()).int()
    assert (cpu - cuda).abs().max() <= 1 and (cpu != cuda).double().mean() < 1e-3


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        "rand-m7-n3-mstd1-inc0",  # timm's non-increasing op set, 3 layers
        "rand-m9-p0.3-mstd0.5-inc1",
        "rand-m5-mstd101-inc1",  # mstd > 100: magnitude uniform in [0, 5]
    ],
)
def test_other_rand_augment_strings_run(config, photos):
    aug = BatchAugment(aug_config("recipe", auto_augment=config), 48)
    timm_policy = rand_augment_transform(config, dict(aug.rand_augment.hparams))
    assert [op.name for op in aug.rand_augment.ops] == [op.name for op in timm_policy.ops]
    assert aug.rand_augment.num_layers == timm_policy.num_layers
    out = aug(to_batch(crops(photos, 16, 48)), seed=0)
    assert out.shape == (16, 3, 48, 48) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "overrides",
    [
        {"auto_augment": "original-mstd0.5"},  # timm AutoAugment policy
        {"auto_augment": "augmix-m5-w4-d2"},
        {"auto_augment": "rand-m9-mmax12"},
        {"auto_augment": "rand-m9-tweights"},  # weighted choice
        {"auto_augment": "rand-m9-t3a"},  # ops without a tensor implementation (Desaturate, GaussianBlur)
        {"auto_augment": "rand-m9-x1"},  # a section timm does not know
        {"train_interpolation": "bilinear"},
        {"train_interpolation": "random"},
        {"auto_augment": None, "color_jitter": 0.4},
        {"remode": "gaussian"},
    ],
)
def test_unsupported_configs_raise_a_one_line_user_error(overrides):
    with pytest.raises(UserError) as error:
        BatchAugment(aug_config("recipe", **overrides), 224)
    assert "\n" not in str(error.value)


def test_rejects_a_batch_that_is_not_uint8_rgb():
    aug = BatchAugment(aug_config("recipe"), 32)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 3, 32, 32), seed=0)
