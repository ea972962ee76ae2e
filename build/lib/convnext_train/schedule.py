"""The learning-rate schedule of the ConvNeXt recipe: linear warmup from 0, then a cosine to `min_lr`.

The official code (facebookresearch/ConvNeXt, `utils.cosine_scheduler`) precomputes a numpy array
with one value per optimizer step and indexes it by the global step. `cosine_lr` computes the same
value on demand, bit for bit, so nothing depends on when the array was built and a resumed run
needs only its step counter:

- warmup, steps `0 .. warmup_steps - 1`: `np.linspace(0, base_lr, warmup_steps)`. linspace includes
  its endpoint, so the first step trains at lr 0 and the last warmup step at exactly `base_lr`;
- then `min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * i / n))` for the `n = total - warmup`
  remaining steps, `i = 0 .. n - 1`. `i` never reaches `n`, so the last step is slightly above `min_lr`.

A "step" is an optimizer update; with gradient accumulation several micro-batches share one. The
official `niter_per_ep` is `len(dataset) // global_batch_size` (the last partial batch is dropped),
e.g. 1,281,167 // 4096 = 312 on ImageNet-1K.

Weight decay needs no schedule: the recipe's `weight_decay_end` defaults to `weight_decay`, which
makes the official weight-decay "schedule" a constant.
"""

from __future__ import annotations

import math


def cosine_lr(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of a `total_steps`-step run.

    Steps at or past `total_steps` get `min_lr`, the value the cosine reaches at its end: the
    official array would raise an IndexError there, but a run that takes a step more than planned
    (or is resumed with a shorter schedule) should keep training at the schedule's floor, not crash.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")

    if step >= total_steps:
        return min_lr
    if step < warmup_steps:
        return _linspace_value(step, stop=base_lr, num=warmup_steps)
    # Evaluated in the official order, pi * i first and then / n, so the floats match bit for bit.
    phase = math.pi * (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(phase))


def _linspace_value(index: int, *, stop: float, num: int) -> float:
    """`np.linspace(0, stop, num)[index]`, with numpy's own arithmetic so the floats are identical.

    numpy multiplies the index by the spacing `stop / (num - 1)` and then sets the endpoint to `stop`
    exactly; a single point (num == 1) is the start, 0.
    """
    if num == 1:
        return 0.0
    if index == num - 1:
        return stop
    return index * (stop / (num - 1))
