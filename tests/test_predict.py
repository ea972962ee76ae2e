"""From a trained checkpoint to scores and predictions: eval.py without model= (per-class accuracy,
confusion matrix) and predict.py on a folder of new images, checked against the model's own forward.

The checkpoint holds what the Checkpointer writes (weights, EMA weights, step, epoch, the run's
resolved config as Hydra composes conf/train.yaml) and the class names; its weights are perturbed so
that the predictions differ from image to image and class to class.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_imagefolder, randomize_, run_script
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from convnext_train.configs import CONFIG_DIR
from convnext_train.errors import UserError
from convnext_train.evaluate import _per_class, _Recorder
from convnext_train.inference import class_names, load_checkpoint_model
from convnext_train.predict import find_images
from convnext_train.weights import CheckpointError, export_hf

CLASS_NAMES = ["scratch", "dent", "rust", "clean"]
IMG_SIZE, CROP_PCT = 32, 0.6  # not the defaults (224, 0.875): eval and predict must use the checkpoint's


@pytest.fixture(scope="module")
def trained(module_tmp_path) -> tuple[Path, Path, torch.nn.Module]:
    """(data root, checkpoint file, the model in it)."""
    root = make_imagefolder(module_tmp_path / "data", classes=4, train_per_class=1, val_per_class=4, size=40)
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "model=convnext_atto",
                "data.num_classes=4",
                f"data.img_size={IMG_SIZE}",
                f"aug.crop_pct={CROP_PCT}",
                f"data.root={root}",
            ],
        )
    model = randomize_(build_model("convnext_atto", num_classes=4), std=0.2).eval()
    ema = randomize_(build_model("convnext_atto", num_classes=4), std=0.2, seed=1)
    checkpoint = {
        "model": model.state_dict(),
        "model_ema": ema.state_dict(),
        "optimizer": {},
        "step": 4,
        "epoch": 1,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": CLASS_NAMES,
    }
    path = module_tmp_path / "best.pt"
    torch.save(checkpoint, path)
    return root, path, model


@torch.no_grad()
def forward(model: torch.nn.Module, image_path: Path) -> torch.Tensor:
    """Class probabilities of one image under the official eval preprocessing, written out here."""
    preprocess = transforms.Compose(
        [
            transforms.Resize(int(IMG_SIZE / CROP_PCT), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(IMG_SIZE),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )
    image = preprocess(Image.open(image_path).convert("RGB"))
    return model(image[None]).softmax(dim=1)[0]


# --------------------------------------------------------------------------------------------------
# eval.py without model=
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(trained, module_tmp_path):
    root, checkpoint, _ = trained
    out = module_tmp_path / "eval"
    result = run_script(
        "eval.py",
        f"checkpoint={checkpoint}",
        f"data.root={root}",  # no model=, data.num_classes, data.img_size, eval.crop_pct: the checkpoint's
        "data.num_workers=0",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_eval_without_model_scores_per_class_as_a_hand_count(trained, evaluated):
    root, _, model = trained
    out, result = evaluated
    scores = json.loads((out / "eval.json").read_text())
    assert scores["model"] == "convnext_atto" and "| convnext_atto |" in result.stdout
    assert scores["img_size"] == IMG_SIZE and scores["images"] == 16
    hits = {name: 0 for name in CLASS_NAMES}
    for index, name in enumerate(CLASS_NAMES):  # make_imagefolder's folders class_<i>, in order
        for image in sorted((root / "val" / f"class_{index}").glob("*.jpg")):
            hits[name] += int(forward(model, image).argmax()) == index
    assert 0 < sum(hits.values()) < 16  # some right, some wrong: the comparison below can tell
    assert scores["top1"] == pytest.approx(100 * sum(hits.values()) / 16)
    assert scores["per_class"] == {name: {"top1": 100 * hits[name] / 4, "images": 4} for name in CLASS_NAMES}
    png = Path(scores["confusion_matrix"])
    assert png.parent == out and png.name == "confusion_matrix.png"
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) >= 200


def test_per_class_counts_the_recorded_forwards_and_is_skipped_above_the_limit(tmp_path, capsys):
    model = torch.nn.Identity()  # its logits are the batch: one-hot predictions 0, 1, 1, 3
    recorder = _Recorder(model)
    batch = (torch.eye(4)[[0, 1, 1, 3]], torch.arange(4), torch.zeros(4, dtype=torch.bool))
    for images, _, _ in recorder.batches([batch]):
        model(images)
    recorder.close()
    png = tmp_path / "matrix.png"
    assert _per_class(recorder, CLASS_NAMES, 3, png) == {}
    assert "4 classes > eval.per_class_max=3" in capsys.readouterr().out and not png.exists()
    scores = _per_class(recorder, CLASS_NAMES, 4, png)
    assert [scores["per_class"][name]["top1"] for name in CLASS_NAMES] == [100, 100, 0, 100]
    assert png.is_file()


@pytest.mark.slow
def test_eval_with_the_wrong_model_names_the_right_one(trained, tmp_path):
    _, checkpoint, _ = trained
    result = run_script("eval.py", "model=convnext_femto", f"checkpoint={checkpoint}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "this checkpoint" in result.stderr and "is a convnext_atto" in result.stderr
    assert "add model=convnext_atto" in result.stderr and "Traceback" not in result.stderr


def test_a_misfitting_model_config_is_named_before_any_tensor(trained):
    _, checkpoint, _ = trained
    femto = OmegaConf.load(CONFIG_DIR / "model" / "convnext_femto.yaml")
    with pytest.raises(CheckpointError, match="is a convnext_atto, a different architecture than model=convnext_femto"):
        load_checkpoint_model(checkpoint, femto, chosen_variant="convnext_femto")
    with pytest.raises(CheckpointError, match="4-class head but data.num_classes=10; set data.num_classes=4"):
        load_checkpoint_model(checkpoint, None, num_classes=10)


def test_our_checkpoint_and_a_hugging_face_directory_load_without_model(trained, tmp_path):
    _, checkpoint, model = trained
    ours = load_checkpoint_model(checkpoint, None)
    assert (ours.variant, ours.class_names, ours.img_size, ours.crop_pct) == (
        "convnext_atto",
        CLASS_NAMES,
        IMG_SIZE,
        CROP_PCT,
    )
    probe = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.model(probe), model(probe))
        ema = load_checkpoint_model(checkpoint, None, use_ema=True).model
        assert not torch.allclose(ema(probe), model(probe))  # use_ema takes the other weights
    export_hf(model, tmp_path / "hf")
    hf = load_checkpoint_model(tmp_path / "hf", None)  # no saved config: config.json and the weights' sizes
    assert hf.variant == "convnext_atto" and len(hf.class_names) == 4
    with torch.no_grad():
        assert torch.allclose(hf.model(probe), model(probe), atol=1e-6)


def test_class_names_fall_back_to_numbers_when_the_checkpoint_has_none():
    assert class_names({"model": {}}, 3) == ["class 0", "class 1", "class 2"]
    assert class_names({"class_names": ["a", "b"]}, 3) == ["class 0", "class 1", "class 2"]  # another head size
    assert class_names({"hf_config": {"id2label": {"0": "cat", "1": "dog"}}}, 2) == ["cat", "dog"]


# --------------------------------------------------------------------------------------------------
# predict.py on a folder of new images
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_writes_the_models_own_top_k_and_lists_the_unreadable_file(trained, tmp_path):
    root, checkpoint, model = trained
    images = tmp_path / "new"
    (images / "line_2").mkdir(parents=True)
    good = sorted((root / "val").rglob("*.jpg"))[::3]  # one folder deep and two, various classes
    for i, source in enumerate(good):
        target = images / ("line_2" if i % 2 else "") / f"shot_{i}.jpg"
        target.write_bytes(source.read_bytes())
    (images / "truncated.jpg").write_bytes(good[0].read_bytes()[:200])
    (images / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "predictions.csv"
    result = run_script(
        "predict.py",
        f"checkpoint={checkpoint}",
        f"images={images}",
        "topk=3",
        f"out={out}",
        "num_workers=0",
        "batch_size=4",  # several batches, the last one short
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(out) in result.stdout and "1 of them could not be read" in result.stdout
    assert "img/s" in result.stderr  # the progress bar
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert set(rows) == {f"shot_{i}.jpg" for i in range(len(good))} | {"truncated.jpg"}
    assert rows["truncated.jpg"]["error"] and not rows["truncated.jpg"]["class_1"]
    for i in range(len(good)):
        row = rows[f"shot_{i}.jpg"]
        probabilities = forward(model, images / ("line_2" if i % 2 else "") / f"shot_{i}.jpg")
        top = probabilities.topk(3)
        assert row["error"] == ""
        assert [row[f"class_{k}"] for k in (1, 2, 3)] == [CLASS_NAMES[c] for c in top.indices.tolist()]
        # Printed to 6 decimals, from batches of 4 where this forward takes one image (about 2e-6 apart
        # on the CPU); another preprocessing moves them by 0.1 and more.
        assert [float(row[f"prob_{k}"]) for k in (1, 2, 3)] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_no_images_found_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    for spec in (tmp_path / "empty", tmp_path / "missing" / "*.jpg"):
        with pytest.raises(UserError, match="no images found at images=.*quoted glob"):
            find_images(str(spec))
    (tmp_path / "a.png").write_bytes(b"")
    assert find_images(str(tmp_path / "*.png")) == [str(tmp_path / "a.png")]


@pytest.mark.slow
def test_a_non_editable_install_runs_the_commands_from_anywhere(trained, tmp_path):
    """`pip install .` (not editable) into a folder of its own, run from outside the checkout: the
    configs come from inside the installed package (eval and predict find the checkpoint's
    architecture among them; train composes its config), and nothing is read from the checkout."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    # From a copy: setuptools builds in the source tree (build/, *.egg-info), which must stay as it is.
    ignored = shutil.ignore_patterns(".*", "outputs", "build", "*.egg-info", "__pycache__")
    source = shutil.copytree(REPO, tmp_path / "source", ignore=ignored)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_FIND_LINKS": ""},
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def command(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(site / "bin" / name), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    where = subprocess.run(
        [sys.executable, "-c", "from convnext_train import configs; print(configs.CONFIG_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == site / "convnext_train" / "conf" and (Path(where) / "train.yaml").is_file()

    root, checkpoint, _model = trained
    scored = command("convnext-eval", f"checkpoint={checkpoint}", f"data.root={root}")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "| convnext_atto |" in scored.stdout
    predicted = command("convnext-predict", f"checkpoint={checkpoint}", f"images={root / 'val'}", "out=p.csv")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert len((elsewhere / "p.csv").read_text().splitlines()) == 1 + 16
    exported = command("convnext-export", f"checkpoint={checkpoint}", "format=safetensors", "out=m.safetensors")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["m.safetensors", "outputs", "p.csv"]  # no export.log
    composed = command("convnext-train", "model=convnext_t", "data.root=/datasets/imagenet", "--cfg", "job")
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "drop_path_rate: 0.1" in composed.stdout and "lr: 0.004" in composed.stdout
