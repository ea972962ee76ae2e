"""Image transforms, Mixup/CutMix and the training loss, as the official ConvNeXt code builds them.

Training augmentation is timm's `create_transform` with the `conf/aug` values, exactly the call the
official `datasets.build_transform(is_train=True)` makes; Mixup/CutMix and the losses are timm's
classes, chosen by the official `main.py` logic. Only the eval transform is written out here (see
`EvalPreprocessing` for why), plus one repair in timm's RandAugment op table (see below).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import DictConfig
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchvision import transforms

__all__ = [
    "EvalPreprocessing",
    "eval_transform",
    "mixup_fn",
    "posterize_zero_bits_black",
    "train_transform",
    "train_loss",
]

# The official eval protocol: below this size, resize the shorter side to img_size / crop_pct and
# centre-crop; at this size and above, squash the whole image to a square (no crop).
SQUASH_FROM_SIZE = 384


def posterize_zero_bits_black(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize op, with "keep 0 bits" giving an all-zero image of the same size and mode.

    Why: `rand-m9-mstd0.5-inc1` draws magnitude ~ N(9, 0.5) clipped to [0, 10]; at 10 (about 2% of
    posterize draws) PosterizeIncreasing asks for 0 bits. Older Pillow masked every value to 0 (a
    black image), which is what the recipe trained with; current Pillow (13) raises `ValueError:
    bits must be between or equal to 1 and 8`, and timm 1.0.31 passes 0 straight through, so a long
    run dies at a random step. This restores the old result instead of changing the augmentation.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# timm looks ops up by name in NAME_TO_OP when a RandAugment/AutoAugment transform is built, so the
# repair must be in the table before any transform is created: it is installed when this module is
# imported, and this module is where every transform is created. All three posterize variants share
# timm's function; each one can reach 0 bits (Posterize at low magnitude), so all three are replaced.
for _posterize_name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_posterize_name] = posterize_zero_bits_black


def eval_transform(img_size: int, crop_pct: float) -> transforms.Compose:
    """The official ConvNeXt eval transform (bicubic, ImageNet mean/std): `EvalPreprocessing`'s."""
    return EvalPreprocessing(img_size, crop_pct).transform()


@dataclass(frozen=True)
class EvalPreprocessing:
    """The evaluation input contract: what a model expects its images to have been through. An ONNX
    export carries it in its metadata (`metadata()`), so that predict.py, or a service in another
    language, prepares images exactly as evaluation here does.

    Written with torchvision rather than timm's eval transform because the official protocol
    switches on img_size: at >= 384 it squashes to (img_size, img_size) and ignores crop_pct, which
    timm's eval modes (all of which resize by 1 / crop_pct) do not express.
    """

    img_size: int
    crop_pct: float
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    interpolation: str = "bicubic"

    @property
    def resize(self) -> str:
        """`squash` (the whole image to img_size x img_size) or `shorter_side_then_center_crop`
        (shorter side to int(img_size / crop_pct), then the centre img_size x img_size)."""
        return "squash" if self.img_size >= SQUASH_FROM_SIZE else "shorter_side_then_center_crop"

    def transform(self) -> transforms.Compose:
        mode = transforms.InterpolationMode(self.interpolation)
        if self.resize == "squash":
            resize = [transforms.Resize((self.img_size, self.img_size), interpolation=mode)]
        else:
            resize = [
                transforms.Resize(int(self.img_size / self.crop_pct), interpolation=mode),
                transforms.CenterCrop(self.img_size),
            ]
        return transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def metadata(self) -> dict[str, str]:
        """String values (ONNX metadata holds strings): numbers as JSON, the resize rule spelled out."""
        return {
            "img_size": str(self.img_size),
            "crop_pct": repr(float(self.crop_pct)),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "pixels": "RGB, scaled to [0, 1], then (x - mean) / std; NCHW",
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> EvalPreprocessing:
        """The inverse of `metadata()`; KeyError or ValueError when a value is missing or malformed."""
        preprocessing = cls(
            img_size=int(metadata["img_size"]),
            crop_pct=float(metadata["crop_pct"]),
            mean=tuple(float(v) for v in json.loads(metadata["mean"])),
            std=tuple(float(v) for v in json.loads(metadata["std"])),
            interpolation=transforms.InterpolationMode(metadata["interpolation"]).value,
        )
        if preprocessing.resize != metadata["resize"]:
            raise ValueError(f"resize={metadata['resize']} is not what img_size={preprocessing.img_size} implies")
        return preprocessing


def train_transform(aug_cfg: DictConfig, img_size: int) -> transforms.Compose:
    """The training transform for a `conf/aug` node.

    `random_resized_crop: true` is the paper's recipe: RandomResizedCrop, horizontal flip,
    RandAugment (which makes timm drop colour jitter), ToTensor, Normalize, random erasing.
    `random_resized_crop: false` (aug=none) is the eval transform: the same pixels every time.
    """
    if not aug_cfg.random_resized_crop:
        return eval_transform(img_size, aug_cfg.crop_pct)
    return create_transform(
        input_size=img_size,
        is_training=True,
        scale=tuple(aug_cfg.scale),
        ratio=tuple(aug_cfg.ratio),
        hflip=aug_cfg.hflip,
        color_jitter=aug_cfg.color_jitter,
        auto_augment=aug_cfg.auto_augment,
        interpolation=aug_cfg.train_interpolation,
        re_prob=aug_cfg.reprob,
        re_mode=aug_cfg.remode,
        re_count=aug_cfg.recount,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def mixup_fn(aug_cfg: DictConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix for a batch (`images, soft_targets = fn(images, targets)`; the batch size
    must be even), or None when both alphas are 0. Label smoothing is applied inside Mixup, as the
    official code does, so the loss is then plain soft-target cross-entropy."""
    if aug_cfg.mixup <= 0 and aug_cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=aug_cfg.mixup,
        cutmix_alpha=aug_cfg.cutmix,
        prob=aug_cfg.mixup_prob,
        switch_prob=aug_cfg.mixup_switch_prob,
        mode=aug_cfg.mixup_mode,
        label_smoothing=aug_cfg.label_smoothing,
        num_classes=num_classes,
    )


def train_loss(aug_cfg: DictConfig) -> nn.Module:
    """The official choice: soft-target CE with Mixup/CutMix (smoothing is in the targets), else
    label-smoothing CE when smoothing > 0, else plain CE."""
    if aug_cfg.mixup > 0 or aug_cfg.cutmix > 0:
        return SoftTargetCrossEntropy()
    if aug_cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug_cfg.label_smoothing)
    return nn.CrossEntropyLoss()
