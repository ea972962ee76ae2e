"""The ConvNeXt family: every config builds, sizes match the papers, weights match timm's models."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import MODEL_NAMES, build_model, randomize_
from timm.models.convnext import checkpoint_filter_fn

from convnext_train.models import TIMM_NAMES, ConvNeXt, ConvNeXtIsotropic, ConvNeXtV2
from convnext_train.models.complexity import count_gmacs, count_params

ISOTROPIC = ["convnext_iso_s", "convnext_iso_b", "convnext_iso_l"]
# Variants of 150M+ parameters take seconds to initialise and GBs of memory on the CPU.
LARGE = {"convnext_l", "convnext_xl", "convnextv2_l", "convnextv2_h", "convnext_iso_l"}


def large_marked(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in names]


def test_every_config_is_known_here():
    """A new conf/model/*.yaml must be added to the parity tables above (or to ISOTROPIC)."""
    assert set(MODEL_NAMES) == set(TIMM_NAMES) | set(ISOTROPIC)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config_instantiates_with_the_common_arguments(name):
    overrides = dict(num_classes=7, in_chans=1, drop_path_rate=0.3, head_init_scale=0.5)
    model = build_model(name, device="meta", **overrides)
    assert isinstance(model, (ConvNeXt, ConvNeXtIsotropic))
    assert model.head.out_features == 7
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1


@pytest.mark.parametrize("name", large_marked(MODEL_NAMES))
def test_config_builds_and_runs_for_real(name):
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------
# Sizes: parameters and GMACs
# --------------------------------------------------------------------------------------------------
def test_paper_parameter_counts():
    assert count_params(build_model("convnext_t", device="meta")) == 28_589_128
    assert count_params(build_model("convnext_l", device="meta")) == 197_767_336


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_parameter_count_equals_timm(name):
    with torch.device("meta"):
        reference = timm.create_model(TIMM_NAMES[name], pretrained=False)
    assert count_params(build_model(name, device="meta")) == count_params(reference)


@pytest.mark.parametrize(
    "name, depth, dim, layer_scale, paper_millions",
    [
        ("convnext_iso_s", 18, 384, False, 22),
        ("convnext_iso_b", 18, 768, False, 87),
        ("convnext_iso_l", 36, 1024, True, 306),
    ],
)
def test_isotropic_parameter_counts(name, depth, dim, layer_scale, paper_millions):
    """timm has no isotropic ConvNeXt: count by hand from the paper's description, check the paper's M."""
    stem = 3 * dim * 16 * 16 + dim
    block = (dim * 49 + dim) + 2 * dim + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim) + (dim if layer_scale else 0)
    expected = stem + depth * block + 2 * dim + (dim * 1000 + 1000)
    got = count_params(build_model(name, device="meta"))
    assert got == expected
    assert round(got / 1e6) == paper_millions


# The papers' GMACs. Our counter takes conv and linear layers only, as the paper's tables do. The
# paper prints B at 384 as 45.0 where the conv + linear count is 45.12, hence a 0.3% tolerance.
PAPER_GMACS = [
    ("convnext_t", 224, 4.5),
    ("convnext_s", 224, 8.7),
    ("convnext_b", 224, 15.4),
    ("convnext_l", 224, 34.4),
    ("convnext_xl", 224, 60.9),
    ("convnext_b", 384, 45.0),
    ("convnext_l", 384, 101.0),
    ("convnext_iso_s", 224, 4.3),
    ("convnext_iso_b", 224, 16.9),
    ("convnext_iso_l", 224, 59.7),
    ("convnextv2_atto", 224, 0.55),
    ("convnextv2_nano", 224, 2.45),
    ("convnextv2_h", 224, 115.0),
]


@pytest.mark.parametrize("name, img_size, paper", PAPER_GMACS)
def test_gmacs_match_the_papers(name, img_size, paper):
    gmacs = count_gmacs(build_model(name, device="meta"), img_size)
    assert gmacs == pytest.approx(paper, rel=3e-3, abs=0.05)


def test_gmacs_scale_with_resolution_and_count_depthwise_convs_by_group():
    model = build_model("convnext_t", device="meta")
    # The network is fully convolutional up to the pool: cost grows with the pixel count (the head
    # is a rounding error), so 448 px is ~4x 224 px.
    assert count_gmacs(model, 448) / count_gmacs(model, 224) == pytest.approx(4.0, rel=1e-3)
    dwconv = build_model("convnext_t", device="meta").stages[0][0].dwconv
    # 96 channels, 7x7 taps each, at 56x56: a dense count would be 96x larger.
    tiny = torch.nn.Sequential(dwconv)
    assert count_gmacs(tiny, 56) == pytest.approx(96 * 49 * 56 * 56 / 1e9)


# --------------------------------------------------------------------------------------------------
# Parity with timm's implementation, weights moved by timm's own converter
# --------------------------------------------------------------------------------------------------
# Each variant keeps its depths and layout (layer scale, GRN, timm's 1x1-conv MLP for atto..nano) at
# these widths: the converter renames tensors, which the width only shapes. ConvNeXt-T also runs at
# its own width, so a width-dependent mistake would still show.
NARROW = {"dims": [16, 32, 48, 64]}


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_logits_match_timm_through_timm_converter(name):
    narrow = {} if name == "convnext_t" else NARROW
    ours = randomize_(build_model(name, **narrow)).eval()
    with torch.device("meta"):
        reference = timm.create_model(TIMM_NAMES[name], pretrained=False, **narrow)
    converted = checkpoint_filter_fn({"model": ours.state_dict()}, reference)
    reference.load_state_dict(converted, strict=True, assign=True)
    reference.eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = reference(image), ours(image)
    assert expected.std() > 1e-2, "logits too flat for the comparison to mean anything"
    assert (got - expected).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------------
# Initialisation and stochastic depth, as the paper describes them
# --------------------------------------------------------------------------------------------------
def test_truncated_normal_init_zero_bias_and_scaled_head():
    model = build_model("convnext_nano", head_init_scale=1.0)
    torch.manual_seed(0)
    plain = build_model("convnext_nano", head_init_scale=1.0)
    torch.manual_seed(0)
    scaled = build_model("convnext_nano", head_init_scale=0.001)
    assert torch.allclose(scaled.head.weight, plain.head.weight * 0.001)
    pw = model.stages[3][0].pwconv1.weight
    assert pw.std().item() == pytest.approx(0.02, rel=0.05)
    assert pw.abs().max() <= 2.0
    assert all(m.bias.abs().max() == 0 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert torch.equal(model.stages[0][0].gamma, torch.full((80,), 1e-6))
    assert model.norm.weight.eq(1).all() and model.norm.bias.eq(0).all()


def test_v2_has_grn_and_no_layer_scale():
    model = build_model("convnextv2_atto")
    block = model.stages[1][0]
    assert not hasattr(block, "gamma")
    assert block.grn.gamma.shape == (1, 1, 1, 4 * 80)
    assert all("gamma" not in k or ".grn." in k for k in model.state_dict())


@pytest.mark.parametrize("name", ["convnext_t", "convnextv2_t", "convnext_iso_s"])
def test_stochastic_depth_grows_linearly_over_blocks(name):
    model = build_model(name, drop_path_rate=0.3, device="meta")
    blocks = [m for m in model.modules() if hasattr(m, "dwconv")]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    expected = torch.linspace(0, 0.3, len(blocks)).tolist()
    assert rates == pytest.approx(expected)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)


def test_zero_layer_scale_means_no_gamma_parameter():
    model = build_model("convnext_iso_s", device="meta")
    assert not any(k.endswith("gamma") for k in model.state_dict())
    model = build_model("convnext_iso_s", device="meta", layer_scale_init_value=1e-6)
    assert any(k.endswith("gamma") for k in model.state_dict())


def test_wrong_stage_count_is_refused():
    with pytest.raises(ValueError, match="4 stages"):
        ConvNeXt(depths=(1, 1, 1), dims=(8, 16, 32))


# --------------------------------------------------------------------------------------------------
# Speed-ready: channels-last, autocast, gradient checkpointing, torch.compile
# --------------------------------------------------------------------------------------------------
TINY = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), num_classes=10)


@pytest.mark.parametrize("cls", [ConvNeXt, ConvNeXtV2])
def test_channels_last_gives_the_same_logits(cls):
    model = randomize_(cls(**TINY)).eval()
    image = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(image)
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(image.to(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("cls", [ConvNeXt, ConvNeXtV2])
def test_bf16_autocast_stays_close_to_fp32(cls):
    model = randomize_(cls(**TINY)).eval()
    image = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(image)
    assert got.dtype == torch.bfloat16
    error = (got.float() - expected).norm() / expected.norm()
    assert error < 0.03


@pytest.mark.parametrize(
    "cls, kwargs", [(ConvNeXt, TINY), (ConvNeXtV2, TINY), (ConvNeXtIsotropic, dict(depth=6, dim=32, num_classes=10))]
)
def test_gradient_checkpointing_gives_the_same_gradients(cls, kwargs):
    image = torch.randn(2, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = cls(**kwargs, drop_path_rate=0.2, grad_checkpointing=checkpointing).train()
        torch.manual_seed(1)  # the same drop-path draws in both runs (checkpoint replays the RNG)
        model(image).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = randomize_(ConvNeXtV2(**TINY)).eval()
    image = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        expected, got = model(image), compiled(image)
    assert torch.allclose(got, expected, atol=1e-4)
