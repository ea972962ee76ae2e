"""The paper's roadmap (ConvNeXt paper, section 2, Figure 2; appendix C, Tables 10 and 11): every step
builds from its config with the paper's count, the two ends are the reference models (their weights
load and give their logits), BatchNorm steps train right (weight decay, EMA statistics, compile,
bf16, channels-last). Trained through train.py: tests/test_roadmap_training.py."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_train import relative_difference

from convnext_train import configs
from convnext_train.ema import WeightEma
from convnext_train.models import ConvNeXt, RoadmapNet
from convnext_train.models.complexity import count_gmacs
from convnext_train.optim import parameter_groups
from convnext_train.weights import load_pretrained, load_weights

# Each regime's steps in the paper's order, with the GFLOPs its table prints (ConvNeXt paper,
# arXiv 2201.03545v2, appendix C: Table 10 for ResNet-50 -> ConvNeXt-T, Table 11 for ResNet-200 ->
# ConvNeXt-B) and the conv + linear multiply-accumulates we count, where they differ.
TABLE_10 = {
    "resnet50": 4.09,
    "stage_ratio": 4.53,
    "patchify_stem": 4.42,
    "depthwise_conv": 2.35,
    "wider": 5.27,
    "inverted_bottleneck": 4.64,
    "move_up_dwconv": 4.07,
    "kernel_5": 4.10,
    "kernel_7": 4.15,
    "kernel_9": 4.21,
    "kernel_11": 4.29,
    "gelu": 4.15,
    "fewer_activations": 4.15,
    "fewer_norms": 4.15,
    "layer_norm": 4.46,
    "separate_downsampling": 4.49,
}
# Table 10's last two entries do not count their models: BN -> LN changes no conv (Figure 2 prints
# 4.2 there, and Table 11 keeps the count at the same step), and the last step is ConvNeXt-T, whose
# conv + linear count is 4.4555 (Table 1 prints 4.5G) -- the 4.46 printed one row early.
TABLE_10_TYPOS = {"layer_norm": 4.15, "separate_downsampling": 4.46}
TABLE_11 = {
    "resnet200": 15.01,
    "stage_ratio": 14.52,
    "patchify_stem": 14.38,
    "depthwise_conv": 7.23,
    "wider": 16.76,
    "inverted_bottleneck": 15.68,
    "move_up_dwconv": 14.63,
    "kernel_5": 14.70,
    "kernel_7": 14.81,
    "kernel_9": 14.95,
    "kernel_11": 15.13,
    "gelu": 14.81,
    "fewer_activations": 14.81,
    "fewer_norms": 14.81,
    "layer_norm": 14.81,
    "separate_downsampling": 15.35,
}
EXPECTED_GMACS = {
    **{f"roadmap_r50/{step}": TABLE_10_TYPOS.get(step, gflops) for step, gflops in TABLE_10.items()},
    **{f"roadmap_r200/{step}": gflops for step, gflops in TABLE_11.items()},
}
# What each step's file changes from the one before (the figure's order; kernel 5/9/11 branch off
# move_up_dwconv, gelu follows kernel_7).
PREVIOUS = {
    "stage_ratio": "{first}",
    "patchify_stem": "stage_ratio",
    "depthwise_conv": "patchify_stem",
    "wider": "depthwise_conv",
    "inverted_bottleneck": "wider",
    "move_up_dwconv": "inverted_bottleneck",
    "kernel_5": "move_up_dwconv",
    "kernel_7": "move_up_dwconv",
    "kernel_9": "move_up_dwconv",
    "kernel_11": "move_up_dwconv",
    "gelu": "kernel_7",
    "fewer_activations": "gelu",
    "fewer_norms": "fewer_activations",
    "layer_norm": "fewer_norms",
    "separate_downsampling": "layer_norm",
}
# A step's one change may take two keys: R200's stage ratio widens in the same step (appendix C), and
# fewer_norms hands the branch's per-channel scale from its last BatchNorm to layer scale.
TWO_KEY_CHANGES = {("roadmap_r200", "stage_ratio"), ("roadmap_r50", "fewer_norms"), ("roadmap_r200", "fewer_norms")}
TINY = {"depths": [1, 2, 1, 1], "widths": [8, 8, 16, 16]}


def step_config(name: str, **overrides):
    cfg = configs.model(name)
    return OmegaConf.merge(cfg, overrides)


def build_step(name: str, device: str = "cpu", **overrides) -> RoadmapNet:
    with torch.device(device):
        return instantiate(step_config(name, **overrides))


# --------------------------------------------------------------------------------------------------
# Every step: its config, its count
# --------------------------------------------------------------------------------------------------
def test_every_step_of_both_regimes_has_a_config_and_nothing_else_is_there():
    for regime, first in (("roadmap_r50", "resnet50"), ("roadmap_r200", "resnet200")):
        files = {p.stem for p in (configs.CONFIG_DIR / "model" / regime).glob("*.yaml")}
        assert files == {first, *PREVIOUS}


# About a second a step to compose and count: the fast set checks both ends and the step whose count
# depends most on where a conv sits, the whole suite every step.
FAST_STEPS = {"roadmap_r50/resnet50", "roadmap_r50/move_up_dwconv", "roadmap_r50/separate_downsampling"}


def mostly_slow(names):
    return [n if n in FAST_STEPS else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", mostly_slow(sorted(EXPECTED_GMACS)))
def test_every_step_counts_the_papers_gmacs(name):
    model = build_step(name, device="meta")
    assert round(count_gmacs(model, 224), 2) == EXPECTED_GMACS[name]


@pytest.mark.slow  # two compositions a step: ~5 s a regime
@pytest.mark.parametrize("regime, first", [("roadmap_r50", "resnet50"), ("roadmap_r200", "resnet200")])
def test_each_step_file_holds_one_change_from_the_step_before(regime, first):
    for step, previous in PREVIOUS.items():
        previous = previous.format(first=first)
        own = OmegaConf.load(configs.CONFIG_DIR / "model" / regime / f"{step}.yaml")
        assert list(own.defaults) == [f"/model/{regime}/{previous}@_here_", "_self_"]
        changed = {key for key in own if key != "defaults"}
        assert len(changed) == (2 if (regime, step) in TWO_KEY_CHANGES else 1), step
        before, after = configs.model(f"{regime}/{previous}"), configs.model(f"{regime}/{step}")
        differs = {key for key in after if after[key] != before[key]}
        assert differs == changed, step


@pytest.mark.parametrize("name", ["roadmap_r50/resnet50", "roadmap_r50/kernel_9", "roadmap_r50/fewer_norms"])
def test_a_step_trains_at_a_tiny_size_with_a_finite_loss(name):
    model = build_step(name, num_classes=5, **TINY)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_bad_design_choices_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="norm='group': choose one of batch, layer"):
        RoadmapNet(norm="group")
    with pytest.raises(ValueError, match="4 stages"):
        RoadmapNet(depths=(3, 4, 6))


# --------------------------------------------------------------------------------------------------
# The two ends are the reference models
# --------------------------------------------------------------------------------------------------
def randomize_batch_norms_(model: torch.nn.Module) -> torch.nn.Module:
    """Statistics and affines far from their defaults, so that a norm loaded into the wrong place shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=generator) * 0.2 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model.eval()


def test_torchvisions_resnet50_file_loads_strictly_into_the_first_step_and_gives_its_logits(tmp_path):
    reference = randomize_batch_norms_(torchvision.models.resnet50())
    # The release's form: a bare state dict in a .pth file.
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(reference.state_dict(), path)
    ours = build_step("roadmap_r50/resnet50").eval()
    load_weights(ours, path)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(images), reference(images))
    # Fine-tuning takes it too, with a fresh head for another class count.
    few_classes = build_step("roadmap_r50/resnet50", num_classes=10)
    assert load_pretrained(few_classes, path)
    assert torch.equal(few_classes.stages[2][5].dwconv.weight, reference.layer3[5].conv2.weight)


@pytest.mark.slow  # timm's ResNet-200 and ConvNeXt-B: 65M and 89M parameters
def test_timms_resnet200_and_convnext_b_load_into_the_ends_of_the_r200_roadmap():
    reference = randomize_batch_norms_(timm.create_model("resnet200"))
    first = build_step("roadmap_r200/resnet200").eval()
    load_weights(first, reference.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(first(images), reference(images))
    convnext_b = timm.create_model("convnext_base").eval()
    last = build_step("roadmap_r200/separate_downsampling").eval()
    load_weights(last, convnext_b.state_dict())  # timm's layout, converted
    with torch.no_grad():
        torch.testing.assert_close(last(images), convnext_b(images), rtol=1e-4, atol=1e-4)


def test_convnext_t_weights_in_any_format_load_into_the_last_step_and_give_its_logits():
    generator = torch.Generator().manual_seed(0)
    official = ConvNeXt(layer_scale_init_value=1e-6).eval()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    last = build_step("roadmap_r50/separate_downsampling").eval()
    # The same names and shapes as ConvNeXt-T's: nothing to convert.
    assert {k: v.shape for k, v in last.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}
    images = torch.randn(2, 3, 64, 64)
    timm_model = timm.create_model("convnext_tiny")
    timm_model.load_state_dict(timm.models.convnext.checkpoint_filter_fn(official.state_dict(), timm_model))
    tv_model = torchvision.models.convnext_tiny()
    from convnext_train.weights.layouts import official_to_torchvision

    tv_model.load_state_dict(official_to_torchvision(official.state_dict()))
    with torch.no_grad():
        expected = official(images)
        for source in (official.state_dict(), timm_model.state_dict(), tv_model.state_dict()):
            load_weights(last, source)
            torch.testing.assert_close(last(images), expected, rtol=1e-5, atol=1e-5)


def test_a_resnet_file_for_another_step_is_refused_in_one_line(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(Exception, match="different architecture") as error:
        load_weights(build_step("roadmap_r50/stage_ratio"), path)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# BatchNorm, trained right
# --------------------------------------------------------------------------------------------------
def test_weight_decay_skips_every_batch_norm_parameter_and_bias():
    model = build_step("roadmap_r50/resnet50", **TINY)
    groups = {g["name"]: g for g in parameter_groups(model, weight_decay=0.05, layer_decay=1.0)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {f"{n}.{p}" for n in norms for p in ("weight", "bias")} <= no_decay
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in groups["decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_the_ema_of_a_batch_norm_model_averages_its_running_statistics_and_loads_strictly():
    torch.manual_seed(0)
    model = build_step("roadmap_r50/gelu", num_classes=3, **TINY)
    ema = WeightEma(model, decay=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stem_norm = model.downsample_layers[0][1]
    expected_mean = stem_norm.running_mean.clone()
    for _ in range(3):
        images = torch.randn(4, 3, 32, 32) * 3 + 1  # statistics far from the initial 0 mean, 1 variance
        torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        expected_mean = 0.5 * expected_mean + 0.5 * stem_norm.running_mean
    state = ema.state_dict(model)
    key = "downsample_layers.0.1.running_mean"
    torch.testing.assert_close(state[key], expected_mean)
    assert state[key].abs().min() > 0.01  # it followed training, away from its zero start
    assert not torch.equal(state[key], stem_norm.running_mean)  # averaged, not copied
    assert state["downsample_layers.0.1.num_batches_tracked"] == 3
    fresh = build_step("roadmap_r50/gelu", num_classes=3, **TINY)
    fresh.load_state_dict(state, strict=True)
    with ema.swapped_into(model):
        torch.testing.assert_close(model.downsample_layers[0][1].running_mean, expected_mean)


@pytest.mark.slow  # torch.compile on the CPU
def test_batch_norm_trains_alike_through_compile_channels_last_and_bf16():
    def train(compiled: bool, channels_last: bool, bf16: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        # One block a stage: torch.compile's time on the CPU grows with the graph.
        model = build_step("roadmap_r50/resnet50", num_classes=3, depths=[1, 1, 1, 1], widths=TINY["widths"])
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        # What compiling changes for BatchNorm is the capture: dynamo tracing the train-mode norm and AOT
        # autograd functionalising its in-place running-statistics update; inductor's kernels (a cold
        # C++ build: ~45 s here) are exercised by the compiled runs of test_models and test_parallelize.
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            images = (torch.randn(8, 3, 32, 32, generator=generator) * 2 + 0.5).to(memory_format=memory_format)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(forward(images), torch.arange(8) % 3)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return {k: v.float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    eager = train(False, False, False)
    for compiled, channels_last, bf16, tolerance in ((True, True, False, 2e-3), (False, True, True, 1e-2)):
        other = train(compiled, channels_last, bf16)
        assert relative_difference(eager, other) < tolerance
        stats = [k for k in eager if k.endswith("running_var")]
        assert relative_difference({k: eager[k] for k in stats}, {k: other[k] for k in stats}) < tolerance


def test_sync_bn_on_the_cpu_with_several_processes_is_refused_before_any_work():
    from convnext_train.config import validate_train_config
    from convnext_train.errors import UserError

    overrides = ["model=roadmap_r50/resnet50", "data=synthetic", "trainer.sync_bn=true", "trainer.device=cpu"]
    with initialize_config_dir(config_dir=str(configs.CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(UserError, match="trainer.sync_bn.*CUDA devices only"):
        validate_train_config(cfg, world_size=2)
    validate_train_config(cfg, world_size=1)  # one process: nothing to synchronise, nothing refused


def test_only_the_last_step_exports_to_convnext_layouts_the_others_are_refused_in_one_line():
    from convnext_train.export import FORMATS

    before_last = build_step("roadmap_r50/layer_norm", **TINY).state_dict()
    for name in ("timm", "hf", "torchvision"):
        reason = FORMATS[name].refusal(before_last)
        assert reason is not None and "not a hierarchical ConvNeXt" in reason and "\n" not in reason, name
    assert FORMATS["official"].refusal(before_last) is None and FORMATS["onnx"].refusal(before_last) is None
    last = build_step("roadmap_r50/separate_downsampling").state_dict()
    assert FORMATS["timm"].refusal(last) is None and FORMATS["torchvision"].refusal(last) is None


def test_counting_a_batch_norm_model_leaves_its_statistics_and_mode_alone():
    model = build_step("roadmap_r50/resnet50", **TINY).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_gmacs(model, 32) > 0  # a 1x1 last map at 32 px: train-mode BatchNorm would refuse a batch of one
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
