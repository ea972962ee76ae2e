"""The ImageNet-C corruptions, from the authors' own code (the `imagecorruptions` package, 1.1.2).

That release predates current NumPy, scikit-image and setuptools, and three of its calls fail on
them. `corrupt_function()` loads it with three small shims, confined to that package's module, that
restore the old behaviour without changing what a corruption computes:
- `from pkg_resources import resource_filename` (its frost images): setuptools >= 81 has no
  pkg_resources; a stand-in `resource_filename` returns the file inside the installed package.
- `gaussian(..., multichannel=True)` (glass blur, frost's and snow's blurs): scikit-image 0.19
  renamed the argument to `channel_axis=-1` and later releases removed the old name.
- `np.float_` (fog's plasma fractal): removed in NumPy 2.0; the same float64 type under its new name.
Every one of the 15 benchmark corruptions is run on a real image in tests/test_robustness.py with
the pinned versions, so a further incompatibility shows there rather than mid-way through 750,000 images.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from convnext_train.errors import UserError

INSTALL_HINT = "pip install -e '.[robustness]' (the imagecorruptions package, the ImageNet-C authors' code)"


def corrupt_function() -> Callable[[np.ndarray, str, int], np.ndarray]:
    """`corrupt(image uint8 HxWx3, corruption name, severity 1..5) -> uint8 image`."""
    if importlib.util.find_spec("imagecorruptions") is None:
        raise UserError(f"regenerating ImageNet-C needs imagecorruptions: {INSTALL_HINT}")
    module = _import_with_resource_filename()
    _gaussian = module.gaussian

    def gaussian(image, *args, multichannel=None, **kwargs):
        if multichannel is not None:
            kwargs.setdefault("channel_axis", -1 if multichannel else None)
        return _gaussian(image, *args, **kwargs)

    module.gaussian = gaussian
    module.np = _NumpyWithFloat_()
    from imagecorruptions import corrupt

    return lambda image, name, severity: corrupt(image, severity=severity, corruption_name=name)


def _import_with_resource_filename() -> types.ModuleType:
    """imagecorruptions.corruptions, imported with a stand-in pkg_resources where none exists (only
    for the import: nothing else sees it)."""
    if "imagecorruptions.corruptions" in sys.modules:
        return sys.modules["imagecorruptions.corruptions"]
    # Its `scipy.ndimage.interpolation` import still works (deprecated until SciPy 2.0): not ours to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if importlib.util.find_spec("pkg_resources") is not None:
            return importlib.import_module("imagecorruptions.corruptions")
        stand_in = types.ModuleType("pkg_resources")
        stand_in.resource_filename = _resource_filename
        sys.modules["pkg_resources"] = stand_in
        try:
            return importlib.import_module("imagecorruptions.corruptions")
        finally:
            del sys.modules["pkg_resources"]


def _resource_filename(package: str, name: str) -> str:
    origin = importlib.util.find_spec(package).origin
    return str(Path(origin).parent / name)


class _NumpyWithFloat_(types.ModuleType):
    """numpy, as the corruption module sees it, with NumPy 1's `float_` alias."""

    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        return np.float64 if name == "float_" else getattr(np, name)
