"""AdamW over the official ConvNeXt parameter groups: selective weight decay and layer-wise lr decay.

Weight decay (official `get_parameter_groups`): none on 1-D parameters (norm weights and biases, V1
layer scale `gamma`), on biases, or on parameters named `*.gamma` / `*.beta`: the ConvNeXt V2 code
adds that name rule because GRN's gamma and beta are (1, 1, 1, C) tensors that the shape rule misses.
Every convolution and linear weight is decayed.

Layer-wise lr decay (fine-tuning): parameter `p` trains at `lr * layer_decay ** (L + 1 - layer_id(p))`
where `L = num_layers(model)`: the head (id L + 1) at the full lr, each layer below it at `layer_decay`
times the one above. The layer ids come from the official code where it defines them and extend it to
every variant here:

- Hierarchical ConvNeXt, V1 and V2, with depths (3, 3, 27, 3) (S/B/L/XL, V2 B/L/H): the official V1
  grouping `get_num_layer_for_convnext`, L = 12. Stem 0; stage 0 is 1; downsampling 1 and stage 1 are 2;
  downsampling 2 and stage 2 in nine groups of three blocks are 3..11; downsampling 3 and stage 3 are 12.
  The V2 fine-tuning recipe uses this same grouping (`--layer_decay_type group`) for V2 B and L.
- Hierarchical ConvNeXt with other depths (T, atto..nano, V2 atto..T), which the V1 code refuses:
  ConvNeXt V2's own rule for them, `get_num_layer_for_convnext_single` (`--layer_decay_type single`,
  used by its atto and tiny fine-tuning recipes): every block is its own layer, numbered 1..sum(depths)
  in forward order, so L = sum(depths); a downsampling layer shares the id of the first block it
  feeds, the stem included (so id 0 is unused). We take the authors' own extension rather than invent
  a grouping: the V1 rule's 12 layers exist only to cut a 27-block stage 2 into threes, and per-block
  ids are the BEiT convention that rule was adapted from.
- Isotropic ConvNeXt: the BEiT/ViT convention the official rule was adapted from: stem 0, block j is
  j + 1, L = depth.
- Everything else (final `norm`, `head`) is L + 1 in all three.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from convnext_train.errors import UserError
from convnext_train.models import ConvNeXt, ConvNeXtIsotropic

# The only depths the official layer grouping is written for (ConvNeXt S/B/L/XL, V2 B/L/H).
GROUPED_DEPTHS = (3, 3, 27, 3)
GROUPED_NUM_LAYERS = 12
BLOCKS_PER_GROUP = 3

# Parameters that are not 1-D yet must not be decayed: GRN's (1, 1, 1, C) gamma and beta.
NO_DECAY_SUFFIXES = (".bias", ".gamma", ".beta")


# --------------------------------------------------------------------------------------------------
# Layer ids
# --------------------------------------------------------------------------------------------------
def num_layers(model: nn.Module) -> int:
    """L, the id of the topmost decayed layer; the head and final norm are L + 1."""
    if isinstance(model, ConvNeXt):
        depths = _stage_depths(model)
        return GROUPED_NUM_LAYERS if depths == GROUPED_DEPTHS else sum(depths)
    if isinstance(model, ConvNeXtIsotropic):
        return len(model.blocks)
    raise TypeError(f"layer-wise lr decay needs a ConvNeXt or ConvNeXtIsotropic, got {type(model).__name__}")


def layer_id(name: str, model: nn.Module) -> int:
    """The layer id of parameter `name` of `model` (the unwrapped model's `named_parameters` names)."""
    top = num_layers(model) + 1
    parts = name.split(".")
    if isinstance(model, ConvNeXtIsotropic):
        if parts[0] == "stem":
            return 0
        return int(parts[1]) + 1 if parts[0] == "blocks" else top

    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
    elif parts[0] == "downsample_layers":
        stage, block = int(parts[1]), 0  # a downsampling layer goes with the first block it feeds
    else:
        return top

    depths = _stage_depths(model)
    if depths != GROUPED_DEPTHS:
        return sum(depths[:stage]) + block + 1
    if parts[0] == "downsample_layers" and stage == 0:
        return 0
    if stage == 2:
        return 3 + block // BLOCKS_PER_GROUP
    return {0: 1, 1: 2, 3: GROUPED_NUM_LAYERS}[stage]  # stages of 3 blocks are one group each


def _stage_depths(model: ConvNeXt) -> tuple[int, ...]:
    return tuple(len(stage) for stage in model.stages)


# --------------------------------------------------------------------------------------------------
# Parameter groups and the optimizer
# --------------------------------------------------------------------------------------------------
def is_decayed(name: str, param: torch.Tensor, decay_grn: bool = False) -> bool:
    """Whether weight decay applies: not to 1-D parameters, biases, layer scale or GRN (GRN too with
    `decay_grn`: the FCMAE pre-training's rule, timm 0.3.2's `add_weight_decay`, which knows only the
    1-D and bias rules, so its GRN parameters and the mask token are decayed)."""
    if decay_grn:
        return param.ndim > 1 and not name.endswith(".bias")
    return param.ndim > 1 and not name.endswith(NO_DECAY_SUFFIXES)


def parameter_groups(
    model: nn.Module, *, weight_decay: float, layer_decay: float, decay_grn: bool = False
) -> list[dict[str, Any]]:
    """Optimizer groups, each `{"name", "params", "weight_decay", "lr_scale"}`.

    With `layer_decay == 1.0` there are two groups, "decay" and "no_decay", both at lr_scale 1.0, and
    any model works. Otherwise one group per (layer id, decay), named `layer_<id>_decay` /
    `layer_<id>_no_decay` as in the official logs. Groups are ordered by layer id, no-decay first;
    parameters keep the model's `named_parameters` order. Frozen parameters are left out.
    """
    use_layer_decay = layer_decay != 1.0
    # Without layer decay every parameter counts as the top layer, whose lr_scale is 1.
    top = num_layers(model) + 1 if use_layer_decay else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = is_decayed(name, param, decay_grn)
        layer = layer_id(name, model) if use_layer_decay else top
        if (layer, decayed) not in groups:
            kind = "decay" if decayed else "no_decay"
            groups[(layer, decayed)] = {
                "name": f"layer_{layer}_{kind}" if use_layer_decay else kind,
                "params": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr_scale": layer_decay ** (top - layer),
            }
        groups[(layer, decayed)]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: DictConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW from a `conf/optimizer` node, over `parameter_groups(model)`.

    Every group starts at `cfg.lr`; the trainer calls `set_lr` before each step. On CUDA the fused
    kernel updates all parameters in a few launches; elsewhere PyTorch picks its default.
    """
    if cfg.name != "adamw":
        raise UserError(f"optimizer.name={cfg.name!r} is not supported: the ConvNeXt recipe uses 'adamw'")
    groups = parameter_groups(
        model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, decay_grn=cfg.get("decay_grn", False)
    )
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=True if device_type == "cuda" else None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group to the scheduled `lr` times its layer-decay `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
