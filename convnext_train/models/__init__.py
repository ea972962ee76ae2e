"""The ConvNeXt family, ConvNeXt V2's masked autoencoder (`FCMAE`), and the paper's roadmap from ResNet
to ConvNeXt (`RoadmapNet`). A variant is
chosen by Hydra config: `conf/model/<name>.yaml`, a roadmap step `conf/model/roadmap_r50/<step>.yaml`."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from convnext_train.errors import UserError
from convnext_train.models.convnext import ConvNeXt, ConvNeXtIsotropic
from convnext_train.models.convnextv2 import ConvNeXtV2
from convnext_train.models.fcmae import FCMAE
from convnext_train.models.roadmap import RoadmapNet

__all__ = ["FCMAE", "ConvNeXt", "ConvNeXtIsotropic", "ConvNeXtV2", "RoadmapNet", "TIMM_NAMES", "build_model"]

# Our variant names -> timm's. timm has no isotropic ConvNeXt, so those cannot be compared.
TIMM_NAMES = {
    "convnext_atto": "convnext_atto",
    "convnext_femto": "convnext_femto",
    "convnext_pico": "convnext_pico",
    "convnext_nano": "convnext_nano",
    "convnext_t": "convnext_tiny",
    "convnext_s": "convnext_small",
    "convnext_b": "convnext_base",
    "convnext_l": "convnext_large",
    "convnext_xl": "convnext_xlarge",
    "convnextv2_atto": "convnextv2_atto",
    "convnextv2_femto": "convnextv2_femto",
    "convnextv2_pico": "convnextv2_pico",
    "convnextv2_nano": "convnextv2_nano",
    "convnextv2_t": "convnextv2_tiny",
    "convnextv2_b": "convnextv2_base",
    "convnextv2_l": "convnextv2_large",
    "convnextv2_h": "convnextv2_huge",
}


def build_model(model_cfg: DictConfig) -> nn.Module:
    """Instantiate a `conf/model` node; a bad value becomes a message naming it."""
    try:
        return instantiate(model_cfg)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise UserError(f"cannot build the model from the `model` config: {cause}") from error
