"""FCMAE pre-training as a task (ConvNeXt V2, section 3): a micro-batch's loss is the model's
masked-reconstruction loss; an evaluation is that loss on the validation split under fixed masks,
plus `reconstructions.png` of a few validation images.

Masks come with the batches, in the place of the labels: the loaders draw each sample's mask from
(seed, epoch, sample index), as they draw its augmentation (`sample_target`, data/loaders.py), so a
resumed run and a run on any number of processes see the same masks. Validation masks are drawn
with seed 0 and epoch 0 whatever the run's seed: every epoch and every run is scored on the same
holes, so the numbers compare.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.utils import save_image

from convnext_train.atomic import write_atomically
from convnext_train.errors import UserError
from convnext_train.models.fcmae import FCMAE, random_masks, reconstructions, upsample_mask
from convnext_train.tasks.evaluation import evaluation_batches, summed_over_processes

FIGURE = "reconstructions.png"


def sample_mask(seed: int, *, num_patches: int, mask_ratio: float) -> torch.Tensor:
    """One image's (num_patches,) mask from its own seed (loaders.py gives each sample one)."""
    return random_masks(1, num_patches, mask_ratio, torch.Generator().manual_seed(seed))[0]


class MaskedImageModeling:
    metric = "val_loss"
    higher_is_better = False
    summary_keys = ("val_loss",)

    def __init__(self, num_patches: int, mask_ratio: float, figure_images: int):
        self.sample_target: Callable[[int], torch.Tensor] = partial(
            sample_mask, num_patches=num_patches, mask_ratio=mask_ratio
        )
        self.figure_images = figure_images
        self.examples: tuple[torch.Tensor, ...] | None = None  # the last evaluation's figure material

    @classmethod
    def from_config(cls, cfg: DictConfig) -> MaskedImageModeling:
        m = cfg.model
        if m.get("_target_") != "convnext_train.models.FCMAE":
            raise UserError(
                "task=fcmae trains models.FCMAE: add experiment=fcmae (it builds one around model=convnextv2_<size>)"
            )
        if cfg.data.img_size % m.patch_size:
            raise UserError(f"data.img_size={cfg.data.img_size} must be a multiple of model.patch_size={m.patch_size}")
        return cls((cfg.data.img_size // m.patch_size) ** 2, m.mask_ratio, cfg.fcmae.figure_images)

    def loss(self, forward: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        loss, _, _ = forward(images, mask=masks)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, **how) -> dict[str, Any]:
        """The mean over validation images of each image's loss on its removed patches (the training
        loss's per-image terms; every image removes as many patches), summed over every process."""
        total = torch.zeros((), dtype=torch.float64, device=how["device"])
        count = skipped = 0
        self.examples = None
        for images, masks, replaced in evaluation_batches(model, loader, **how):
            skipped += int(replaced.sum())
            with how["autocast"]():
                _, pred, _ = model(images, mask=masks)
            per_image = (model.patch_losses(images, pred) * masks).sum(dim=1) / masks.sum(dim=1)
            total += per_image.double().sum()
            count += images.shape[0]
            if self.examples is None and self.figure_images:
                self.examples = figure_columns(
                    model, *(t[: self.figure_images].float().cpu() for t in (images, pred, masks))
                )
        loss_all, count_all, skipped_all = summed_over_processes(total, count, skipped, device=how["device"])
        if count_all == 0:
            raise UserError("the validation set is empty: give data.val_root (or the split) some images")
        return {"loss": loss_all / count_all, "images": int(count_all), "skipped_images": int(skipped_all)}

    def describe(self, row: dict[str, Any]) -> str:
        return f"reconstruction loss {row['val_loss']:.4f} (removed patches, fixed validation masks)"

    def write_figures(self, run_dir: Path) -> list[Path]:
        """`reconstructions.png` from the last evaluation: one row per image (original, masked input,
        prediction, prediction with the visible patches pasted back)."""
        if self.examples is None:
            return []
        rows = torch.stack(self.examples, dim=1).flatten(0, 1)  # image 0's four columns, image 1's, ...
        path = run_dir / FIGURE
        write_atomically(
            path, partial(save_image, rows, nrow=len(self.examples), padding=2, pad_value=1.0, format="PNG")
        )
        return [path]


def figure_columns(
    model: FCMAE, images: torch.Tensor, pred: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The figure's four columns as displayable (N, 3, H, W) images in [0, 1]: original, masked input
    (removed patches at the normalised mean: grey), prediction, prediction with the visible patches
    pasted back."""
    predicted, pasted = reconstructions(model, images, pred, masks)
    removed = upsample_mask(masks, images.shape[-1])
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    columns = (images, images * (1 - removed), predicted, pasted)
    return tuple((column * std + mean).clamp(0, 1) for column in columns)
