"""ConvNeXt V1 ("A ConvNet for the 2020s", Liu et al., CVPR 2022) and its isotropic variant.

Module and parameter names are those of the official release (`downsample_layers.0.0.weight`,
`stages.2.5.dwconv.weight`, `stages.2.5.gamma`, `norm.weight`, `head.weight`), so its checkpoints
load with `strict=True`. Other formats (timm, Hugging Face) are converted in `checkpoints/layouts.py`.

Sections: block, hierarchical network, isotropic network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from convnext_train.models.layers import LayerNorm2d


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Stochastic depth grows linearly from 0 at the first block to `drop_path_rate` at the last."""
    # Computed in float32 on the CPU like the official code, so the rates match it bit for bit.
    return torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist()


def init_weights(module: nn.Module) -> None:
    """Paper init: truncated normal (std .02, cut at +-2 as the official code) and zero bias."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale -> drop path, residual.

    The two pointwise convolutions are Linear layers on (N, H, W, C) tensors, as in the paper's code.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) if layer_scale_init_value > 0 else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The block's branch, on (N, H, W, C)."""
        x = self.norm(x)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        if self.gamma is not None:
            x = self.gamma * x
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.dwconv(x).permute(0, 2, 3, 1)
        branch = self.residual(branch).permute(0, 3, 1, 2)
        return x + self.drop_path(branch)


# --------------------------------------------------------------------------------------------------
# Hierarchical ConvNeXt (T/S/B/L/XL and the small atto..nano sizes)
# --------------------------------------------------------------------------------------------------
class ConvNeXt(nn.Module):
    """Four stages at strides 4, 8, 16, 32; a "patchify" 4x4 stem and 2x2 stride-2 downsampling.

    `grad_checkpointing=True` recomputes each stage's activations in the backward pass, trading
    about a third more compute for far less activation memory (L/XL at 384 px).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt has 4 stages: got depths={list(depths)}, dims={list(dims)}")
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing

        stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm2d(dims[0], eps=1e-6),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )

        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        self.stages = nn.ModuleList(
            nn.Sequential(*(self.make_block(dim, next(rates), layer_scale_init_value) for _ in range(depth)))
            for depth, dim in zip(depths, dims, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

        self.apply(init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def make_block(self, dim: int, drop_path: float, layer_scale_init_value: float) -> nn.Module:
        return Block(dim, drop_path, layer_scale_init_value)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = downsample(x)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.norm(x.mean(dim=(-2, -1)))  # global average pool, then LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------
# Isotropic ConvNeXt (paper section 4.3: a ViT-style single-resolution network of ConvNeXt blocks)
# --------------------------------------------------------------------------------------------------
class ConvNeXtIsotropic(nn.Module):
    """A 16x16 patchify stem, then `depth` blocks at one resolution and width, like ViT."""

    def __init__(
        self,
        depth: int = 18,
        dim: int = 384,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 0.0,
        head_init_scale: float = 1.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=16, stride=16)
        self.blocks = nn.Sequential(
            *(Block(dim, rate, layer_scale_init_value) for rate in drop_path_rates(drop_path_rate, depth))
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

        self.apply(init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            # No stages here: checkpoint in four segments, the same memory profile as the hierarchy.
            for segment in _split(list(self.blocks), 4):
                x = checkpoint(nn.Sequential(*segment), x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _split(items: list, parts: int) -> list[list]:
    size = -(-len(items) // parts)
    return [items[i : i + size] for i in range(0, len(items), size)]
