"""The ConvNeXt family. A variant is chosen by Hydra config: `conf/model/<name>.yaml`."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from convnext_train.errors import UserError
from convnext_train.models.convnext import ConvNeXt, ConvNeXtIsotropic
from convnext_train.models.convnextv2 import ConvNeXtV2

__all__ = ["ConvNeXt", "ConvNeXtIsotropic", "ConvNeXtV2", "build_model"]


def build_model(model_cfg: DictConfig) -> nn.Module:
    """Instantiate a `conf/model` node; a bad value becomes a message naming it."""
    try:
        return instantiate(model_cfg)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise UserError(f"cannot build the model from the `model` config: {cause}") from error
