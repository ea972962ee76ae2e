"""Building blocks shared by every ConvNeXt variant.

Parameter names follow the official facebookresearch code (`weight`/`bias` for LayerNorm, `gamma`/
`beta` for GRN), so official checkpoints load into our modules with no renaming.
"""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an (N, C, H, W) tensor.

    The official code normalises channels-first tensors with a hand-written mean/variance. We permute to
    (N, H, W, C) and call the fused `F.layer_norm` instead: the same maths, and with channels-last
    memory the permutes are free (the data already sits channel-innermost).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2, eq. 1-3) on (N, H, W, C) tensors.

    Each channel's spatial L2 norm is divided by the mean of those norms over the channels; the
    result rescales the input, with a learnable affine (gamma, beta) and a residual. gamma and beta
    start at zero, so a fresh GRN is the identity. Shapes (1, 1, 1, C) as in the official release.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm accumulates in float32: under bf16 autocast a sum of H*W squares loses precision.
        spatial_norm = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True, dtype=torch.float32)
        relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + self.eps)
        return (self.gamma * (x * relative) + self.beta + x).to(x.dtype)
