"""What the FFCV path compiles with numba (which comes with the optional FFCV extra): the lazy `jit`,
and a counter-based random generator keyed by (seed, epoch, image), so an image's crop, flip and
RandAugment draws are a pure function of those three numbers, whatever thread, rank or batch
decodes it, and whether or not the run resumed.

Without numba this module still imports (`jit` then returns the plain Python function, which
nothing calls: the FFCV path's entry points say first that the extra is missing).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the FFCV extra is not installed; its entry points say so (ffcv.require_ffcv)
    numba = None

__all__ = ["image_key", "jit", "uniform"]


def jit(function):
    """numba's compilation, releasing the GIL (FFCV's threads run these in parallel). Lazy: nothing
    compiles before the first call; compiled code is cached on disk beside the module."""
    return numba.njit(nogil=True, cache=True)(function) if numba is not None else function


@jit
def mix64(x):
    """SplitMix64's finaliser: a bijection of uint64 whose outputs look independent for consecutive inputs."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@jit
def image_key(seed, epoch, index):
    """The key of one image's draws in one epoch (seed: uint64, epoch, index: integers)."""
    return mix64(mix64(mix64(seed) ^ np.uint64(epoch)) ^ np.uint64(index))


@jit
def uniform(key, counter):
    """Draw number `counter` under `key`: a float in [0, 1) with 53 random bits."""
    return np.float64(mix64(key + np.uint64(counter)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
