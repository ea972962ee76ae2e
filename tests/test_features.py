"""Multi-scale features for dense tasks: `forward_intermediates` (timm's API) and `stage_norms`."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import build_model, randomize_
from torch import nn

from convnext_train.models.layers import LayerNorm2d
from convnext_train.weights import official_to_timm

VARIANTS = ["convnext_atto", "convnextv2_atto"]
CLASSES = 10
SIZE = 64
DIMS = (40, 80, 160, 320)  # the atto widths (conf/model/*_atto.yaml)


def tiny(name: str, **overrides) -> nn.Module:
    return randomize_(build_model(name, num_classes=CLASSES, **overrides)).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def hooked_stage_outputs(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The output of each `model.stages[i]` during a plain `model(images)`, and its logits: the
    stage maps captured independently of `forward_intermediates`."""
    captured = {}
    handles = [
        stage.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out))
        for i, stage in enumerate(model.stages)
    ]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(model.stages))], logits


# --------------------------------------------------------------------------------------------------
# Values and shapes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_intermediates_are_the_stage_outputs_and_the_final_map_gives_the_logits(name, images):
    model = tiny(name)
    expected, logits = hooked_stage_outputs(model, images)
    final, features = model.forward_intermediates(images)

    assert [tuple(f.shape) for f in features] == [
        (2, dim, SIZE // stride, SIZE // stride) for dim, stride in zip(DIMS, (4, 8, 16, 32), strict=True)
    ]
    for feature, reference in zip(features, expected, strict=True):
        assert torch.equal(feature, reference)
    assert torch.equal(final, expected[-1])
    assert torch.equal(model.head(model.norm(final.mean(dim=(-2, -1)))), logits)
    # norm=True changes nothing (timm's norm_pre is the identity for this head layout).
    final_normed, features_normed = model.forward_intermediates(images, norm=True)
    assert torch.equal(final_normed, final)
    assert all(torch.equal(a, b) for a, b in zip(features_normed, features, strict=True))


@pytest.mark.parametrize(
    ("indices", "taken"),
    [(None, [0, 1, 2, 3]), (1, [3]), (3, [1, 2, 3]), ([0, 2], [0, 2]), ((-1, 0), [0, 3]), ([-3], [1])],
)
@torch.no_grad()
def test_indices_select_stages_in_stage_order(indices, taken, images):
    model = tiny("convnext_atto")
    expected, _ = hooked_stage_outputs(model, images)
    features = model.forward_intermediates(images, indices=indices, intermediates_only=True)
    assert isinstance(features, list)
    assert len(features) == len(taken)
    for feature, i in zip(features, taken, strict=True):
        assert torch.equal(feature, expected[i])


@pytest.mark.parametrize("indices", [0, 5, -1, [4], [-5], []])
def test_out_of_range_indices_are_rejected(indices, images):
    with pytest.raises(ValueError, match="indices"):
        tiny("convnext_atto").forward_intermediates(images, indices=indices)


def test_only_nchw_output_is_supported(images):
    with pytest.raises(ValueError, match="NCHW"):
        tiny("convnext_atto").forward_intermediates(images, output_fmt="NHWC")


@torch.no_grad()
def test_stop_early_runs_no_stage_past_the_last_requested(images):
    model = tiny("convnext_atto")
    expected, _ = hooked_stage_outputs(model, images)
    ran = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda *_, i=i: ran.append(i))

    final, features = model.forward_intermediates(images, indices=[0, 1], stop_early=True)
    assert ran == [0, 1]
    assert torch.equal(final, expected[1])  # the last stage run, as timm returns it
    assert all(torch.equal(f, e) for f, e in zip(features, expected[:2], strict=True))

    ran.clear()
    final, features = model.forward_intermediates(images, indices=[0, 1])
    assert ran == [0, 1, 2, 3]
    assert torch.equal(final, expected[3])
    assert len(features) == 2


# --------------------------------------------------------------------------------------------------
# Parity with timm's own forward_intermediates, same weights
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("norm", [False, True])
@torch.no_grad()
def test_equal_to_timm_forward_intermediates(name, norm, images):
    ours = tiny(name)
    reference = timm.create_model(name, pretrained=False, num_classes=CLASSES).eval()
    reference.load_state_dict(official_to_timm(ours.state_dict(), reference), strict=True)

    for kwargs in ({}, {"indices": [1, -4], "stop_early": True}, {"indices": 2, "intermediates_only": True}):
        got = ours.forward_intermediates(images, norm=norm, **kwargs)
        want = reference.forward_intermediates(images, norm=norm, **kwargs)
        if kwargs.get("intermediates_only"):
            got, want = (None, got), (None, want)
        else:
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert len(got[1]) == len(want[1])
        for a, b in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The features are not trivially close: they carry the randomized weights' signal.
    assert got[1][-1].abs().mean() > 0.1


# --------------------------------------------------------------------------------------------------
# Per-stage LayerNorms of the official detection / segmentation backbones
# --------------------------------------------------------------------------------------------------
def test_default_model_has_no_stage_norms():
    for name in VARIANTS:
        keys = build_model(name, num_classes=CLASSES).state_dict().keys()
        assert not [k for k in keys if k.startswith(("norm0", "norm1", "norm2", "norm3"))]
        assert {k for k in keys if not k.startswith(("stages.", "downsample_layers."))} == {
            "norm.weight",
            "norm.bias",
            "head.weight",
            "head.bias",
        }


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_stage_norms_are_named_officially_and_applied(name, images):
    model = tiny(name, stage_norms=True)
    plain = tiny(name)
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra == {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    for i, dim in enumerate(DIMS):
        norm = getattr(model, f"norm{i}")
        assert isinstance(norm, LayerNorm2d) and norm.normalized_shape == (dim,) and norm.eps == 1e-6

    expected, logits = hooked_stage_outputs(model, images)
    final, features = model.forward_intermediates(images)
    for i, (feature, stage_output) in enumerate(zip(features, expected, strict=True)):
        norm = getattr(model, f"norm{i}")
        # A channels-first LayerNorm, written out as the official backbone computes it.
        mean = stage_output.mean(1, keepdim=True)
        var = (stage_output - mean).pow(2).mean(1, keepdim=True)
        reference = (stage_output - mean) / torch.sqrt(var + 1e-6)
        reference = norm.weight[:, None, None] * reference + norm.bias[:, None, None]
        torch.testing.assert_close(feature, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(feature, stage_output, atol=1e-2)
    # The final map and the classifier path ignore the stage norms.
    assert torch.equal(final, expected[-1])
    assert torch.equal(model.head(model.norm(final.mean(dim=(-2, -1)))), logits)
    # The parameters shared with the plain model give it the same logits once loaded.
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in extra}, strict=True)
    assert torch.equal(plain(images), logits)


@torch.no_grad()
def test_official_backbone_checkpoint_loads_after_stripping_the_prefix(images):
    # An mmdet/mmseg-style checkpoint: `backbone.` + the official backbone's names (its stem,
    # stages and norm0..norm3; no classifier), beside the detector's other parts.
    source = tiny("convnext_atto", stage_norms=True)
    backbone = {
        f"backbone.{k}": v.clone() for k, v in source.state_dict().items() if not k.startswith(("norm.", "head."))
    }
    checkpoint = {
        **backbone,
        "neck.lateral_convs.0.conv.weight": torch.zeros(1),
        "decode_head.conv_seg.bias": torch.zeros(1),
    }
    assert {"backbone.norm0.weight", "backbone.norm3.bias"} <= checkpoint.keys()

    target = build_model("convnext_atto", num_classes=CLASSES, stage_norms=True).eval()
    stripped = {k.removeprefix("backbone."): v for k, v in checkpoint.items() if k.startswith("backbone.")}
    result = target.load_state_dict(stripped, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    got = target.forward_intermediates(images, intermediates_only=True)
    want = source.forward_intermediates(images, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # The plain model has nowhere to put the stage norms.
    result = build_model("convnext_atto", num_classes=CLASSES).load_state_dict(stripped, strict=False)
    assert sorted(result.unexpected_keys) == sorted(k for k in stripped if k.startswith("norm"))


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing, pruning
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_grad_checkpointing_gives_equal_intermediates_and_gradients(name, images):
    model = tiny(name, stage_norms=True)
    results = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        x = images.clone().requires_grad_(True)
        final, features = model.forward_intermediates(x)
        sum(f.square().mean() for f in features).backward()
        weight_grad = model.stages[0][0].dwconv.weight.grad
        results.append((final.detach(), [f.detach() for f in features], x.grad, weight_grad))
    (final_a, feats_a, grad_a, wgrad_a), (final_b, feats_b, grad_b, wgrad_b) = results
    assert torch.equal(final_a, final_b)
    assert all(torch.equal(a, b) for a, b in zip(feats_a, feats_b, strict=True))
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wgrad_b, wgrad_a, rtol=1e-5, atol=1e-6)
    assert grad_a.abs().sum() > 0


@torch.no_grad()
def test_prune_intermediate_layers_keeps_the_requested_features(images):
    model = tiny("convnext_atto", stage_norms=True)
    expected = model.forward_intermediates(images, indices=[0, 2], intermediates_only=True)
    assert model.prune_intermediate_layers([0, 2]) == [0, 2]
    assert len(model.stages) == len(model.downsample_layers) == 3
    assert not hasattr(model, "norm3") and hasattr(model, "norm2")
    assert not any(k.startswith(("head.", "norm.", "stages.3.", "downsample_layers.3.")) for k in model.state_dict())
    got = model.forward_intermediates(images, indices=[0, 2], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert model(images).shape == (2, DIMS[2])  # pooled features of the last kept stage
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(images, indices=[3])
