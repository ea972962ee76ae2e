"""The paper's roadmap (ConvNeXt paper, section 2 and Figure 2; appendix C, Tables 10 and 11): one
network whose arguments span every step from a ResNet to a ConvNeXt, one design change at a time.

    RoadmapNet()                              # torchvision's ResNet-50, exactly
    RoadmapNet(depths=(3, 3, 9, 3), ...)      # each later step: conf/model/roadmap_r50/<step>.yaml

Each argument is one of the paper's changes, named as the paper names it:
- `depths`, `widths`: blocks per stage and each stage's bottleneck width (ResNet-50: 64..512, Swin-T's
  96..768 after "increase width");
- `stem`: "resnet" (7x7 stride-2 conv, norm, activation, 3x3 stride-2 max pool) or "patchify" (4x4
  stride-4 conv, then a norm);
- `groups`: 1 for ResNet's dense 3x3, or "depthwise" (one group per channel, ResNeXt-ified);
- `inverted`: the block's hidden width is 4x its input and output (`expansion` 4) instead of a
  quarter (`expansion` 1/4 of the 4x-wide stage output, as ResNet's bottleneck);
- `spatial_first`: the spatial (depthwise) conv moved up to the start of the block;
- `kernel_size`: of the spatial conv (3, 5, 7, 9, 11);
- `act`: "relu" or "gelu"; `activations`: "every" (after every conv but the block's last, and after the
  residual sum, as ResNet) or "one" (only between the two 1x1 convs, as a Transformer's MLP);
- `norms`: "every" (after every conv, as ResNet) or "one" (only after the spatial conv);
  `norm`: "batch" or "layer" (channels-first LayerNorm, eps 1e-6, as ConvNeXt);
- `downsampling`: "in_block" (the first block of stages 2-4 strides its spatial conv and projects its
  shortcut with a strided 1x1 conv, as ResNet) or "separate" (LayerNorm then a 2x2 stride-2 conv between
  stages; with it, the norm after the stem and after the global pool, as ConvNeXt).

Names. Wherever ConvNeXt has a tensor, this network's tensor has ConvNeXt's official name and shape
(`downsample_layers.0.0.weight`, `stages.2.5.dwconv.weight`, `stages.2.5.pwconv1.weight` as a Linear's
(out, in), `gamma`, `norm`, `head`), so the last step's state dict IS ConvNeXt-T's (-B's) and every format
of those weights loads into it strictly. The spatial conv is `dwconv` at every step (dense until the
"depthwise conv" step: named for what it becomes); the norms after the two 1x1 convs, which ConvNeXt does
not have, are `norm1` and `norm2`, the projection shortcut `shortcut.0` (conv) and `shortcut.1` (norm).
torchvision's and timm's ResNet names map onto these one to one (weights/layouts.py, `resnet_to_official`).

The 1x1 convs hold (out, in) matrices and run as 1x1 convolutions on channels-first maps: one memory
layout for BatchNorm and LayerNorm alike, while their weights keep ConvNeXt's Linear shape.

Written here rather than taken from a library: none ships the intermediate models (timm's ResNet and
ConvNeXt classes each cover one end), and the paper's FLOP counts depend on details only a single
parameterised network keeps consistent across steps (tests/test_roadmap.py checks every step's count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from convnext_train.models.convnext import drop_path_rates
from convnext_train.models.layers import LayerNorm2d

STEMS = ("resnet", "patchify")
NORMS = ("batch", "layer")
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}
PLACEMENTS = ("every", "one")
DOWNSAMPLINGS = ("in_block", "separate")


def make_norm(kind: str, dim: int) -> nn.Module:
    return nn.BatchNorm2d(dim) if kind == "batch" else LayerNorm2d(dim, eps=1e-6)


def init_weights(module: nn.Module) -> None:
    """The recipe's initialisation at every step (paper Table 5: truncated normal, std .02, zero bias),
    as ConvNeXt's `init_weights`, for the 1x1 convs too. Norms start at weight 1, bias 0, except the last
    norm of each block's branch (`norm2`), which starts at 0 so that every block begins as the identity:
    timm's ResNet default (`zero_init_last`), what its ResNet recipes were tuned with."""
    if isinstance(module, (nn.Conv2d, nn.Linear, Pointwise)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RoadmapBlock) and isinstance(module.norm2, (nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.zeros_(module.norm2.weight)


class Pointwise(nn.Module):
    """A 1x1 convolution whose weight is stored as a Linear's (out, in) matrix, ConvNeXt's shape."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, bias={self.bias is not None}"


class RoadmapBlock(nn.Module):
    """One residual block of the design space.

    Order of the three convs: ResNet's pwconv1 (1x1) -> dwconv (k x k) -> pwconv2 (1x1), or with
    `spatial_first` dwconv -> pwconv1 -> pwconv2. A conv followed by a BatchNorm has no bias (the norm's
    shift replaces it, as in ResNet); every other conv has one (as in ConvNeXt).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int,
        *,
        stride: int,
        kernel_size: int,
        depthwise: bool,
        spatial_first: bool,
        act: str,
        activations: str,
        norms: str,
        norm: str,
        layer_scale_init_value: float,
        drop_path: float,
    ):
        super().__init__()
        self.spatial_first = spatial_first
        self.post_act = ACTS[act]() if activations == "every" else nn.Identity()
        every_norm = norms == "every"
        bias = norm != "batch"

        def normed(dim: int, present: bool) -> nn.Module:
            return make_norm(norm, dim) if present else nn.Identity()

        spatial_dim = in_dim if spatial_first else hidden
        self.dwconv = nn.Conv2d(
            spatial_dim,
            spatial_dim,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=spatial_dim if depthwise else 1,
            bias=bias,
        )
        self.norm = normed(spatial_dim, True)
        pw1_in = in_dim
        self.pwconv1 = Pointwise(pw1_in, hidden, bias=bias or not every_norm)
        self.norm1 = normed(hidden, every_norm)
        self.pwconv2 = Pointwise(hidden, out_dim, bias=bias or not every_norm)
        self.norm2 = normed(out_dim, every_norm)
        # Activations: "every" puts one after each conv but the last (and post_act after the sum);
        # "one" keeps only the one after pwconv1, between the two 1x1 convs.
        self.act_spatial = ACTS[act]() if activations == "every" else nn.Identity()
        self.act1 = ACTS[act]()
        self.gamma = (
            nn.Parameter(torch.full((out_dim,), float(layer_scale_init_value))) if layer_scale_init_value > 0 else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or in_dim != out_dim:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=bias), normed(out_dim, True)
            )

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        spatial = lambda t: self.act_spatial(self.norm(self.dwconv(t)))  # noqa: E731
        if self.spatial_first:
            x = spatial(x)
            x = self.act1(self.norm1(self.pwconv1(x)))
        else:
            x = self.act1(self.norm1(self.pwconv1(x)))
            x = spatial(x)
        x = self.norm2(self.pwconv2(x))
        if self.gamma is not None:
            x = self.gamma[:, None, None] * x
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_act(self.shortcut(x) + self.drop_path(self.branch(x)))


class RoadmapNet(nn.Module):
    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "resnet",
        stem_width: int | None = None,
        inverted: bool = False,
        depthwise: bool = False,
        spatial_first: bool = False,
        kernel_size: int = 3,
        act: str = "relu",
        activations: str = "every",
        norms: str = "every",
        norm: str = "batch",
        downsampling: str = "in_block",
        layer_scale_init_value: float = 0.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        head_init_scale: float = 1.0,
    ):
        super().__init__()
        for name, value, allowed in (
            ("stem", stem, STEMS),
            ("norm", norm, NORMS),
            ("act", act, tuple(ACTS)),
            ("activations", activations, PLACEMENTS),
            ("norms", norms, PLACEMENTS),
            ("downsampling", downsampling, DOWNSAMPLINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"the roadmap's networks have 4 stages: got depths={list(depths)}, widths={list(widths)}")
        self.num_classes = num_classes
        # Stage output widths: ResNet's bottleneck outputs 4x its width; the inverted block outputs its width.
        dims = list(widths) if inverted else [4 * w for w in widths]
        hiddens = [4 * w for w in widths] if inverted else list(widths)
        stem_width = stem_width or widths[0]
        separate = downsampling == "separate"

        if stem == "resnet":
            stem_layers = [
                nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=norm != "batch"),
                make_norm(norm, stem_width),
                ACTS[act](),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        else:
            stem_layers = [nn.Conv2d(in_chans, stem_width, 4, stride=4), make_norm(norm, stem_width)]
        self.downsample_layers = nn.ModuleList([nn.Sequential(*stem_layers)])
        if separate:
            for i in range(3):
                self.downsample_layers.append(
                    nn.Sequential(make_norm(norm, dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
                )

        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        self.stages = nn.ModuleList()
        in_dim = stem_width
        for i, (depth, dim, hidden) in enumerate(zip(depths, dims, hiddens, strict=True)):
            blocks = []
            for j in range(depth):
                first = j == 0
                if separate and first and i > 0:
                    in_dim = dims[i]  # the downsampling layer has already changed the width
                blocks.append(
                    RoadmapBlock(
                        in_dim,
                        dim,
                        hidden,
                        stride=2 if first and i > 0 and not separate else 1,
                        kernel_size=kernel_size,
                        depthwise=depthwise,
                        spatial_first=spatial_first,
                        act=act,
                        activations=activations,
                        norms=norms,
                        norm=norm,
                        layer_scale_init_value=layer_scale_init_value,
                        drop_path=next(rates),
                    )
                )
                in_dim = dim
            self.stages.append(nn.Sequential(*blocks))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6) if separate else nn.Identity()
        self.head = nn.Linear(dims[-1], num_classes)

        self.apply(init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            if i < len(self.downsample_layers):
                x = self.downsample_layers[i](x)
            x = stage(x)
        return self.norm(x.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
