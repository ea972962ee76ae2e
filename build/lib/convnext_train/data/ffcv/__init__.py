"""`data=ffcv`: the fast data path. FFCV reads `.beton` files and, per image in its compiled threads,
decodes, crops, flips and applies RandAugment; the rest of the recipe runs on whole batches.

    python data/write_ffcv.py /datasets/imagenet /datasets/imagenet-ffcv    # train.beton, val.beton
    python train.py model=convnext_t data=imagenet_ffcv data.root=/datasets/imagenet-ffcv

Training, per image in FFCV's pipeline: JPEG decode, random-resized crop with the recipe's scale and
ratio (resized with FFCV's OpenCV INTER_AREA, where the PIL path uses bicubic), horizontal flip, and
timm's RandAugment (`rand_augment.py`, bit-exact with timm's PIL ops); then, per batch on the device,
`BatchAugment` (normalisation, random erasing). Mixup/CutMix stays in the training step, as on the
reference path. Validation: the official resize + centre crop (squash at >= 384 px), normalised.

The same guarantees as the reference path (`loaders.py`):
- order: each epoch's permutation is `EpochSampler`'s, rank r takes every world_size-th image from
  position r, and `start_at(epoch, k)` continues an epoch after the k images this rank has consumed;
- randomness: the crop, flip and RandAugment of image i in epoch e are a pure function of (seed, e, i),
  drawn by a counter-based generator inside the compiled decoder, and a batch's erasing is seeded
  from (seed, epoch, rank, position); so a resumed run sees the same pixels as an uninterrupted one.

Modules, each importing only those above it:
- `library`: FFCV and numba, imported once if they can be (`FFCV_IMPORT_ERROR`, `require_ffcv`);
- `betons`: the .beton files, opened and checked, and write_ffcv's record beside each;
- `decoder`: the compiled per-image decoder (`CropDecoder`: decode, crop, flip, RandAugment);
- `order`: `RankOrder`, EpochSampler's order of a pass as FFCV takes it;
- `repairs`: fixes of FFCV 1.0.2 (patched in place on import) and `CheckedLoader`;
- `batches`: the batch iterators (`TrainBatches`, `ValBatches`) and one decode pass at a time;
- `entry_points`: the `data=ffcv` source (`SOURCES`: `ffcv_loaders`, `ffcv_val_loader`, its checks).
Everything is imported from here (`from convnext_train.data.ffcv import ffcv_loaders`).
"""

from __future__ import annotations

from convnext_train.data.compiled import image_key
from convnext_train.data.ffcv.batches import (
    FFCVBatches,
    OneDecodeAtATime,
    TrainBatches,
    ValBatches,
    batch_seed,
    decoding_threads,
    torch_threads_kept,
)
from convnext_train.data.ffcv.betons import (
    RECORD_FORMAT,
    WRITE_HELP,
    Beton,
    check_class_lists,
    open_beton,
    open_reader,
    read_record,
    record_path,
)
from convnext_train.data.ffcv.decoder import (
    FLIP_DRAW,
    UINT64,
    CropDecoder,
    centre_crop,
    eval_decoder,
    mirror,
    native_helpers,
    random_crop,
)
from convnext_train.data.ffcv.entry_points import SOURCES, ffcv_loaders, ffcv_val_loader
from convnext_train.data.ffcv.library import FFCV_IMPORT_ERROR, INSTALL_HELP, require_ffcv
from convnext_train.data.ffcv.order import ORDERS, RankOrder
from convnext_train.data.ffcv.repairs import (
    CheckedEpochIterator,
    CheckedLoader,
    compile_reader_keeping_numba_types,
    compile_with_exact_math,
)

__all__ = [
    # library
    "FFCV_IMPORT_ERROR",
    "INSTALL_HELP",
    "require_ffcv",
    # entry points
    "SOURCES",
    "ffcv_loaders",
    "ffcv_val_loader",
    # betons
    "RECORD_FORMAT",
    "WRITE_HELP",
    "Beton",
    "check_class_lists",
    "open_beton",
    "open_reader",
    "read_record",
    "record_path",
    # decoder
    "FLIP_DRAW",
    "UINT64",
    "CropDecoder",
    "centre_crop",
    "eval_decoder",
    "image_key",  # compiled.py's, used by the decoder; tests key their expectations with it
    "mirror",
    "native_helpers",
    "random_crop",
    # order
    "ORDERS",
    "RankOrder",
    # repairs
    "CheckedEpochIterator",
    "CheckedLoader",
    "compile_reader_keeping_numba_types",
    "compile_with_exact_math",
    # batches
    "FFCVBatches",
    "OneDecodeAtATime",
    "TrainBatches",
    "ValBatches",
    "batch_seed",
    "decoding_threads",
    "torch_threads_kept",
]
