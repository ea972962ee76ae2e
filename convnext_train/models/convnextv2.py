"""ConvNeXt V2 ("Co-designing and Scaling ConvNets with Masked Autoencoders", Woo et al., CVPR 2023).

The V1 network with one change in the block: Global Response Normalization after the GELU, and no
layer scale. Official parameter names (`stages.2.5.grn.gamma`), so official checkpoints load as-is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath
from torch import nn

from convnext_train.models.convnext import ConvNeXt
from convnext_train.models.layers import GRN


class BlockV2(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear 4x -> GELU -> GRN -> Linear -> drop path, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        branch = self.pwconv2(self.grn(self.act(self.pwconv1(branch))))
        return x + self.drop_path(branch.permute(0, 3, 1, 2))


class ConvNeXtV2(ConvNeXt):
    """ConvNeXt V2: the V1 hierarchy (stem, downsampling, head, init, `forward_intermediates`,
    `stage_norms`) with `BlockV2` blocks."""

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
        grad_checkpointing: bool = False,
        stage_norms: bool = False,
    ):
        super().__init__(
            depths=depths,
            dims=dims,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            layer_scale_init_value=0.0,
            head_init_scale=head_init_scale,
            grad_checkpointing=grad_checkpointing,
            stage_norms=stage_norms,
        )

    def make_block(self, dim: int, drop_path: float, layer_scale_init_value: float) -> nn.Module:
        return BlockV2(dim, drop_path)
