"""Parameter and multiply-accumulate counts, the two columns of the paper's tables.

GMACs come from `torch.utils.flop_counter` (no new dependency), which counts the matrix work of
convolutions and linear layers; norms, GELU and pooling are left out, as in the paper's FLOP
counts. A model built on the meta device is counted without allocating its weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, img_size: int) -> float:
    """Multiply-accumulates (in units of 1e9) of one forward pass on one `img_size` image.

    Build the model under `torch.device("meta")` to count without allocating weights. Counted in
    evaluation mode (and left in the mode it was in): a BatchNorm model's forward then neither updates
    its running statistics nor needs more than one value per channel (a 1x1 map at 32 px).
    """
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    device = first_conv.weight.device
    image = torch.zeros(1, first_conv.in_channels, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()
    try:
        with counter, torch.no_grad():
            model(image)
    finally:
        model.train(training)
    return counter.get_total_flops() / 2 / 1e9  # the counter reports FLOPs = 2 x MACs
