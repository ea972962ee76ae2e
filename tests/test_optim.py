"""Parameter groups equal the official ConvNeXt ones; the optimizer and `set_lr` use them."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_NAMES, build_model
from omegaconf import OmegaConf
from torch import nn

from convnext_train.configs import CONFIG_DIR
from convnext_train.errors import UserError
from convnext_train.models import ConvNeXtIsotropic
from convnext_train.optim import build_optimizer, layer_id, num_layers, parameter_groups, set_lr

WEIGHT_DECAY = 0.05
# Depths (3, 3, 27, 3): the variants the official V1 layer grouping is written for.
GROUPED = ["convnext_s", "convnext_b", "convnext_l", "convnext_xl", "convnextv2_b", "convnextv2_l", "convnextv2_h"]
PER_BLOCK = [n for n in MODEL_NAMES if n not in GROUPED and "iso" not in n]
ISOTROPIC = [n for n in MODEL_NAMES if "iso" in n]


# --------------------------------------------------------------------------------------------------
# The official rules, re-stated from their published definitions (facebookresearch/ConvNeXt and
# ConvNeXt-V2, optim_factory.py)
# --------------------------------------------------------------------------------------------------
def official_grouped_layer_id(name: str) -> int:
    """`get_num_layer_for_convnext`: depths (3, 3, 27, 3) in 12 layers, head and norm 13."""
    kind, *rest = name.split(".")
    if kind == "downsample_layers":
        return [0, 2, 3, 12][int(rest[0])]
    if kind == "stages":
        stage, block = int(rest[0]), int(rest[1])
        return [1, 2, 3 + block // 3, 12][stage]
    return 13


def official_single_layer_id(name: str, depths: list[int]) -> int:
    """ConvNeXt V2 `get_num_layer_for_convnext_single`: one layer per block."""
    kind, *rest = name.split(".")
    if kind == "downsample_layers":
        return sum(depths[: int(rest[0])]) + 1
    if kind == "stages":
        return sum(depths[: int(rest[0])]) + int(rest[1]) + 1
    return sum(depths) + 1


def official_is_decayed(name: str, param: torch.Tensor) -> bool:
    """ConvNeXt V2 `get_parameter_groups` (V1's rule plus the `.gamma` / `.beta` names)."""
    return not (len(param.shape) == 1 or name.endswith((".bias", ".gamma", ".beta")))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def group_by_name(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    """Parameter name -> the one group holding it."""
    group_of = {id(p): group for group in groups for p in group["params"]}
    return {name: group_of[id(p)] for name, p in model.named_parameters()}


def forward_order(model: nn.Module) -> list[str]:
    """Parameter names in the order the forward pass uses them."""
    if isinstance(model, ConvNeXtIsotropic):
        parts = [("stem", model.stem), ("blocks", model.blocks)]
    else:
        parts = []
        for s in range(4):
            parts += [(f"downsample_layers.{s}", model.downsample_layers[s]), (f"stages.{s}", model.stages[s])]
    parts += [("norm", model.norm), ("head", model.head)]
    return [f"{prefix}.{name}" for prefix, module in parts for name, _ in module.named_parameters()]


@pytest.fixture(scope="module")
def meta_models() -> dict[str, nn.Module]:
    return {name: build_model(name, device="meta") for name in MODEL_NAMES}


def tiny_convnext() -> nn.Module:
    return build_model("convnext_atto", depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], num_classes=5)


# --------------------------------------------------------------------------------------------------
# Layer ids
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GROUPED)
def test_grouped_variants_match_the_official_layer_ids_and_scales(meta_models, name):
    model = meta_models[name]
    assert num_layers(model) == 12
    groups = group_by_name(model, parameter_groups(model, weight_decay=WEIGHT_DECAY, layer_decay=0.8))
    for param_name, _ in model.named_parameters():
        official = official_grouped_layer_id(param_name)
        assert layer_id(param_name, model) == official, param_name
        # The official code computes its scale table as layer_decay ** (num_layers + 1 - i): bitwise equal.
        assert groups[param_name]["lr_scale"] == 0.8 ** (12 + 1 - official), param_name


@pytest.mark.parametrize("name", PER_BLOCK)
def test_other_hierarchical_variants_follow_the_official_v2_per_block_rule(meta_models, name):
    model = meta_models[name]
    depths = [len(stage) for stage in model.stages]
    assert num_layers(model) == sum(depths)
    for param_name, _ in model.named_parameters():
        assert layer_id(param_name, model) == official_single_layer_id(param_name, depths), param_name


@pytest.mark.parametrize("name", ISOTROPIC)
def test_isotropic_variants_follow_the_beit_convention(meta_models, name):
    model = meta_models[name]
    depth = len(model.blocks)
    assert num_layers(model) == depth
    for param_name, _ in model.named_parameters():
        kind, *rest = param_name.split(".")
        if kind == "stem":
            expected = 0
        elif kind == "blocks":
            expected = int(rest[0]) + 1
        else:
            expected = depth + 1
        assert layer_id(param_name, model) == expected, param_name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layer_ids_rise_through_the_network_to_the_head(meta_models, name):
    model = meta_models[name]
    names = forward_order(model)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    ids = [layer_id(n, model) for n in names]
    assert ids == sorted(ids)
    top = num_layers(model) + 1
    assert {layer_id(n, model) for n in names if n.startswith(("norm.", "head."))} == {top}
    # No layer is skipped between the stem's id and the head's.
    assert set(ids) == set(range(ids[0], top + 1))


def test_convnext_s_has_fourteen_lr_scales(meta_models):
    groups = parameter_groups(meta_models["convnext_s"], weight_decay=WEIGHT_DECAY, layer_decay=0.8)
    assert len(groups) == 28  # every layer id 0..13 has both decayed weights and undecayed parameters
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == pytest.approx([0.8**k for k in range(13, -1, -1)], rel=1e-12)
    assert scales[0] == pytest.approx(0.054975581388800036) and scales[-1] == 1.0
    assert [g["name"] for g in groups[:2]] == ["layer_0_no_decay", "layer_0_decay"]


def test_layer_decay_needs_a_convnext():
    with pytest.raises(TypeError, match="ConvNeXt"):
        parameter_groups(nn.Linear(3, 4), weight_decay=WEIGHT_DECAY, layer_decay=0.8)


# --------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_decay", [1.0, 0.7])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_is_in_exactly_one_group(meta_models, name, layer_decay):
    model = meta_models[name]
    groups = parameter_groups(model, weight_decay=WEIGHT_DECAY, layer_decay=layer_decay)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weight_decay_applies_exactly_to_conv_and_linear_weights(meta_models, name):
    model = meta_models[name]
    groups = group_by_name(model, parameter_groups(model, weight_decay=WEIGHT_DECAY, layer_decay=0.7))
    layer_weights = {
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
    for param_name, param in model.named_parameters():
        expected = WEIGHT_DECAY if param_name in layer_weights else 0.0
        assert groups[param_name]["weight_decay"] == expected, param_name
        assert (expected > 0) == official_is_decayed(param_name, param), param_name


def test_grn_parameters_are_four_dimensional_and_not_decayed(meta_models):
    model = meta_models["convnextv2_t"]
    groups = group_by_name(model, parameter_groups(model, weight_decay=WEIGHT_DECAY, layer_decay=1.0))
    grn = {n: p for n, p in model.named_parameters() if ".grn." in n}
    assert len(grn) == 2 * sum(len(stage) for stage in model.stages)
    for param_name, param in grn.items():
        assert param.ndim == 4 and groups[param_name]["weight_decay"] == 0.0, param_name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_without_layer_decay_there_are_two_groups_at_full_lr(meta_models, name):
    groups = parameter_groups(meta_models[name], weight_decay=WEIGHT_DECAY, layer_decay=1.0)
    assert [(g["name"], g["weight_decay"], g["lr_scale"]) for g in groups] == [
        ("no_decay", 0.0, 1.0),
        ("decay", WEIGHT_DECAY, 1.0),
    ]


def test_groups_are_deterministic():
    def layout(model):
        groups = parameter_groups(model, weight_decay=WEIGHT_DECAY, layer_decay=0.8)
        names = {id(p): n for n, p in model.named_parameters()}
        return [(g["name"], [names[id(p)] for p in g["params"]]) for g in groups]

    first, second = build_model("convnext_t", device="meta"), build_model("convnext_t", device="meta")
    assert layout(first) == layout(second)


def test_frozen_parameters_are_left_out():
    model = build_model("convnext_t", device="meta")
    model.downsample_layers.requires_grad_(False)
    groups = parameter_groups(model, weight_decay=WEIGHT_DECAY, layer_decay=0.8)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------
def optimizer_config(**overrides):
    return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "optimizer" / "adamw.yaml"), overrides)


def test_set_lr_applies_each_groups_scale():
    model = tiny_convnext()
    optimizer = build_optimizer(model, optimizer_config(layer_decay=0.5), device_type="cpu")
    set_lr(optimizer, 0.1)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    assert len(set(scales)) == num_layers(model) + 1  # the per-block rule leaves id 0 unused
    for group in optimizer.param_groups:
        assert group["lr"] == 0.1 * group["lr_scale"]


def test_build_optimizer_returns_an_adamw_that_trains():
    model = tiny_convnext()
    cfg = optimizer_config(layer_decay=0.8)
    optimizer = build_optimizer(model, cfg, device_type="cpu")
    assert type(optimizer) is torch.optim.AdamW
    assert not optimizer.defaults["fused"]
    for group in optimizer.param_groups:
        assert group["lr"] == cfg.lr  # until the trainer's first set_lr
        assert group["betas"] == (0.9, 0.999) and group["eps"] == cfg.eps
        assert group["weight_decay"] in (0.0, cfg.weight_decay)

    before = [p.detach().clone() for p in model.parameters()]
    set_lr(optimizer, cfg.lr)
    model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).mean().backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_build_optimizer_uses_the_fused_kernel_on_cuda():
    # Construction only checks the parameters' types, so meta parameters stand in for CUDA ones.
    model = build_model("convnext_t", device="meta")
    optimizer = build_optimizer(model, optimizer_config(), device_type="cuda")
    assert optimizer.defaults["fused"] is True


def test_build_optimizer_refuses_another_optimizer_name():
    with pytest.raises(UserError, match="adamw"):
        build_optimizer(tiny_convnext(), optimizer_config(name="sgd"), device_type="cpu")
