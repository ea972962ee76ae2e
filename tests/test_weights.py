"""Checkpoint reading, saving and layout conversion, against the real timm, transformers, torch and
safetensors libraries.

Every model here is tiny (32x32 input) and has random values in every parameter: a fresh GRN is the
identity and a fresh layer scale is 1e-6, so untouched weights would hide a mis-mapped block.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
)

from convnext_train.errors import exit_on_user_error
from convnext_train.models import ConvNeXt, ConvNeXtIsotropic, ConvNeXtV2
from convnext_train.weights import (
    CheckpointError,
    detect_format,
    export_hf,
    hf_to_official,
    load_weights,
    official_to_timm,
    read_checkpoint,
    save_checkpoint,
    state_dict_from_checkpoint,
    timm_to_official,
)

DEPTHS = (1, 1, 2, 1)
DIMS = (8, 16, 24, 32)
NUM_CLASSES = 10
TOLERANCE = 1e-4


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def ours(variant: str = "v1", seed: int = 0) -> nn.Module:
    if variant == "v2":
        model = ConvNeXtV2(depths=DEPTHS, dims=DIMS, num_classes=NUM_CLASSES)
    elif variant == "isotropic":
        model = ConvNeXtIsotropic(depth=2, dim=16, num_classes=NUM_CLASSES, layer_scale_init_value=1e-6)
    else:
        layer_scale = 0.0 if variant == "v1-no-layer-scale" else 1e-6
        model = ConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=NUM_CLASSES, layer_scale_init_value=layer_scale)
    return randomized(model, seed)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(images)
    return output.logits if hasattr(output, "logits") else output


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------------
# Official format: save, read, load
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["v1", "v2", "isotropic"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_round_trip_gives_identical_outputs(tmp_path, images, variant, suffix):
    model = ours(variant, seed=0)
    fresh = ours(variant, seed=1)
    assert not torch.allclose(logits(fresh, images), logits(model, images))
    path = tmp_path / "new" / "dir" / f"checkpoint{suffix}"  # the parent directories do not exist yet

    # safetensors holds a flat tensor dict; torch files hold the release layout {"model": ...}.
    save_checkpoint(model.state_dict() if suffix == ".safetensors" else {"model": model.state_dict()}, path)
    loaded = read_checkpoint(path)
    weights = state_dict_from_checkpoint(loaded)
    assert detect_format(weights) == "official"
    fresh.load_state_dict(weights, strict=True)

    assert torch.equal(logits(fresh, images), logits(model, images))


def test_load_weights_accepts_a_path(tmp_path, images):
    model, fresh = ours("v2", seed=0), ours("v2", seed=1)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "checkpoint.pth")
    load_weights(fresh, tmp_path / "checkpoint.pth")
    assert torch.equal(logits(fresh, images), logits(model, images))


def test_save_replaces_an_existing_checkpoint(tmp_path, images):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": ours("v1", seed=0).state_dict()}, path)
    newer = ours("v1", seed=1)
    save_checkpoint({"model": newer.state_dict()}, path)
    fresh = ours("v1", seed=2)
    load_weights(fresh, path)
    assert torch.equal(logits(fresh, images), logits(newer, images))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------
TIMM_CASES = {
    # name: (our variant, timm conv_mlp); convnext_atto..nano and convnextv2_atto..nano use conv_mlp.
    "v1": ("v1", False),
    "v2": ("v2", False),
    "v1-conv-mlp": ("v1", True),
    "v2-conv-mlp": ("v2", True),
}


def timm_model(variant: str, conv_mlp: bool) -> nn.Module:
    is_v2 = variant == "v2"
    return TimmConvNeXt(
        depths=DEPTHS,
        dims=DIMS,
        num_classes=NUM_CLASSES,
        conv_mlp=conv_mlp,
        use_grn=is_v2,
        ls_init_value=None if is_v2 else 1e-6,
    )


@pytest.mark.parametrize("case", TIMM_CASES)
def test_ours_to_timm_gives_the_same_logits(images, case):
    variant, conv_mlp = TIMM_CASES[case]
    model = ours(variant)
    target = timm_model(variant, conv_mlp).eval()
    # Without `model` the MLP weights stay 2-D, which is what conv_mlp=False timm models use.
    converted = official_to_timm(model.state_dict(), model=target if conv_mlp else None)
    target.load_state_dict(converted, strict=True)
    assert max_abs_diff(logits(target, images), logits(model, images)) < TOLERANCE


@pytest.mark.parametrize("case", TIMM_CASES)
def test_timm_to_ours_gives_the_same_logits(images, case):
    variant, conv_mlp = TIMM_CASES[case]
    source = randomized(timm_model(variant, conv_mlp))
    assert detect_format(source.state_dict()) == "timm"
    model = ours(variant, seed=1)
    model.load_state_dict(timm_to_official(source.state_dict()), strict=True)
    assert max_abs_diff(logits(model, images), logits(source, images)) < TOLERANCE


def test_timm_train_checkpoint_loads_with_its_args_and_ema(tmp_path, images):
    """timm's train.py saves {"arch", "state_dict", "state_dict_ema", "args": Namespace, "metric"}."""
    weights, ema = randomized(timm_model("v1", True), seed=0), randomized(timm_model("v1", True), seed=1)
    checkpoint = {
        "epoch": 3,
        "arch": "convnext_atto",
        "state_dict": weights.state_dict(),
        "state_dict_ema": ema.state_dict(),
        "args": argparse.Namespace(model="convnext_atto", lr=4e-3, epochs=300, mixup=0.8),
        "metric": 12.5,
        "version": 2,
    }
    torch.save(checkpoint, tmp_path / "model_best.pth.tar")

    model = ours("v1", seed=2)
    load_weights(model, tmp_path / "model_best.pth.tar")
    assert max_abs_diff(logits(model, images), logits(weights.eval(), images)) < TOLERANCE
    load_weights(model, tmp_path / "model_best.pth.tar", use_ema=True)
    assert max_abs_diff(logits(model, images), logits(ema.eval(), images)) < TOLERANCE


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------------
HF_CLASSES = {
    "v1": (ConvNextConfig, ConvNextForImageClassification),
    "v1-no-layer-scale": (ConvNextConfig, ConvNextForImageClassification),
    "v2": (ConvNextV2Config, ConvNextV2ForImageClassification),
}


@pytest.mark.parametrize("variant", HF_CLASSES)
def test_export_hf_loads_with_from_pretrained(tmp_path, images, variant):
    model = ours(variant)
    export_hf(model, tmp_path / "hf")

    # transformers 4.x refuses safetensors weights without this metadata.
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    hf_class = HF_CLASSES[variant][1]
    exported, loading_info = hf_class.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loading_info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert exported.config.depths == list(DEPTHS)
    assert exported.config.hidden_sizes == list(DIMS)
    assert exported.config.num_labels == NUM_CLASSES
    assert max_abs_diff(logits(exported.eval(), images), logits(model, images)) < TOLERANCE


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_hf_to_ours_gives_the_same_logits(images, variant):
    config_class, hf_class = HF_CLASSES[variant]
    # Our final LayerNorm uses the official eps (1e-6); transformers defaults to 1e-12.
    config = config_class(depths=list(DEPTHS), hidden_sizes=list(DIMS), num_labels=NUM_CLASSES, layer_norm_eps=1e-6)
    source = randomized(hf_class(config))
    assert detect_format(source.state_dict()) == "hf"

    model = ours(variant, seed=1)
    model.load_state_dict(hf_to_official(source.state_dict()), strict=True)
    assert max_abs_diff(logits(model, images), logits(source, images)) < TOLERANCE


def test_isotropic_models_have_no_hf_or_timm_equivalent(tmp_path):
    model = ours("isotropic")
    with pytest.raises(CheckpointError, match="isotropic.*Hugging Face"):
        export_hf(model, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="isotropic.*timm"):
        official_to_timm(model.state_dict())


# --------------------------------------------------------------------------------------------------
# Safe reading
# --------------------------------------------------------------------------------------------------
class CreatesMarkerFileWhenUnpickled:
    """What a hostile checkpoint looks like: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_hostile_pickle_is_refused_unless_trusted(tmp_path, zip_format):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "hostile.pth"
    checkpoint = {"model": ours().state_dict(), "extra": CreatesMarkerFileWhenUnpickled(marker)}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(CheckpointError, match="eval.trust_checkpoint=true"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="eval.trust_checkpoint=true"):
        load_weights(ours(), path)
    assert not marker.exists()

    # The control: the payload is live, and trusting the file really unpickles it.
    read_checkpoint(path, trusted=True)
    assert marker.exists()


def test_training_checkpoint_with_harmless_extras_needs_no_trust(tmp_path):
    model = ours()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 4,
        "args": argparse.Namespace(model="convnext_tiny", drop_path=0.1),  # the official main.py
        "max_accuracy": np.float64(81.25),  # numpy scalars, as some scripts store metrics
        "best_epoch": np.int64(3),
    }
    save_checkpoint(checkpoint, tmp_path / "checkpoint.pth")

    loaded = read_checkpoint(tmp_path / "checkpoint.pth")
    assert loaded["args"] == argparse.Namespace(model="convnext_tiny", drop_path=0.1)
    assert loaded["max_accuracy"] == 81.25 and loaded["best_epoch"] == 3
    assert loaded["optimizer"]["state"][0]["step"] == 1


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "checkpoint.pth"
    with pytest.raises(CheckpointError, match="does not exist") as error:
        read_checkpoint(path)
    assert str(path) in str(error.value)


def _saved_bytes(tmp_path: Path, suffix: str = ".pth", zip_format: bool = True) -> bytes:
    path = tmp_path / f"whole{suffix}"
    if suffix == ".safetensors":
        save_checkpoint(ours().state_dict(), path)
    else:
        torch.save({"model": ours().state_dict()}, path, _use_new_zipfile_serialization=zip_format)
    return path.read_bytes()


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


DAMAGED_FILES = {
    "zip-cut-in-half": lambda tmp_path: _first_half(_saved_bytes(tmp_path)),
    "zip-tail-missing": lambda tmp_path: _saved_bytes(tmp_path)[:-100],
    "legacy-cut-in-half": lambda tmp_path: _first_half(_saved_bytes(tmp_path, zip_format=False)),
    "safetensors-cut-in-half": lambda tmp_path: _first_half(_saved_bytes(tmp_path, ".safetensors")),
    "random-bytes": lambda tmp_path: np.random.default_rng(0).bytes(4096),
    "empty": lambda tmp_path: b"",
}


@pytest.mark.parametrize("damage", DAMAGED_FILES)
def test_truncated_or_corrupt_file_is_reported(tmp_path, damage):
    path = tmp_path / ("damaged.safetensors" if "safetensors" in damage else "damaged.pth")
    path.write_bytes(DAMAGED_FILES[damage](tmp_path))
    with pytest.raises(CheckpointError, match="truncated or corrupt.*download it again"):
        read_checkpoint(path)


def test_legacy_file_cut_inside_its_pickles_is_corrupt_not_untrusted(tmp_path):
    """A pre-1.6 torch file is a stream of pickles; cut inside one, it must not pass for intact."""
    whole = _saved_bytes(tmp_path, zip_format=False)
    path = tmp_path / "damaged.pth"
    for cut in range(1, 600):  # the magic number, protocol, system info and the start of the data
        path.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_checkpoint(path)


def test_whole_model_pickle_needs_trust_and_then_gives_its_weights(tmp_path, images):
    model = ours("v2")
    torch.save(model, tmp_path / "model.pth")  # the whole module, as some scripts do
    with pytest.raises(CheckpointError, match="eval.trust_checkpoint=true"):
        read_checkpoint(tmp_path / "model.pth")

    fresh = ours("v2", seed=1)
    load_weights(fresh, tmp_path / "model.pth", trusted=True)
    assert torch.equal(logits(fresh, images), logits(model, images))


# --------------------------------------------------------------------------------------------------
# Atomic saving
# --------------------------------------------------------------------------------------------------
class FailsWhenPickled:
    def __reduce__(self):
        raise RuntimeError("this object cannot be saved")


def test_failed_save_leaves_the_existing_checkpoint_untouched(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": ours().state_dict()}, path)
    before = path.read_bytes()

    with pytest.raises(RuntimeError, match="cannot be saved"):
        save_checkpoint({"model": ours(seed=1).state_dict(), "broken": FailsWhenPickled()}, path)

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def test_a_full_disk_is_one_line_and_exit_code_2_wherever_it_happens(capsys):
    """/dev/full answers every write with ENOSPC, as a full disk does. torch.save buries it under its
    zip writer's RuntimeError; a log line's write raises it plainly. Both end as one line."""

    @exit_on_user_error
    def save_to_full_disk(write):
        with open("/dev/full", "wb") as file:
            write(file)

    for write in (lambda file: torch.save(torch.zeros(10_000), file), lambda file: file.write(b"{}\n")):
        with pytest.raises(SystemExit) as stopped:
            save_to_full_disk(write)
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("error: no space left on the device") and error.count("\n") == 1, error
    with pytest.raises(ZeroDivisionError):  # any other error is a bug and keeps its traceback
        exit_on_user_error(lambda: 1 / 0)()


def test_saved_checkpoint_has_the_usual_permissions(tmp_path):
    """Temporary files are often created private (0600); the checkpoint must follow the umask instead."""
    umask = os.umask(0o022)
    try:
        save_checkpoint({"model": ours().state_dict()}, tmp_path / "checkpoint.pth")
        save_checkpoint(ours().state_dict(), tmp_path / "weights.safetensors")
    finally:
        os.umask(umask)
    for name in ("checkpoint.pth", "weights.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_safetensors_refuses_non_tensor_values_before_writing(tmp_path):
    path = tmp_path / "weights.safetensors"
    with pytest.raises(CheckpointError, match="flat name -> tensor dict"):
        save_checkpoint({"model": ours().state_dict(), "epoch": 3}, path)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Loading: architecture mismatches, wrapper prefixes, EMA
# --------------------------------------------------------------------------------------------------
def test_checkpoint_for_a_size_no_config_has_names_the_overrides_that_build_it():
    wider = ConvNeXt(depths=DEPTHS, dims=(8, 16, 24, 48), num_classes=NUM_CLASSES)
    with pytest.raises(CheckpointError, match="no model= config has that size") as error:
        load_weights(ours("v1"), {"model": wider.state_dict()})
    assert str(error.value).endswith("pass model=convnext_atto model.depths=[1,1,2,1] model.dims=[8,16,24,48].")


def test_v1_checkpoint_in_a_v2_model_names_the_family():
    with pytest.raises(CheckpointError, match="holds a ConvNeXt with .* but the model is a ConvNeXt V2 with") as error:
        load_weights(ours("v2"), {"model": ours("v1").state_dict()})
    assert str(error.value).endswith("pass model=convnext_atto model.depths=[1,1,2,1] model.dims=[8,16,24,32].")


def test_what_else_differs_is_listed_by_name():
    """Same class and size, other options: the tensors that differ are the clearest account."""
    one_channel = ConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=NUM_CLASSES, in_chans=1)
    with pytest.raises(CheckpointError, match="different architecture") as error:
        load_weights(ours("v1"), {"model": one_channel.state_dict()})
    assert "shape mismatches: downsample_layers.0.0.weight (checkpoint [8, 1, 4, 4], model [8, 3, 4, 4])" in str(
        error.value
    )
    with pytest.raises(CheckpointError, match="different architecture") as error:
        load_weights(ours("v1-no-layer-scale"), {"model": ours("v1").state_dict()})
    assert "unexpected keys: stages.0.0.gamma" in str(error.value)
    with pytest.raises(CheckpointError, match="missing keys: stages.0.0.gamma"):
        load_weights(ours("v1"), {"model": ours("v1-no-layer-scale").state_dict()})


def test_ddp_and_compile_prefixes_are_stripped(images):
    model = ours("v1", seed=0)
    data_parallel = nn.DataParallel(model).state_dict()  # `module.` as DistributedDataParallel adds
    compiled = torch.compile(model).state_dict()  # `_orig_mod.`; compiling is lazy, nothing runs here
    assert all(name.startswith("module.") for name in data_parallel)
    assert all(name.startswith("_orig_mod.") for name in compiled)
    both = {f"module._orig_mod.{name}": tensor for name, tensor in model.state_dict().items()}

    for weights in (data_parallel, compiled, both):
        fresh = ours("v1", seed=1)
        load_weights(fresh, {"model": weights})
        assert torch.equal(logits(fresh, images), logits(model, images))


def test_use_ema_picks_the_ema_weights_of_our_training_checkpoint(tmp_path, images):
    model, ema = ours("v2", seed=0), ours("v2", seed=1)
    checkpoint = {
        "model": model.state_dict(),
        "model_ema": ema.state_dict(),
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "scaler": {},
        "epoch": 7,
        "step": 700,
        "config": {"model": {"name": "convnextv2_atto"}, "optim": {"lr": 4e-3}},
    }
    save_checkpoint(checkpoint, tmp_path / "last.pth")

    fresh = ours("v2", seed=2)
    load_weights(fresh, tmp_path / "last.pth", use_ema=True)
    assert torch.equal(logits(fresh, images), logits(ema, images))
    load_weights(fresh, tmp_path / "last.pth")
    assert torch.equal(logits(fresh, images), logits(model, images))


@pytest.mark.parametrize("other_key, other_value", [("optimizer", {}), ("model_ema", None)])
def test_use_ema_without_ema_weights_lists_the_checkpoint_keys(other_key, other_value):
    checkpoint = {"model": ours().state_dict(), other_key: other_value}  # EMA disabled: absent or None
    with pytest.raises(CheckpointError, match="no EMA weights") as error:
        state_dict_from_checkpoint(checkpoint, use_ema=True)
    assert f"its keys: model, {other_key}" in str(error.value)


# --------------------------------------------------------------------------------------------------
# ConvNeXt V2 FCMAE pre-training checkpoints (sparse encoder + decoder)
# --------------------------------------------------------------------------------------------------
def fcmae_checkpoint(model: torch.nn.Module) -> dict:
    """What the official FCMAE release stores for `model`'s encoder, written from the sparse
    (MinkowskiEngine) layout: `kernel`s of shape (k*k, in, out) / (k*k, C) with the spatial axes
    swapped, `.ln.`/`.linear.` submodules, (1, C) biases and GRN parameters, plus decoder weights."""
    sparse = {}
    for name, value in model.state_dict().items():
        if name.startswith(("head.", "norm.")):
            continue  # the encoder has neither
        parts = name.split(".")
        dense_stem = name.startswith("downsample_layers.0.")
        if parts[-1] == "weight" and value.ndim == 4 and not dense_stem:
            out_dim, in_dim, k, _ = value.shape
            kernel = value.transpose(2, 3).reshape(out_dim, in_dim, k * k)
            value = kernel[:, 0, :].T if ".dwconv." in name else kernel.permute(2, 1, 0)
            parts[-1] = "kernel"
        elif not dense_stem and (".norm." in name or re.match(r"downsample_layers\.\d\.0\.", name)):
            parts.insert(-1, "ln")
        elif ".pwconv" in name:
            parts.insert(-1, "linear")
        if ".grn." in name:
            value = value.reshape(1, -1)
        elif parts[-1] == "bias" and not dense_stem and "ln" not in parts and "linear" not in parts:
            value = value.reshape(1, -1)
        sparse["encoder." + ".".join(parts)] = value.clone()
    sparse["mask_token"] = torch.zeros(1, 512, 1, 1)
    sparse["proj.weight"] = torch.zeros(512, 32, 1, 1)
    sparse["decoder.0.dwconv.weight"] = torch.zeros(512, 1, 7, 7)
    sparse["pred.weight"] = torch.zeros(48, 512, 1, 1)
    return {"model": sparse}


def test_fcmae_pretraining_checkpoint_fine_tunes_the_v2_backbone(tmp_path):
    from conftest import randomize_

    from convnext_train.models import ConvNeXtV2
    from convnext_train.weights import detect_format, load_pretrained

    pretrained = randomize_(ConvNeXtV2(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10))
    checkpoint = fcmae_checkpoint(pretrained)
    assert detect_format(checkpoint["model"]) == "fcmae"
    assert any(k.endswith("dwconv.kernel") for k in checkpoint["model"])
    torch.save(checkpoint, tmp_path / "convnextv2_fcmae.pt")

    model = ConvNeXtV2(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_pretrained(model, tmp_path / "convnextv2_fcmae.pt")  # the head starts fresh
    loaded, expected = model.state_dict(), pretrained.state_dict()
    for name in loaded:
        source = fresh if name.startswith(("head.", "norm.")) else expected
        assert torch.equal(loaded[name], source[name]), name
