"""FFCV itself (and numba, which comes with it), imported once for the whole package.

FFCV is an optional extra: this module imports without it, and every entry point calls `require_ffcv`
first, which turns the import failure into one line. The other modules take FFCV's names from here:
without FFCV they are placeholders (`object` for the base classes, so that the classes built on them
still define; None otherwise), and nothing of this package is built.
"""

from __future__ import annotations

import torch

from convnext_train.errors import UserError

# Importing FFCV sets torch's CPU thread count to 1 (its compiler's default): the user's is restored.
_torch_threads = torch.get_num_threads()
try:
    import numba
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.memory_managers import OSCacheManager
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
    from ffcv.traversal_order import QuasiRandom
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.traversal_order.quasi_random import generate_order_inner
except (ImportError, OSError) as _error:  # not installed, or its native libraries cannot be loaded
    FFCV_IMPORT_ERROR: Exception | None = _error
    numba = None
    # Placeholders for the base classes of the other modules: nothing of this package is built without FFCV.
    ResizedCropRGBImageDecoder = TraversalOrder = EpochIterator = Loader = object
    IntField = RGBImageField = IntDecoder = IMAGE_MODES = ctypes_memcopy = imdecode = resize_crop = None
    OSCacheManager = Compiler = Reader = ToDevice = ToTensor = ToTorchImage = None
    QuasiRandom = generate_order_inner = None
else:
    FFCV_IMPORT_ERROR = None
finally:
    torch.set_num_threads(_torch_threads)

__all__ = [
    "FFCV_IMPORT_ERROR",
    "IMAGE_MODES",
    "INSTALL_HELP",
    "Compiler",
    "EpochIterator",
    "IntDecoder",
    "IntField",
    "Loader",
    "OSCacheManager",
    "QuasiRandom",
    "RGBImageField",
    "Reader",
    "ResizedCropRGBImageDecoder",
    "ToDevice",
    "ToTensor",
    "ToTorchImage",
    "TraversalOrder",
    "ctypes_memcopy",
    "generate_order_inner",
    "imdecode",
    "numba",
    "require_ffcv",
    "resize_crop",
]

INSTALL_HELP = (
    "FFCV is an optional extra: install its system libraries, then the extra: "
    "`sudo apt-get install pkg-config libturbojpeg0-dev libopencv-dev && pip install -e '.[ffcv]'`"
)


def require_ffcv() -> None:
    if FFCV_IMPORT_ERROR is not None:
        raise UserError(
            f"data.kind=ffcv needs the ffcv package, which cannot be imported ({FFCV_IMPORT_ERROR}). {INSTALL_HELP}"
        )
