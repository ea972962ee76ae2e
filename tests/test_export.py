"""`python -m convnext_train.export`: every format written from a training checkpoint and read back
here by the library it is for (timm, transformers, torchvision, safetensors, ONNX Runtime), never by
the command's own read-back, with the logits of the model in the checkpoint; the ONNX file's input
contract and dynamic batch; predict.py's onnxruntime backend against its pytorch one (same CSV,
same embeddings, which equal `forward_features`); and the bad inputs, each one line with exit code 2
and nothing written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from conftest import build_model, make_imagefolder, randomize_, run_scripts
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from PIL import Image
from torch.testing import assert_close
from transformers import AutoModelForImageClassification

from convnext_train.configs import CONFIG_DIR
from convnext_train.data.transforms import eval_transform
from convnext_train.errors import UserError
from convnext_train.export import run as export_run
from convnext_train.weights import official_to_timm

CLASS_NAMES = ["scratch", "dent", "rust", "clean"]
IMG_SIZE, CROP_PCT = 32, 0.6  # not the defaults (224, 0.875): the ONNX contract must be the checkpoint's


def training_checkpoint(path: Path, model: torch.nn.Module, variant: str, **config) -> Path:
    """What the Checkpointer writes: weights, the run's config (train.yaml composed), class names."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=[f"model={variant}", *[f"{k}={v}" for k, v in config.items()]])
    torch.save(
        {
            "model": model.state_dict(),
            "step": 4,
            "epoch": 1,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "class_names": CLASS_NAMES[: model.head.out_features],
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def trained(module_tmp_path) -> tuple[Path, torch.nn.Module]:
    model = randomize_(build_model("convnext_atto", num_classes=4), std=0.2).eval()
    path = training_checkpoint(
        module_tmp_path / "best.pt",
        model,
        "convnext_atto",
        **{"data.num_classes": 4, "data.img_size": IMG_SIZE, "aug.crop_pct": CROP_PCT},
    )
    return path, model


def export(*overrides: str) -> Path:
    """The command's work in this process, under the Hydra config its app composes."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("export", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with torch.no_grad():
            return export_run(cfg)
    finally:
        HydraConfig.instance().cfg = None  # the tests after this one in this process see no Hydra app


def batch(size: int = IMG_SIZE, count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def fresh_atto() -> torch.nn.Module:
    return build_model("convnext_atto", num_classes=4).eval()


# Each reads `out` as a user of that library would (the command prints these calls), into a model
# that computes logits from a batch.
def read_official(out: Path):
    file = torch.load(out, weights_only=True)
    assert set(file) == {"model"}  # the release's layout: what main.py --finetune reads
    model = fresh_atto()
    model.load_state_dict(file["model"], strict=True)
    return model


def read_timm(out: Path):
    return timm.create_model(
        "convnext_atto", num_classes=4, pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=4)
    ).eval()


def read_hf(out: Path):
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert [model.config.id2label[i] for i in range(4)] == CLASS_NAMES
    return lambda images: model(pixel_values=images).logits


def read_safetensors(out: Path):
    model = fresh_atto()
    model.load_state_dict(safetensors.torch.load_file(out), strict=True)
    return model


@pytest.mark.parametrize(
    ("fmt", "name", "read"),
    [
        ("official", "model.pth", read_official),
        ("timm", "model.safetensors", read_timm),
        ("timm", "model.pth", read_timm),
        ("hf", "hf_model", read_hf),
        ("safetensors", "model.safetensors", read_safetensors),
    ],
)
def test_each_format_is_read_back_by_its_library_with_the_checkpoints_logits(
    trained, tmp_path, capsys, fmt, name, read
):
    checkpoint, model = trained
    out = export(f"checkpoint={checkpoint}", f"format={fmt}", f"out={tmp_path / name}")
    assert out == tmp_path / name and [p.name for p in tmp_path.iterdir()] == [name]  # no staging left
    printed = capsys.readouterr().out
    assert f"format={fmt}, convnext_atto" in printed and "largest logit difference" in printed
    with torch.no_grad():
        assert_close(read(out)(batch()), model(batch()), rtol=0, atol=1e-5)


@pytest.mark.slow  # the fast set has the V1 formats; this adds seconds of model building and reading
def test_a_v2_model_goes_to_timm_and_hugging_face_by_their_own_names(tmp_path):
    """GRN and no layer scale: timm's convnextv2_atto (1x1-conv MLP, flat GRN) and ConvNextV2 in transformers."""
    model = randomize_(build_model("convnextv2_atto", num_classes=3), std=0.1).eval()
    checkpoint = training_checkpoint(tmp_path / "v2.pt", model, "convnextv2_atto", **{"data.num_classes": 3})
    timm_file = export(f"checkpoint={checkpoint}", "format=timm", f"out={tmp_path / 'v2_timm.safetensors'}")
    hf_dir = export(f"checkpoint={checkpoint}", "format=hf", f"out={tmp_path / 'v2_hf'}")
    theirs = timm.create_model(
        "convnextv2_atto",
        num_classes=3,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(timm_file), num_classes=3),
    ).eval()
    hf = AutoModelForImageClassification.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "ConvNextV2ForImageClassification"
    with torch.no_grad():
        assert_close(theirs(batch()), model(batch()), rtol=0, atol=1e-5)
        assert_close(hf(pixel_values=batch()).logits, model(batch()), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torchvision_reads_a_convnext_t_export(tmp_path):
    model = randomize_(build_model("convnext_t", num_classes=3), std=0.02).eval()
    checkpoint = training_checkpoint(tmp_path / "t.pt", model, "convnext_t", **{"data.num_classes": 3})
    out = export(f"checkpoint={checkpoint}", "format=torchvision", f"out={tmp_path / 'tv.pth'}")
    theirs = torchvision.models.convnext_tiny(weights=None, num_classes=3).eval()
    theirs.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        assert_close(theirs(batch()), model(batch()), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("fmt", "name"), [("official", "small.pth"), ("safetensors", "small.safetensors")])
def test_a_size_no_config_has_goes_to_our_formats_and_back(small, tmp_path, fmt, name):
    """Read back into the exported architecture, not one guessed from a config of the same shapes."""
    checkpoint, model = small
    out = export(f"checkpoint={checkpoint}", f"format={fmt}", f"out={tmp_path / name}")
    fresh = build_model("convnext_atto", num_classes=4, depths=[1, 1, 2, 1], dims=[8, 16, 24, 32]).eval()
    weights = torch.load(out, weights_only=True)["model"] if fmt == "official" else safetensors.torch.load_file(out)
    fresh.load_state_dict(weights, strict=True)
    with torch.no_grad():
        assert_close(fresh(batch()), model(batch()), rtol=0, atol=0)


def test_timm_export_of_a_size_timm_does_not_name_loads_into_timms_class(tmp_path, capsys):
    """No conf/model config, so no timm name: the file is in the shapes of timm's ConvNeXt class
    built to the same depths and dims (Linear MLPs, as timm's T..XL)."""
    model = randomize_(build_model("convnext_atto", num_classes=4, depths=[1, 1, 2, 1], dims=[8, 16, 24, 32])).eval()
    checkpoint = tmp_path / "odd.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    out = export(
        f"checkpoint={checkpoint}",
        "format=timm",
        f"out={tmp_path / 'odd_timm.pth'}",
        "model=convnext_atto",
        "model.depths=[1,1,2,1]",
        "model.dims=[8,16,24,32]",
    )
    theirs = timm.models.convnext.ConvNeXt(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], num_classes=4).eval()
    theirs.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert official_to_timm(model.state_dict()).keys() == theirs.state_dict().keys()
    # The printed line builds exactly that model: run it.
    line = capsys.readouterr().out.split("load it with: ", 1)[1].strip()
    scope = {"timm": timm}
    exec(line, scope)
    with torch.no_grad():
        assert_close(scope["model"].eval()(batch()), model(batch()), rtol=0, atol=1e-5)
    with torch.no_grad():
        assert_close(theirs(batch()), model(batch()), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# ONNX: the command, the file's contract, predict.py's two backends
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(module_tmp_path) -> tuple[Path, torch.nn.Module]:
    """A smaller model than atto (the exporter's time grows with the blocks), of a size no config has."""
    size = {"model.depths": "[1,1,2,1]", "model.dims": "[8,16,24,32]"}
    model = randomize_(build_model("convnext_atto", num_classes=4, depths=[1, 1, 2, 1], dims=[8, 16, 24, 32]), std=0.2)
    path = training_checkpoint(
        module_tmp_path / "small.pt",
        model.eval(),
        "convnext_atto",
        **size,
        **{"data.num_classes": 4, "data.img_size": IMG_SIZE, "aug.crop_pct": CROP_PCT},
    )
    return path, model


@pytest.fixture(scope="module")
def onnx_file(small, module_tmp_path) -> Path:
    """Written by the command as a user runs it (`python -m convnext_train.export`)."""
    checkpoint, _ = small
    out = module_tmp_path / "deploy" / "model.onnx"
    (result,) = run_scripts([("convnext_train.export", [f"checkpoint={checkpoint}", "format=onnx", f"out={out}"])])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read back by ONNX Runtime: largest logit difference" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    return out


@pytest.mark.slow  # the ONNX export takes seconds even for a tiny model
def test_the_onnx_file_carries_the_input_contract_and_takes_any_batch(small, onnx_file):
    _, model = small
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["convnext_train.img_size"] == str(IMG_SIZE)
    assert float(metadata["convnext_train.crop_pct"]) == CROP_PCT
    assert metadata["convnext_train.resize"] == "shorter_side_then_center_crop"  # below 384 px
    assert metadata["convnext_train.interpolation"] == "bicubic"
    assert json.loads(metadata["convnext_train.mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(metadata["convnext_train.std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert json.loads(metadata["convnext_train.class_names"]) == CLASS_NAMES
    (images,) = session.get_inputs()
    assert images.name == "images" and images.shape[1:] == [3, IMG_SIZE, IMG_SIZE] and isinstance(images.shape[0], str)
    assert min(o.version for o in onnx.load(str(onnx_file)).opset_import if o.domain == "") >= 18
    for count in (1, 5):
        x = batch(count=count)
        logits, embeddings = session.run(["logits", "embeddings"], {"images": x.numpy()})
        with torch.no_grad():
            assert_close(torch.from_numpy(logits), model(x), rtol=0, atol=1e-4)
            assert_close(torch.from_numpy(embeddings), model.forward_features(x), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def photos(module_tmp_path) -> Path:
    """New images, one folder deep and two, and a truncated JPEG."""
    root = make_imagefolder(module_tmp_path / "data", classes=2, train_per_class=1, val_per_class=3, size=40)
    folder = module_tmp_path / "new"
    (folder / "line_2").mkdir(parents=True)
    sources = sorted((root / "val").rglob("*.jpg"))
    for i, source in enumerate(sources):
        (folder / ("line_2" if i % 2 else "") / f"shot_{i}.jpg").write_bytes(source.read_bytes())
    (folder / "truncated.jpg").write_bytes(sources[0].read_bytes()[:200])
    return folder


@pytest.mark.slow
def test_predict_with_onnxruntime_writes_the_pytorch_backends_csv_and_embeddings(small, onnx_file, photos, tmp_path):
    checkpoint, model = small
    common = [f"images={photos}", "topk=3", "batch_size=4", "num_workers=0", "embeddings=true"]
    results = run_scripts(
        [
            ("predict.py", [f"checkpoint={checkpoint}", f"out={tmp_path / 'torch.csv'}", *common]),
            ("predict.py", ["backend=onnxruntime", f"checkpoint={onnx_file}", f"out={tmp_path / 'ort.csv'}", *common]),
        ]
    )
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "1 of them could not be read" in result.stdout
    torch_rows, ort_rows = (list(csv.DictReader((tmp_path / f"{n}.csv").open())) for n in ("torch", "ort"))
    assert [r["path"] for r in torch_rows] == [r["path"] for r in ort_rows] and len(torch_rows) == 7
    for ours, theirs in zip(torch_rows, ort_rows, strict=True):
        assert [ours[f"class_{k}"] for k in (1, 2, 3)] == [theirs[f"class_{k}"] for k in (1, 2, 3)]
        assert bool(ours["error"]) == bool(theirs["error"]) == ours["path"].endswith("truncated.jpg")
        if not ours["error"]:
            for k in (1, 2, 3):
                assert float(ours[f"prob_{k}"]) == pytest.approx(float(theirs[f"prob_{k}"]), abs=1e-4)
    torch_vectors, ort_vectors = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "ort.npy")
    assert torch_vectors.shape == ort_vectors.shape == (7, 32) and torch_vectors.dtype == np.float32
    for row, vector, other in zip(torch_rows, torch_vectors, ort_vectors, strict=True):
        if row["error"]:
            assert np.isnan(vector).all() and np.isnan(other).all()
            continue
        image = eval_transform(IMG_SIZE, CROP_PCT)(Image.open(row["path"]).convert("RGB"))
        with torch.no_grad():
            expected = model.forward_features(image[None])[0].numpy()
        np.testing.assert_allclose(vector, expected, atol=1e-5)
        np.testing.assert_allclose(other, expected, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------------
def plain_onnx(path: Path) -> Path:
    """A valid ONNX file that is not ours: no metadata."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["logits"])],
        "plain",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [None, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 3, 8, 8])],
    )
    onnx.save(onnx.helper.make_model(graph), path)
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["format=bogus", "out=x.pth"], "format=bogus is not a format we write: choose one of official, timm, hf"),
        (["format=onnx", "out=x.pth"], "format=onnx writes a .onnx file"),
        (["format=timm", "out=x.PTH"], "format=timm writes a .pth or .pt or .bin or .safetensors file"),
        (["format=official", "out=x.pth", "precision=fp16"], "precision=fp16 is for format=onnx"),
        (["format=official", "out=x.pth", "opset=20"], "opset=20: format=onnx only"),
        (["format=onnx", "out=x.onnx", "opset=9"], "opset=9: format=onnx only, and 18 or later"),
        (["format=hf", "out=taken.pth", "overwrite=true"], "is a file: format=hf writes a directory there"),
    ],
)
def test_config_problems_are_named_before_any_work(trained, tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.pth").write_bytes(b"keep me")
    with pytest.raises(UserError, match=message):
        export(f"checkpoint={trained[0]}", *overrides)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.pth"]


@pytest.mark.slow  # ten commands, each a process of its own
def test_bad_input_is_one_line_and_exit_code_2_with_nothing_written(trained, photos, tmp_path):
    checkpoint, _ = trained
    taken = tmp_path / "taken.pth"
    taken.write_bytes(b"keep me")
    v2 = tmp_path / "v2.pth"
    torch.save({"model": build_model("convnextv2_atto", num_classes=2).state_dict()}, v2)
    isotropic = tmp_path / "iso.pth"
    torch.save({"model": build_model("convnext_iso_s", num_classes=2, depth=2, dim=16).state_dict()}, isotropic)
    export_cases = {
        "format=bogus is not a format we write: choose one of official, timm, hf, torchvision, safetensors, onnx": [
            f"checkpoint={checkpoint}",
            "format=bogus",
            f"out={tmp_path / 'x.pth'}",
        ],
        f"out={taken} exists: choose another out=, or add overwrite=true": [
            f"checkpoint={checkpoint}",
            "format=official",
            f"out={taken}",
        ],
        "format=onnx writes a .onnx file": [f"checkpoint={checkpoint}", "format=onnx", f"out={tmp_path / 'x.pth'}"],
        "format=torchvision cannot take convnextv2_atto (torchvision has no ConvNeXt V2); it can go to "
        "format=official, timm, hf, safetensors, onnx": [
            f"checkpoint={v2}",
            "format=torchvision",
            f"out={tmp_path / 'x.pth'}",
        ],
        "it can go to format=official, safetensors, onnx": [
            f"checkpoint={isotropic}",
            "format=timm",
            "model=convnext_iso_s",
            "model.depth=2",
            "model.dim=16",
            f"out={tmp_path / 'x.pth'}",
        ],
        # timm's blocks compute the same as ours in another order: about 1e-6 apart, not 1e-12.
        "the timm read-back of the export differs from this model": [
            f"checkpoint={checkpoint}",
            "format=timm",
            "tolerance=1e-12",
            f"out={tmp_path / 'x.pth'}",
        ],
    }
    predict_cases = {
        "no convnext_train metadata": ["backend=onnxruntime", f"checkpoint={plain_onnx(tmp_path / 'plain.onnx')}"],
        "is an ONNX file: add backend=onnxruntime": [f"checkpoint={tmp_path / 'plain.onnx'}"],
        "ONNX Runtime cannot read": ["backend=onnxruntime", f"checkpoint={checkpoint}"],
        "backend=onnxruntime runs the ONNX file as exported: precision=bf16 does not apply": [
            "backend=onnxruntime",
            f"checkpoint={tmp_path / 'plain.onnx'}",
            "precision=bf16",
        ],
    }
    commands = [("convnext_train.export", args) for args in export_cases.values()]
    commands += [
        ("predict.py", [*args, f"images={photos}", f"out={tmp_path / 'p.csv'}"]) for args in predict_cases.values()
    ]
    results = run_scripts(commands)
    for expected, result in zip([*export_cases, *predict_cases], results, strict=True):
        assert result.returncode == 2, (expected, result.stderr[-2000:])
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert taken.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iso.pth", "plain.onnx", "taken.pth", "v2.pth"]


def test_overwrite_replaces_a_directory_whole(trained, tmp_path):
    checkpoint, model = trained
    out = tmp_path / "hf_model"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"from an older export")
    export(f"checkpoint={checkpoint}", "format=hf", f"out={out}", "overwrite=true")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"]
    with torch.no_grad():
        assert_close(read_hf(out)(batch()), model(batch()), rtol=0, atol=1e-5)
    # A directory with more than an export's files in it (here: a folder) is never replaced whole.
    (out / "runs").mkdir()
    with pytest.raises(UserError, match="holds more than an earlier export"):
        export(f"checkpoint={checkpoint}", "format=hf", f"out={out}", "overwrite=true")
    assert (out / "runs").is_dir() and (out / "config.json").is_file()


@pytest.mark.slow
def test_fp16_onnx_passes_its_tolerance_and_a_tighter_one_writes_nothing(small, tmp_path):
    checkpoint, model = small
    out = export(f"checkpoint={checkpoint}", "format=onnx", "precision=fp16", f"out={tmp_path / 'half.onnx'}")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    assert session.get_modelmeta().custom_metadata_map["convnext_train.precision"] == "fp16"
    (logits,) = session.run(["logits"], {"images": batch().half().numpy()})
    with torch.no_grad():
        reference = model(batch())
    assert_close(torch.from_numpy(logits).float(), reference, rtol=0, atol=1e-2 * reference.abs().max().item())
    weights = [t for t in onnx.load(str(out)).graph.initializer if t.data_type != onnx.TensorProto.INT64]
    assert weights and {t.data_type for t in weights} == {onnx.TensorProto.FLOAT16}  # half the bytes
    with pytest.raises(UserError, match="ONNX Runtime read-back of the export differs"):
        export(
            f"checkpoint={checkpoint}", "format=onnx", "precision=fp16", "tolerance=1e-6", f"out={tmp_path / 'x.onnx'}"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.onnx"]
