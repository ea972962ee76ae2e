"""ConvNeXt V1 ("A ConvNet for the 2020s", Liu et al., CVPR 2022) and its isotropic variant.

Module and parameter names are those of the official release (`downsample_layers.0.0.weight`,
`stages.2.5.dwconv.weight`, `stages.2.5.gamma`, `norm.weight`, `head.weight`), so its checkpoints
load with `strict=True`. Other formats (timm, Hugging Face) are converted in `checkpoints/layouts.py`.

`ConvNeXt.forward_intermediates` returns the four stage maps (strides 4, 8, 16, 32) for dense
tasks, with timm's signature and semantics; `stage_norms=True` adds the per-stage LayerNorms
(`norm0`..`norm3`) of the official detection and segmentation backbones.

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

    `stage_norms=True` adds one channels-first LayerNorm (eps 1e-6) per stage, named `norm0`..`norm3`
    as in the official detection/segmentation backbones (facebookresearch/ConvNeXt, `object_detection`
    and `semantic_segmentation`), so their `backbone.norm{i}.*` weights load once the `backbone.`
    prefix is stripped. `forward_intermediates` applies them to the stage maps it returns; the
    classifier path (`forward`) never uses them. Off by default: the default model's parameters, and
    so its state dict, are exactly the official classification model's.
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
        stage_norms: bool = False,
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
        if stage_norms:  # registered as the official backbones do: attributes norm0..norm3, not a list
            for i, dim in enumerate(dims):
                self.add_module(f"norm{i}", LayerNorm2d(dim, eps=1e-6))

        self.apply(init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def make_block(self, dim: int, drop_path: float, layer_scale_init_value: float) -> nn.Module:
        return Block(dim, drop_path, layer_scale_init_value)

    def _run_stages(self, x: torch.Tensor, last: int, take: Sequence[int] = ()) -> tuple[torch.Tensor, list]:
        """The one walk over the stages: downsampling then blocks, for stages 0..`last`, each stage
        under activation checkpointing when that is on. Returns the last stage's output and the
        outputs of the stages in `take`, in stage order, each through its stage norm if there is one."""
        taken = []
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages, strict=True)):
            if i > last:
                break
            x = downsample(x)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if i in take:
                taken.append(self._stage_norm(i, x))
        return x, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._run_stages(x, last=len(self.stages) - 1)
        return self.norm(x.mean(dim=(-2, -1)))  # global average pool, then LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # ----------------------------------------------------------------------------------------------
    # Multi-scale features (timm's `forward_intermediates` API)
    # ----------------------------------------------------------------------------------------------
    def _take_indices(self, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
        """`indices` as `forward_intermediates` takes it -> (absolute stage indices, the largest).

        None: every stage; an int n: the last n stages; a sequence: those stages, negative ones
        counted from the end. An index out of range raises ValueError.
        """
        count = len(self.stages)
        if indices is None:
            indices = count
        if isinstance(indices, int):
            if not 0 < indices <= count:
                raise ValueError(f"indices={indices}: taking the last n stages needs 1 <= n <= {count}")
            take = list(range(count - indices, count))
        else:
            take = [i + count if i < 0 else i for i in indices]
            if not take or any(not 0 <= i < count for i in take):
                raise ValueError(f"indices={list(indices)}: stage indices go from {-count} to {count - 1}")
        return take, max(take)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense tasks (detection, segmentation), as timm's ConvNeXt returns them.

        Args:
            x: (N, C, H, W) images.
            indices: which stages: None = all four, an int n = the last n, a sequence = those
                stage indices (negative from the end). Outputs come in stage order.
            norm: accepted for timm compatibility; it changes nothing. timm's ConvNeXt applies its
                `norm_pre` to the last stage's map when norm=True, and for the pool -> norm -> fc
                head of the official weights (head_norm_first=False: every timm `convnext*` model but
                `convnext_tiny_hnf`) `norm_pre` is the identity: its final
                LayerNorm, like our `norm`, acts on pooled vectors, not on maps. So norm=True
                returns the very tensors norm=False does, in timm and here.
            stop_early: run no stage past the last requested one.
            output_fmt: only "NCHW".
            intermediates_only: return the list of stage maps alone.

        Returns:
            The stage maps, stage i of shape (N, dims[i], H / 2**(i+2), W / 2**(i+2)): the output
            of that stage's blocks, through `norm{i}` when the model has `stage_norms`. Unless
            `intermediates_only`, a tuple (final map, stage maps) whose final map is the raw output
            of the last stage run (all four unless `stop_early`), never through a stage norm: for the
            full network, `model.head(model.norm(final.mean((-2, -1))))` is `model(x)`.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: ConvNeXt features are only available as 'NCHW'")
        take, max_index = self._take_indices(indices)
        # The stages past the last requested one are skipped when their output would be discarded
        # anyway: with `stop_early`, or when only the intermediates are returned.
        last = max_index if stop_early or intermediates_only else len(self.stages) - 1
        x, intermediates = self._run_stages(x, last=last, take=take)
        return intermediates if intermediates_only else (x, intermediates)

    def _stage_norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, f"norm{index}", None)
        return x if norm is None else norm(x)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the modules that `forward_intermediates(x, indices)` does not need, as timm does.

        Stages (with their downsampling layer and stage norm) past the last index in `indices` go.
        With `prune_head`, or when the last stage went, the classifier goes too: `norm` and `head`
        become identities and `num_classes` 0, so `model(x)` returns the pooled features of the last
        kept stage. `prune_norm` is accepted for timm compatibility and, as in timm for this head
        layout (its `norm_pre` is already the identity), removes nothing. Returns the absolute
        stage indices.
        """
        del prune_norm
        take, max_index = self._take_indices(indices)
        prune_end = max_index < len(self.stages) - 1
        for i in range(max_index + 1, len(self.stages)):
            if hasattr(self, f"norm{i}"):
                delattr(self, f"norm{i}")
        self.stages = self.stages[: max_index + 1]
        self.downsample_layers = self.downsample_layers[: max_index + 1]
        if prune_head or prune_end:
            self.norm = nn.Identity()
            self.head = nn.Identity()
            self.num_classes = 0
        return take


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
