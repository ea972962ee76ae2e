"""data=wds, for real: tar shards written by data/write_wds.py and directly by webdataset.ShardWriter
(without the index) from tiny JPEG files on disk, read through build_loaders / build_val_loader.

Images are recognised by their pixels: with aug=none each one goes through the eval transform, so a
batch's image equals exactly one ImageFolder image's (the shards store the files' own bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_model, make_imagefolder, randomize_, run_script
from omegaconf import OmegaConf

from convnext_train.configs import CONFIG_DIR

sys.path.insert(0, str(REPO / "data"))  # data/ is a folder of scripts, not a package
import write_wds  # noqa: E402

from convnext_train.data.imagefolder import ImageFolderDataset  # noqa: E402
from convnext_train.data.sources import LoaderArgs, build_loaders, build_val_loader  # noqa: E402
from convnext_train.data.transforms import eval_transform  # noqa: E402
from convnext_train.errors import UserError  # noqa: E402
from convnext_train.tasks.classification import evaluate  # noqa: E402

CPU = torch.device("cpu")
SIZE = 32  # img_size; the files are 40 px
BATCH = 4


def aug_config(name: str):
    return OmegaConf.load(CONFIG_DIR / "aug" / f"{name}.yaml")


def wds_data(root: Path, **overrides):
    base = OmegaConf.load(CONFIG_DIR / "data" / "wds.yaml")
    settings = {"root": str(root), "num_classes": 4, "img_size": SIZE, "num_workers": 2, "pin_memory": False}
    return OmegaConf.merge(base, settings, {"shuffle_buffer": 8}, overrides)


def loaders(
    root: Path,
    aug: str = "none",
    *,
    seed: int = 3,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = BATCH,
    **overrides,
):
    return build_loaders(
        wds_data(root, **overrides),
        aug_config(aug),
        LoaderArgs(seed=seed, batch_size=batch_size, device=CPU, rank=rank, world_size=world_size),
    )


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def epoch_images(train_loaders, epoch: int, consumed: int = 0) -> list[str]:
    train_loaders.start_at(epoch, consumed)
    return [fingerprint(image) for images, _, _ in train_loaders.train for image in images]


@pytest.fixture(scope="module")
def tree(module_tmp_path) -> Path:
    """64 training and 16 validation JPEGs of 4 classes."""
    return make_imagefolder(module_tmp_path / "tree")


@pytest.fixture(scope="module")
def reference(tree) -> dict[str, dict[str, int]]:
    """split -> {fingerprint of the eval-transformed image: its label}, from the ImageFolder files."""
    transform = eval_transform(SIZE, aug_config("none").crop_pct)
    out = {}
    for split in ("train", "val"):
        images = ImageFolderDataset(tree, split)
        out[split] = {fingerprint(transform(images[i].image)): images[i].target for i in range(len(images))}
        assert len(out[split]) == len(images)  # every image recognisable
    return out


@pytest.fixture(scope="module")
def written(tree, module_tmp_path) -> Path:
    """write_wds.py's shards (10 images each: 7 training and 2 validation shards) and index."""
    out = module_tmp_path / "written"
    assert write_wds.main([str(tree), str(out), "--shard-size", "10", "--workers", "2"]) == 0
    return out


def write_directly(tree: Path, out: Path, *, per_shard: int = 12, label=True) -> Path:
    """Shards as another tool writes them: webdataset.ShardWriter itself, ImageFolder order, no index."""
    import webdataset

    out.mkdir(parents=True)
    for split in ("train", "val"):
        images = ImageFolderDataset(tree, split)
        with webdataset.ShardWriter(f"{out}/{split}-%06d.tar", maxcount=per_shard, verbose=0) as sink:
            for i, (path, target) in enumerate(images.samples):
                sample = {"__key__": f"{split}{i:05d}", "jpg": Path(path).read_bytes()}
                sink.write({**sample, "cls": target} if label else sample)
    return out


@pytest.fixture(scope="module")
def direct(tree, module_tmp_path) -> Path:
    return write_directly(tree, module_tmp_path / "direct")


@pytest.fixture(params=["written", "direct"])
def shards(request) -> Path:
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------------------------------
# The reader: every image once, seeded order, resume, validation
# --------------------------------------------------------------------------------------------------
def test_two_ranks_of_two_workers_see_every_training_image_once_per_epoch_in_a_seeded_order(shards, reference):
    ranks = [loaders(shards, rank=r, world_size=2) for r in (0, 1)]
    assert [len(r.train) for r in ranks] == [8, 8]  # 32 images each in batches of 4: the same steps
    assert all(r.train_length == 64 for r in ranks)
    orders = {}
    for epoch in (0, 1):
        orders[epoch] = [epoch_images(r, epoch) for r in ranks]
        seen = orders[epoch][0] + orders[epoch][1]
        assert len(seen) == 64 and set(seen) == set(reference["train"])  # each once, none missing
    assert orders[0] != orders[1] and set(orders[0][0]) != set(orders[1][0])  # a new order and split each epoch
    assert [epoch_images(loaders(shards, rank=r, world_size=2), 0) for r in (0, 1)] == orders[0]  # same seed
    assert epoch_images(loaders(shards, seed=4, rank=0, world_size=2), 0) != orders[0][0]


def test_labels_are_the_imagefolder_ones(shards, reference):
    train = loaders(shards, num_workers=0)
    train.start_at(0, 0)
    for images, targets, replaced in train.train:
        assert [reference["train"][fingerprint(image)] for image in images] == targets.tolist()
        assert not replaced.any()


@pytest.mark.parametrize("consumed_batches", [1, 3])
def test_start_at_mid_epoch_continues_with_the_same_images_and_pixels(written, consumed_batches):
    """The full recipe (random crops, RandAugment, erasing): a fresh loader, as a restarted process
    builds, started after k micro-batches yields exactly the uninterrupted epoch's batches from k on
    (k odd: the next batch is the second worker's)."""
    uninterrupted = loaders(written, "recipe", rank=1, world_size=2)
    uninterrupted.start_at(1, 0)
    expected = list(uninterrupted.train)
    resumed = loaders(written, "recipe", rank=1, world_size=2)
    resumed.start_at(1, consumed_batches * BATCH)
    assert len(resumed.train) == len(expected) - consumed_batches
    got = list(resumed.train)
    assert len(got) == len(expected) - consumed_batches
    for (a_images, a_targets, _), (b_images, b_targets, _) in zip(expected[consumed_batches:], got, strict=True):
        assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"world_size": 2}, "this run has 2 processes: "),
        ({"num_workers": 1}, "this run has data.num_workers=1: "),
        ({"batch_size": 8}, "this run has trainer.micro_batch_size=8: "),
        ({"world_size": 2, "num_workers": 1}, "this run has 2 processes, data.num_workers=1: "),
    ],
)
def test_a_resume_inside_an_epoch_under_another_layout_is_refused_naming_the_change(written, change, named, capsys):
    """The checkpoint's `data` part (the layout its epoch was read with: 1 process, 2 workers, micro-
    batches of 4) against a resumed run's; what the trainer calls when the run stops inside epoch 3."""
    saved = loaders(written).state.state_dict()
    resumed = loaders(written, **change)
    resumed.state.load_state_dict(saved)
    with pytest.raises(UserError) as refused:
        resumed.state.check_mid_epoch(2)
    message = str(refused.value)
    assert "\n" not in message and "stopped inside epoch 3" in message and named in message
    assert "Resume with 1 process, data.num_workers=2, trainer.micro_batch_size=4 until" in message
    assert "data.allow_layout_change=true" in message
    # On purpose: the rest of that epoch in this run's order, said once (rank 0).
    for rank in (0, 1):
        allowed = loaders(written, allow_layout_change=True, **({"rank": rank, "world_size": 2} | change))
        allowed.state.load_state_dict(saved)
        allowed.state.check_mid_epoch(2)
        printed = capsys.readouterr().out
        assert ("data.allow_layout_change=true: the rest of epoch 3" in printed) == (rank == 0), printed


def test_a_resume_inside_an_epoch_under_the_same_plan_goes_on(written):
    """The same layout, and 0 loader workers for 1 (the main process reads the one block a single
    worker would: the same batches, which is why they count as the same plan)."""
    for saved_workers, workers in ((2, 2), (0, 1), (1, 0)):
        resumed = loaders(written, num_workers=workers)
        resumed.state.load_state_dict(loaders(written, num_workers=saved_workers).state.state_dict())
        resumed.state.check_mid_epoch(2)
    assert epoch_images(loaders(written, "recipe", num_workers=0), 2) == epoch_images(
        loaders(written, "recipe", num_workers=1), 2
    )


def test_augmentations_do_not_depend_on_the_worker_that_decodes_them(written):
    """One process's epoch under the full recipe with 0 and 2 loader workers: other blocks and buffer
    orders, the same augmented images (each seeded by its own index and the epoch)."""
    without, with_two = (epoch_images(loaders(written, "recipe", num_workers=w), 2) for w in (0, 2))
    assert without != with_two and sorted(without) == sorted(with_two) and len(set(without)) == 64


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_counts_every_image_once(shards, reference, world_size):
    seen = []
    for rank in range(world_size):
        val = build_loaders(
            wds_data(shards),
            aug_config("none"),
            LoaderArgs(seed=0, batch_size=3, device=CPU, rank=rank, world_size=world_size),
        ).val
        batches = list(val)
        assert len(val) == len(batches)  # what evaluation's lockstep under FSDP counts on
        seen += [fingerprint(image) for images, _, _ in batches for image in images]
    assert len(seen) == 16 and set(seen) == set(reference["val"])


# --------------------------------------------------------------------------------------------------
# eval.py and torchrun
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_fixed_model_scores_the_same_with_eval_py_on_shards_as_on_the_imagefolder(tree, written, tmp_path):
    """ConvNeXt-atto with perturbed weights (its answers then differ image by image, even within a
    class), saved, scored by eval.py on the shards and in-process on the ImageFolder tree."""
    torch.manual_seed(0)
    model = randomize_(build_model("convnext_atto", num_classes=4), std=0.02).eval()
    imagefolder = OmegaConf.merge(
        OmegaConf.load(CONFIG_DIR / "data" / "imagenet.yaml"),
        {"root": str(tree), "num_classes": 4, "img_size": SIZE, "num_workers": 0, "pin_memory": False},
    )
    torch.save(model.state_dict(), tmp_path / "model.pt")

    result = run_script(
        "eval.py", "model=convnext_atto", f"checkpoint={tmp_path / 'model.pt'}", "data=wds", f"data.root={written}",
        "data.num_classes=4", f"data.img_size={SIZE}", "data.num_workers=2", f"hydra.run.dir={tmp_path / 'eval'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    loader = build_val_loader(imagefolder, 0.875, LoaderArgs(seed=0, batch_size=100, device=CPU))
    with torch.no_grad():
        model = model.to(memory_format=torch.channels_last)  # as eval.py runs it
        expected = evaluate(model, loader, device=CPU, autocast=nullcontext, memory_format=torch.channels_last)
    assert scored["images"] == expected["images"] == 16
    assert 25 < expected["top1"] < 100  # neither all right nor one class for all: the comparison can fail
    assert scored["top1"] == expected["top1"]


TORCHRUN_SCRIPT = """
import hashlib, json, sys
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from convnext_train.data.sources import LoaderArgs, build_loaders

dist.init_process_group("gloo")
data = OmegaConf.merge(OmegaConf.load("convnext_train/conf/data/wds.yaml"),
                       dict(root=sys.argv[1], num_classes=4, img_size=32, num_workers=2, pin_memory=False))
loaders = build_loaders(data, OmegaConf.load("convnext_train/conf/aug/none.yaml"), LoaderArgs(seed=7, batch_size=4, device=torch.device("cpu"), rank=dist.get_rank(), world_size=dist.get_world_size()))
seen = []
for epoch in (0, 1):
    loaders.start_at(epoch, 0)
    mine = [hashlib.sha1(image.numpy().tobytes()).hexdigest() for images, _, _ in loaders.train for image in images]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    seen.append(everyone)
if dist.get_rank() == 0:
    open(sys.argv[2], "w").write(json.dumps(seen))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_see_every_training_image_once_per_epoch(written, reference, tmp_path):
    """Two real processes (gloo), each with two loader workers, read their shares and gather them."""
    script = tmp_path / "epochs.py"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*torchrun, str(script), str(written), str(tmp_path / "seen.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = json.loads((tmp_path / "seen.json").read_text())
    for ranks in epochs:
        assert [len(images) for images in ranks] == [32, 32]
        assert set(ranks[0]) | set(ranks[1]) == set(reference["train"])  # 64 distinct: once each
    assert epochs[0] != epochs[1]


@pytest.mark.slow
def test_train_py_killed_mid_epoch_on_shards_resumes_bitwise_equal_under_its_layout_only(tree, written, tmp_path):
    """The trainer's resume through the wds loader: one micro-batch per step, so the kill after step 5
    leaves an odd number of batches consumed by two workers (the renumbering case). Resumed with one
    worker it stops before any step, touching nothing (the rest of epoch 2 is another plan's); resumed
    with two it ends as the uninterrupted run; with one and data.allow_layout_change=true (a copy) it
    goes on, saying so. The same checkpoints cut back to epoch 1's end (step 4: nothing of epoch 2
    read) resume with one worker."""
    from test_resume import EVERY_STEP, assert_ends_like, contents, copy_run, kill_once_saved
    from test_train import TINY_RUN, assert_user_error, read_jsonl

    run = [*TINY_RUN, "data=wds", f"data.root={written}", "data.num_workers=2", "trainer.micro_batch_size=16"]
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    result = run_script("train.py", *run, f"hydra.run.dir={reference_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    args = [*run, f"hydra.run.dir={killed_dir}", EVERY_STEP]
    kill_once_saved(args, killed_dir / "checkpoints" / "step_000000005.pt")  # epoch 2, after its first batch

    def copy_apart(name: str) -> Path:
        # Checkpoints hard-linked (never rewritten), metrics.jsonl copied: a resume may append to it.
        copy = copy_run(killed_dir, tmp_path / name)
        (copy / "metrics.jsonl").unlink()
        shutil.copy(killed_dir / "metrics.jsonl", copy / "metrics.jsonl")
        return copy

    boundary = copy_apart("boundary") / "checkpoints"
    for path in boundary.iterdir():
        if path.name == "last.pt" or path.name.startswith("step_"):
            path.unlink()
    os.link(boundary / "best.pt", boundary / "step_000000004.pt")  # epoch 1's end, best by its evaluation

    before = contents(killed_dir)
    refused = run_script("train.py", *args, "data.num_workers=1")
    assert_user_error(
        refused,
        "stopped inside epoch 2",
        "1 process, data.num_workers=2, trainer.micro_batch_size=16",  # the checkpoint's layout: the way back
        "this run has data.num_workers=1",  # the change
        "data.allow_layout_change=true",  # the way on
    )
    after = contents(killed_dir)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    assert changed == ["run.lock"], f"the refused job changed {changed}"  # its pid, in the lock file alone
    allowed_dir = copy_apart("allowed")

    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_ends_like(reference_dir, killed_dir)
    # write_wds's index names the classes; the checkpoints carry them for eval.py and predict.py.
    saved = torch.load(killed_dir / "checkpoints" / "last.pt", weights_only=False)
    assert saved["class_names"] == sorted(path.name for path in (tree / "train").iterdir())

    # On purpose (the key is no part of the recipe the resume checks): the rest of epoch 2 in another order.
    one_worker = ["data.num_workers=1", "data.allow_layout_change=true"]
    result = run_script("train.py", *run, f"hydra.run.dir={allowed_dir}", EVERY_STEP, *one_worker)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.allow_layout_change=true: the rest of epoch 2 is read in the order of 1 process, " in result.stdout
    assert [r["step"] for r in read_jsonl(allowed_dir / "metrics.jsonl") if "loss" in r] == list(range(1, 9))

    result = run_script("train.py", *run, f"hydra.run.dir={boundary.parent}", EVERY_STEP, "data.num_workers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at epoch 1, step 4" in result.stdout and "allow_layout_change" not in result.stdout
    assert [r["step"] for r in read_jsonl(boundary.parent / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


# --------------------------------------------------------------------------------------------------
# write_wds.py
# --------------------------------------------------------------------------------------------------
def shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({member.name.split(".")[0] for member in tar})


def test_writer_stops_at_an_unreadable_image_and_a_rerun_keeps_the_complete_shards(tmp_path, capsys):
    tree = make_imagefolder(tmp_path / "tree", classes=2, train_per_class=10, val_per_class=1)
    clean, out = tmp_path / "clean", tmp_path / "out"
    options = ["--splits", "train", "--shard-size", "4", "--workers", "2"]
    assert write_wds.main([str(tree), str(clean), *options]) == 0
    # Break an image of the third of five shards: the first two are complete when the writer stops.
    images = ImageFolderDataset(tree, "train")
    broken = Path(images.samples[int(shard_keys(clean / "train-000002.tar")[0])][0])
    original = broken.read_bytes()
    broken.write_bytes(original[: len(original) // 3])  # a truncated JPEG
    with pytest.raises(SystemExit) as stopped:
        write_wds.main([str(tree), str(out), *options])
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and str(broken) in message and "--skip-corrupt" in message
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not (out / "train.json").exists()  # the index only once every shard is complete
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}

    broken.write_bytes(original)
    assert write_wds.main([str(tree), str(out), *options]) == 0
    assert "(2 kept, 3 written)" in capsys.readouterr().out
    assert {name: (out / name).stat().st_ino for name in before} == {n: v[0] for n, v in before.items()}
    assert {name: (out / name).stat().st_mtime_ns for name in before} == {n: v[1] for n, v in before.items()}
    for shard in clean.glob("*.tar"):  # the resumed result is the uninterrupted one, byte for byte
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    assert json.loads((out / "train.json").read_text())["images"] == 20
    assert write_wds.main([str(tree), str(out), *options]) == 0
    assert "up to date" in capsys.readouterr().out


def test_writer_skips_unreadable_images_when_asked_and_counts_them(tmp_path, capsys):
    tree = make_imagefolder(tmp_path / "tree", classes=2, train_per_class=6, val_per_class=3)
    broken = tree / "train" / "class_1" / "train_1_2.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    assert write_wds.main([str(tree), str(out), "--shard-size", "5", "--workers", "1", "--skip-corrupt"]) == 0
    assert str(broken) in capsys.readouterr().out
    index = json.loads((out / "train.json").read_text())
    assert index["images"] == 11 and index["skipped"] == [str(broken)]
    train = build_loaders(
        wds_data(out, num_classes=2), aug_config("none"), LoaderArgs(seed=0, batch_size=1, device=CPU)
    ).train
    assert len(list(train)) == 11


# --------------------------------------------------------------------------------------------------
# Bad input: one line each
# --------------------------------------------------------------------------------------------------
def one_line_error(root: Path, match: str, **overrides) -> str:
    with pytest.raises(UserError, match=match) as error:
        train = loaders(root, **overrides)
        list(train.train)  # some problems show only when a sample is read
    assert "\n" not in str(error.value)
    return str(error.value)


def test_no_shards_is_one_line(tmp_path):
    one_line_error(tmp_path, r"no shards .*train-\*\.tar.*python data/write_wds.py")


def test_a_sample_without_a_label_is_one_line(tree, tmp_path):
    one_line_error(write_directly(tree, tmp_path / "shards", label=False), r"sample train00000 has no \.cls member")


def test_a_class_count_mismatch_is_one_line(written, direct):
    one_line_error(written, r"train.json lists 4 classes but data.num_classes=5", num_classes=5)
    # Without an index the labels themselves are checked, as they are read.
    one_line_error(direct, r"has label 3 but data.num_classes=3", num_classes=3, num_workers=0)


def test_an_index_that_does_not_match_its_shards_is_one_line(tree, tmp_path):
    out = tmp_path / "out"
    assert write_wds.main([str(tree), str(out), "--shard-size", "30", "--workers", "1"]) == 0
    (out / "train-000001.tar").unlink()
    one_line_error(out, r"train.json does not describe the shards beside it .*train-000001.tar")


def test_allow_layout_change_must_be_a_boolean(written):
    from hydra import compose, initialize_config_dir

    from convnext_train.config import validate_train_config

    overrides = ["data=wds", f"data.root={written}", "data.num_classes=4", "data.allow_layout_change=maybe"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(UserError, match=r"^invalid config: data.allow_layout_change=maybe: must be true or false$"):
        validate_train_config(cfg)


def test_without_webdataset_it_says_how_to_install_it(written, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # what a missing package does to `import`
    one_line_error(written, r"needs the webdataset package.*pip install 'convnext-train\[wds\]'")
