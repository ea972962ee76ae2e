"""torchvision checkpoints and Hugging Face model directories, built with the real libraries, and
checkpoints of every format that are for another model than the one they are loaded into.

torchvision's weights come from `torchvision.models.convnext_tiny` itself (its smallest ConvNeXt);
the Hugging Face directories are written by `save_pretrained` (safetensors, whole or sharded) and by
huggingface_hub's `save_torch_state_dict` (`pytorch_model.bin`, whole or sharded, the layout
transformers 4 wrote and transformers 5 no longer does). Every parameter is perturbed, so a fresh
layer scale (1e-6) or LayerNorm (1, 0) cannot hide a wrongly mapped tensor.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed.checkpoint as dcp
import torchvision
from conftest import build_model, randomize_, run_script
from huggingface_hub import save_torch_state_dict, try_to_load_from_cache
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
)

from convnext_train import configs
from convnext_train.inference import load_checkpoint_model
from convnext_train.weights import (
    CheckpointError,
    detect_format,
    export_hf,
    export_torchvision,
    load_pretrained,
    load_weights,
    read_checkpoint,
)

TOLERANCE = 1e-4
CLASSES = 10


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model.eval()(images)
    return output.logits if hasattr(output, "logits") else output


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def one_line_error(call, *args, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as error:
        call(*args)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------------
def empty(variant: str, **overrides) -> nn.Module:
    """Our model, with every tensor left for a strict load to replace: built on the meta device, so
    that convnext_t's 28M parameters skip their random initialisation (seconds on this CPU)."""
    return build_model(variant, device="meta", **overrides).to_empty(device="cpu").eval()


def empty_torchvision_tiny() -> nn.Module:
    with torch.device("meta"):
        model = torchvision.models.convnext_tiny(weights=None, num_classes=CLASSES)
    return model.to_empty(device="cpu").eval()


def test_torchvision_tiny_loads_into_convnext_t_and_exports_back(tmp_path, images):
    source = randomize_(torchvision.models.convnext_tiny(weights=None, num_classes=CLASSES))
    torch.save(source.state_dict(), tmp_path / "convnext_tiny.pth")  # as torchvision's release files are
    assert detect_format(source.state_dict()) == "torchvision"
    expected = logits(source, images)

    # eval.py's path (load_weights), from the file.
    ours = empty("convnext_t", num_classes=CLASSES)
    load_weights(ours, tmp_path / "convnext_tiny.pth")
    assert max_abs_diff(logits(ours, images), expected) < TOLERANCE
    # Fine-tuning's path, for another class count: every weight but the head (left as the model had it).
    fewer = empty("convnext_t", num_classes=4)
    assert load_pretrained(fewer, tmp_path / "convnext_tiny.pth")
    with torch.no_grad():
        assert torch.equal(fewer.forward_features(images), ours.forward_features(images))

    # And back: torchvision loads our export strictly, with the same logits.
    export_torchvision(ours, tmp_path / "exported.pth")
    target = empty_torchvision_tiny()
    target.load_state_dict(torch.load(tmp_path / "exported.pth", weights_only=True), strict=True)
    assert max_abs_diff(logits(target, images), expected) < TOLERANCE

    # A model without layer scale exports with a scale of ones, which computes the same.
    plain = empty("convnext_t", num_classes=CLASSES, layer_scale_init_value=0.0)
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith(".gamma")}, strict=True)
    export_torchvision(plain, tmp_path / "plain.pth")
    target.load_state_dict(torch.load(tmp_path / "plain.pth", weights_only=True), strict=True)
    assert max_abs_diff(logits(target, images), logits(plain, images)) < TOLERANCE


@pytest.mark.parametrize(
    "variant, match",
    [
        ("convnext_atto", r"only in sizes T, S, B and L .*depths \[2, 2, 6, 2\]"),
        ("convnextv2_t", "torchvision has no ConvNeXt V2"),
        ("convnext_iso_s", "isotropic .*torchvision"),
    ],
)
def test_models_torchvision_does_not_build_are_refused_in_one_line(tmp_path, variant, match):
    one_line_error(export_torchvision, build_model(variant, device="meta"), tmp_path / "x.pth", match=match)
    assert not (tmp_path / "x.pth").exists()


# --------------------------------------------------------------------------------------------------
# A checkpoint for another model: any format names the model= that fits
# --------------------------------------------------------------------------------------------------
def meta_built(build, *args, **kwargs) -> nn.Module:
    """A library's model with uninitialised CPU tensors: the real names and shapes, without the
    seconds that random initialisation of ConvNeXt-S's 50M parameters takes here."""
    with torch.device("meta"):
        model = build(*args, **kwargs)
    return model.to_empty(device="cpu")


@pytest.fixture(scope="module")
def small_files(module_tmp_path) -> dict[str, Path]:
    """ConvNeXt-S as torchvision and timm save it; a checkpoint of timm's train.py (a dict with the
    EMA beside the weights, here of ConvNeXt-atto) and timm's ConvNeXt V2-atto."""
    files = {name: module_tmp_path / f"{name}.pth" for name in ("torchvision", "timm", "timm-train", "timm-v2")}
    torch.save(meta_built(torchvision.models.convnext_small, weights=None).state_dict(), files["torchvision"])
    torch.save(meta_built(timm.create_model, "convnext_small").state_dict(), files["timm"])
    atto = meta_built(timm.create_model, "convnext_atto")
    torch.save(
        {"epoch": 3, "arch": "convnext_atto", "state_dict": atto.state_dict(), "state_dict_ema": atto.state_dict()},
        files["timm-train"],
    )
    torch.save(meta_built(timm.create_model, "convnextv2_atto").state_dict(), files["timm-v2"])
    return files


SMALL = r"holds a ConvNeXt with depths \[3, 3, 27, 3\] and dims \[96, 192, 384, 768\], but the model is "


@pytest.mark.parametrize("load", [load_weights, load_pretrained])
def test_torchvision_and_timm_files_of_another_size_name_the_model_that_fits(small_files, load):
    tiny = build_model("convnext_t", device="meta")
    for name in ("torchvision", "timm"):
        one_line_error(
            load,
            tiny,
            small_files[name],
            match=SMALL + r"a ConvNeXt with depths \[3, 3, 9, 3\].*; use model=convnext_s\.$",
        )
    femto = build_model("convnext_femto", device="meta")
    for use_ema in (False, True):
        one_line_error(
            functools.partial(load, use_ema=use_ema),
            femto,
            small_files["timm-train"],
            match="use model=convnext_atto\\.$",
        )
    iso = build_model("convnext_iso_s", device="meta")
    one_line_error(
        load,
        iso,
        small_files["torchvision"],
        match=SMALL + "an isotropic ConvNeXt with depth 18 and dim 384; use model=convnext_s",
    )

    # ConvNeXt V2 (GRN) against V2 of another size, and against V1 of the same size.
    v2_atto = r"holds a ConvNeXt V2 with depths \[2, 2, 6, 2\] and dims \[40, 80, 160, 320\], but the model is "
    femto = build_model("convnextv2_femto", device="meta")
    one_line_error(
        load,
        femto,
        small_files["timm-v2"],
        match=v2_atto + r"a ConvNeXt V2 .*\[48, 96, 192, 384\]; use model=convnextv2_atto\.",
    )
    atto_v1 = build_model("convnext_atto", device="meta")
    one_line_error(
        load, atto_v1, small_files["timm-v2"], match=v2_atto + r"a ConvNeXt with .*; use model=convnextv2_atto\."
    )


def test_isotropic_weights_name_their_model_too():
    iso_s = build_model("convnext_iso_s", device="meta").state_dict()
    odd = build_model("convnext_iso_s", device="meta", depth=2, dim=16).state_dict()
    atto = build_model("convnext_atto", device="meta")
    for load in (load_weights, load_pretrained):
        one_line_error(
            load, atto, iso_s, match="holds an isotropic ConvNeXt with depth 18 and dim 384, .*use model=convnext_iso_s"
        )
        one_line_error(
            load,
            atto,
            odd,
            match=r"no model= config has that size: pass model=convnext_iso_b model.depth=2 model.dim=16\.$",
        )


def test_same_size_with_another_class_count_asks_for_data_num_classes(small_files):
    """eval's path needs the checkpoint's class count; fine-tuning re-initialises the head."""
    four_classes = empty("convnext_s", num_classes=4)
    one_line_error(
        load_weights,
        four_classes,
        small_files["torchvision"],
        match="1000-class head but the model 4 classes; set data.num_classes=1000 ",
    )
    assert load_pretrained(four_classes, small_files["torchvision"])


def test_eval_and_predict_given_another_model_name_the_one_that_fits(small_files):
    given = functools.partial(load_checkpoint_model, chosen_variant="convnext_t")
    one_line_error(
        given,
        small_files["timm"],
        configs.load("model", "convnext_t"),
        match="is a convnext_s, a different architecture than model=convnext_t .*: add model=convnext_s",
    )


@pytest.mark.slow
def test_fine_tuning_from_a_file_of_another_size_stops_before_training_naming_the_model(small_files, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py",
        "model=convnext_t",
        "data=synthetic",
        "data.num_classes=4",
        "data.img_size=32",
        "data.train_length=32",
        "data.val_length=16",
        "data.num_workers=0",
        "trainer.global_batch_size=16",
        "trainer.micro_batch_size=8",
        "trainer.precision=fp32",
        f"finetune.checkpoint={small_files['torchvision']}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: The checkpoint holds a ConvNeXt with depths [3, 3, 27, 3]") and message.endswith(
        "use model=convnext_s."
    ), message
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()  # nothing trained


# --------------------------------------------------------------------------------------------------
# Hugging Face model directories
# --------------------------------------------------------------------------------------------------
# Our variant and the transformers classes of each family, at the atto size (config of the same depths
# and hidden sizes). layer_norm_eps: our final LayerNorm's (the official 1e-6; transformers says 1e-12).
HF_FAMILIES = {
    "v1": ("convnext_atto", ConvNextConfig, ConvNextForImageClassification),
    "v2": ("convnextv2_atto", ConvNextV2Config, ConvNextV2ForImageClassification),
}
ATTO = dict(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320])


def hf_model(family: str, seed: int = 0, **sizes) -> nn.Module:
    _, config_class, model_class = HF_FAMILIES[family]
    config = config_class(**(sizes or ATTO), num_labels=CLASSES, layer_norm_eps=1e-6)
    return randomize_(model_class(config), seed=seed).eval()


def save_hf(model: nn.Module, directory: Path, layout: str) -> Path:
    """`directory` in one of the four layouts `from_pretrained` reads."""
    shards = "5MB" if layout.endswith("sharded") else "1GB"  # atto is about 15 MB
    if layout.startswith("safetensors"):
        model.save_pretrained(directory, max_shard_size=shards)
    else:
        directory.mkdir(parents=True)
        model.config.save_pretrained(directory)
        save_torch_state_dict(model.state_dict(), directory, safe_serialization=False, max_shard_size=shards)
    files = set(os.listdir(directory))
    index = ("model.safetensors" if layout.startswith("safetensors") else "pytorch_model.bin") + ".index.json"
    assert (index in files) == layout.endswith("sharded"), files  # the layout is the one meant
    return directory


@pytest.fixture(scope="module")
def hf_models() -> dict[str, nn.Module]:
    return {family: hf_model(family) for family in HF_FAMILIES}


# Every layout for V2, and the other family in the usual one (only the names' prefix differs).
HF_CASES = [
    ("v2", "safetensors"),
    ("v2", "safetensors-sharded"),
    ("v2", "bin"),
    ("v2", "bin-sharded"),
    ("v1", "safetensors"),
]


@pytest.mark.parametrize("family, layout", HF_CASES, ids=[f"{family}-{layout}" for family, layout in HF_CASES])
def test_hf_directory_loads_through_eval_and_fine_tuning(tmp_path, images, hf_models, family, layout):
    source = hf_models[family]
    directory = save_hf(source, tmp_path / "hf", layout)
    expected = logits(source, images)
    variant = HF_FAMILIES[family][0]

    ours = empty(variant, num_classes=CLASSES)
    load_weights(ours, directory)
    assert max_abs_diff(logits(ours, images), expected) < TOLERANCE
    tuned = empty(variant, num_classes=CLASSES)
    assert not load_pretrained(tuned, directory)
    assert max_abs_diff(logits(tuned, images), expected) < TOLERANCE


def test_hf_directory_prefers_safetensors_when_both_are_there(tmp_path, images):
    safe, pickled = hf_model("v2", seed=0), hf_model("v2", seed=1)
    directory = save_hf(safe, tmp_path / "hf", "safetensors")
    torch.save(pickled.state_dict(), directory / "pytorch_model.bin")
    ours = empty("convnextv2_atto", num_classes=CLASSES)
    load_weights(ours, directory)
    assert max_abs_diff(logits(ours, images), logits(safe, images)) < TOLERANCE
    assert max_abs_diff(logits(ours, images), logits(pickled, images)) > 100 * TOLERANCE


def test_hub_cache_snapshot_and_repository_directory_load(tmp_path, images):
    """The cache as huggingface_hub lays it out: files in blobs/ named by their hash, each snapshot a
    directory of relative links into it, refs/main naming the current snapshot (here the newer of two)."""
    cache = tmp_path / "hub"
    repo = cache / "models--facebook--convnextv2-atto-1k-224"
    old, new = hf_model("v2", seed=0), hf_model("v2", seed=1)
    for commit, model in (("a" * 40, old), ("b" * 40, new)):
        saved = save_hf(model, tmp_path / commit, "safetensors")
        for file in saved.iterdir():
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / file.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    # huggingface_hub itself reads this cache so.
    assert try_to_load_from_cache("facebook/convnextv2-atto-1k-224", "config.json", cache_dir=cache) == str(
        repo / "snapshots" / ("b" * 40) / "config.json"
    )

    for directory, source in ((repo / "snapshots" / ("a" * 40), old), (repo, new)):
        ours = empty("convnextv2_atto", num_classes=CLASSES)
        load_weights(ours, directory)
        assert max_abs_diff(logits(ours, images), logits(source, images)) < TOLERANCE

    (repo / "refs" / "main").write_text("c" * 40)
    one_line_error(read_checkpoint, repo, match="refs/main names the snapshot c+, which is not in")


def test_a_hugging_face_directory_of_another_size_or_family_names_the_model_that_fits(tmp_path):
    femto = save_hf(hf_model("v2", depths=[2, 2, 6, 2], hidden_sizes=[48, 96, 192, 384]), tmp_path / "f", "safetensors")
    atto_v1 = save_hf(hf_model("v1"), tmp_path / "v1", "safetensors")
    odd = save_hf(hf_model("v2", depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32]), tmp_path / "odd", "safetensors")
    atto_v2 = build_model("convnextv2_atto", device="meta", num_classes=CLASSES)

    for load in (load_weights, load_pretrained):
        message = one_line_error(load, atto_v2, femto, match="use model=convnextv2_femto")
        assert "dims [48, 96, 192, 384], but the model" in message and "dims [40, 80, 160, 320];" in message
        one_line_error(load, atto_v2, atto_v1, match=r"holds a ConvNeXt with .*use model=convnext_atto\.")
        one_line_error(
            load,
            atto_v2,
            odd,
            match=r"no model= config has that size: pass model=convnextv2_atto model.depths=\[1,1,2,1\]",
        )
    iso = build_model("convnext_iso_s", device="meta", num_classes=CLASSES)
    one_line_error(
        load_weights, iso, atto_v1, match="the model is an isotropic ConvNeXt with .*; use model=convnext_atto"
    )

    # Another class count: eval.py needs data.num_classes; fine-tuning re-initialises the head.
    four_classes = empty("convnext_atto", num_classes=4)
    one_line_error(
        load_weights, four_classes, atto_v1, match="10-class head but the model 4 classes; set data.num_classes=10"
    )
    assert load_pretrained(four_classes, atto_v1)


def test_export_hf_goes_back_through_eval_unchanged(tmp_path, images):
    for variant in ("convnext_atto", "convnextv2_atto"):
        ours = randomize_(build_model(variant, num_classes=CLASSES))
        export_hf(ours, tmp_path / variant)
        fresh = empty(variant, num_classes=CLASSES)
        load_weights(fresh, tmp_path / variant)
        assert torch.equal(logits(fresh, images), logits(ours, images))


class CreatesMarkerFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickled_hf_weights_are_read_safely(tmp_path, hf_models):
    directory = save_hf(hf_models["v1"], tmp_path / "hf", "bin")
    marker = tmp_path / "payload-ran"
    torch.save(
        {**hf_models["v1"].state_dict(), "x": CreatesMarkerFileWhenUnpickled(marker)}, directory / "pytorch_model.bin"
    )
    one_line_error(read_checkpoint, directory, match="eval.trust_checkpoint=true")
    assert not marker.exists()


def test_a_sharded_training_directory_is_not_taken_for_a_hugging_face_one(tmp_path, images):
    ours = randomize_(build_model("convnext_atto", num_classes=CLASSES))
    dcp.save({"model": ours.state_dict()}, checkpoint_id=tmp_path / "step", no_dist=True)
    shutil.copy(Path(__file__).parents[1] / "pyproject.toml", tmp_path / "step" / "config.json")  # a red herring
    fresh = empty("convnext_atto", num_classes=CLASSES)
    load_weights(fresh, tmp_path / "step")
    assert torch.equal(logits(fresh, images), logits(ours, images))

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not weights")
    one_line_error(read_checkpoint, tmp_path / "other", match="neither a Hugging Face model directory .* nor a sharded")
    (tmp_path / "other" / "config.json").write_text("{}")
    one_line_error(read_checkpoint, tmp_path / "other", match="has no weights: expected one of model.safetensors")
