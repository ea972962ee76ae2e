"""The lr schedule equals the official ConvNeXt `cosine_scheduler`, value for value, at every step."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convnext_train.schedule import cosine_lr

IMAGENET_TRAIN_IMAGES = 1_281_167


def official_schedule(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, warmup_steps=-1):
    """facebookresearch/ConvNeXt `utils.cosine_scheduler` (start_warmup_value=0), from its definition:
    a linspace warmup when warmup_epochs > 0 (warmup_steps > 0 overrides its length), then a cosine
    over the remaining iterations whose phase is i / (number of cosine iterations)."""
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup = np.linspace(0, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    cosine_iters = epochs * niter_per_ep - warmup_iters
    cosine = np.array(
        [
            final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / cosine_iters))
            for i in range(cosine_iters)
        ]
    )
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# (base_lr, min_lr, epochs, steps per epoch, warmup epochs, warmup steps override)
CASES = {
    # The ImageNet-1K recipe at batch 4096: 312 steps per epoch, 300 epochs, 20 warmup epochs.
    "imagenet_4096": (4e-3, 1e-6, 300, IMAGENET_TRAIN_IMAGES // 4096, 20, -1),
    # The 384 px fine-tuning recipe: batch 512, 30 epochs, lr 5e-5, no warmup.
    "finetune_no_warmup": (5e-5, 1e-6, 30, IMAGENET_TRAIN_IMAGES // 512, 0, -1),
    "tiny_odd": (0.3, 0.01, 3, 7, 1, -1),
    "warmup_steps_override": (0.3, 0.01, 3, 7, 1, 5),
    "two_warmup_steps": (1.0, 0.0, 1, 5, 1, 2),
    # linspace(0, base, 1) is [0.]: a one-step warmup trains its step at lr 0.
    "one_warmup_step": (1.0, 0.0, 1, 5, 1, 1),
    "all_warmup": (0.5, 0.0, 2, 3, 2, -1),
    "single_step": (0.5, 0.1, 1, 1, 0, -1),
}


def ours(base_lr, min_lr, epochs, niter_per_ep, warmup_epochs, warmup_steps):
    warmup = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    total = epochs * niter_per_ep
    return np.array(
        [
            cosine_lr(step, base_lr=base_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total)
            for step in range(total)
        ]
    )


@pytest.mark.parametrize("case", CASES)
def test_equals_the_official_schedule_at_every_step(case):
    # Bitwise: the same floats as the official array, not merely close ones.
    np.testing.assert_array_equal(ours(*CASES[case]), official_schedule(*CASES[case]))


def recipe_lr(step: int) -> float:
    return cosine_lr(step, base_lr=4e-3, min_lr=1e-6, warmup_steps=20 * 312, total_steps=300 * 312)


def test_warmup_rises_from_zero_to_exactly_base_lr():
    warmup = [recipe_lr(s) for s in range(20 * 312)]
    assert warmup[0] == 0.0
    assert all(a < b for a, b in zip(warmup, warmup[1:], strict=False))
    assert warmup[-1] == 4e-3  # linspace includes its endpoint
    assert recipe_lr(20 * 312) == pytest.approx(4e-3, rel=1e-12)  # the cosine starts at its top


def test_cosine_decays_to_just_above_min_lr():
    cosine = [recipe_lr(s) for s in range(20 * 312, 300 * 312)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:], strict=False))
    assert 1e-6 < cosine[-1] < 1e-6 + 1e-11


@pytest.mark.parametrize("step", [300 * 312, 300 * 312 + 1, 10 * 300 * 312])
def test_steps_past_the_end_stay_at_min_lr(step):
    assert recipe_lr(step) == 1e-6


@pytest.mark.parametrize(
    "step, warmup_steps, total_steps",
    [(-1, 0, 10), (0, 0, 0), (0, -1, 10), (0, 11, 10)],
)
def test_rejects_impossible_arguments(step, warmup_steps, total_steps):
    with pytest.raises(ValueError):
        cosine_lr(step, base_lr=1.0, min_lr=0.0, warmup_steps=warmup_steps, total_steps=total_steps)
