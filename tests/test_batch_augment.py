"""BatchAugment, the FFCV path's on-device steps after RandAugment: normalisation against the PIL
path's ToTensor + Normalize (both layouts), random erasing against timm's RandomErasing, plus
reproducibility and the config errors. RandAugment itself runs in FFCV's decoder: test_rand_augment.py.

Images are real photographs: the JPEGs bundled with scikit-learn, read from disk.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo_crops, sample_photos
from omegaconf import OmegaConf
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import functional as TF

from convnext_train.configs import CONFIG_DIR
from convnext_train.data.batch_augment import BatchAugment, normalize
from convnext_train.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def aug_config(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "aug" / f"{name}.yaml"), overrides)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return sample_photos()


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


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


# --------------------------------------------------------------------------------------------------
# Normalisation, erasing, reproducibility
# --------------------------------------------------------------------------------------------------
def test_aug_none_is_exactly_the_pil_paths_normalisation(photos):
    images = photo_crops(photos, 8, 64)
    batch = to_batch(images)
    out = BatchAugment(aug_config("none"))(batch, seed=0)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert torch.equal(out, normalize(batch))
    reference = torch.stack(
        [TF.normalize(TF.to_tensor(im), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) for im in images]
    )
    assert torch.equal(out, reference)


def test_random_erasing_hits_a_quarter_of_the_images_with_unit_normal_boxes_like_timms(photos):
    batch = to_batch(photo_crops(photos, 800, 32))
    clean = normalize(batch)
    out = BatchAugment(aug_config("recipe"))(batch, seed=0)
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
    batch = to_batch(photo_crops(photos, 16, 64))
    before = batch.clone()
    aug = BatchAugment(aug_config("recipe"))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()

    first, again, other = aug(batch, seed=7), aug(batch, seed=7), aug(batch, seed=8)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(batch, before)  # the input is not modified
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True))
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_channels_last_batches_normalise_like_contiguous_ones(photos):
    """FFCV hands over channels-last views, normalised through a table on the CPU; NCHW batches go
    through torch's operations. Same values, and the output keeps the input's layout."""
    batch = to_batch(photo_crops(photos, 6, 40))
    channels_last = batch.contiguous(memory_format=torch.channels_last)
    out = normalize(channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, normalize(batch)) and normalize(batch).is_contiguous()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpus_batch():
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(aug_config("recipe"))
    assert torch.equal(normalize(batch.cuda()).cpu(), normalize(batch))
    assert aug(batch.cuda(), seed=1).shape == batch.shape


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def test_an_unknown_erasing_mode_is_a_one_line_user_error():
    with pytest.raises(UserError) as error:
        BatchAugment(aug_config("recipe", remode="gaussian"))
    assert "\n" not in str(error.value) and "remode" in str(error.value)


def test_rejects_a_batch_that_is_not_uint8_rgb():
    aug = BatchAugment(aug_config("recipe"))
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 3, 32, 32), seed=0)
