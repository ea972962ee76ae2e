"""Shared test helpers: the repository's model configs and small builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from forked import run_forked, script_env
from hydra.utils import instantiate
from omegaconf import OmegaConf

from convnext_train.configs import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG_DIR = CONFIG_DIR / "model"
MODEL_NAMES = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def model_config(name: str, **overrides):
    cfg = OmegaConf.load(MODEL_CONFIG_DIR / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def build_model(name: str, device: str | torch.device = "cpu", **overrides) -> torch.nn.Module:
    """Instantiate `conf/model/<name>.yaml` exactly as the trainer does (Hydra `_target_`)."""
    with torch.device(device):
        return instantiate(model_config(name, **overrides))


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter, so layer scale (1e-6), GRN (0) and LayerNorm (1, 0) stop hiding
    mistakes: after this, a block wired wrongly changes the logits well above comparison tolerances."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


# pytest-xdist runs test modules on several workers (pyproject.toml): each worker, and the train.py
# runs it starts, takes its share of the cores, so that the workers do not oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# The modules with the most work go to the workers first (xdist's loadfile hands out modules in
# collection order): a long module that starts last would run alone at the end while the other cores
# idle. Ranked by their time in the whole suite (`--durations`, summed per module), longest first.
_LONGEST_MODULES = (
    "test_distributed",
    "test_ffcv",
    "test_roadmap_training",
    "test_train",
    "test_models",
    "test_roadmap",
    "test_parallelize",
    "test_resume",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.stem
        return _LONGEST_MODULES.index(name) if name in _LONGEST_MODULES else len(_LONGEST_MODULES)

    items.sort(key=rank)  # stable: each module keeps its own order


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------------------------------
# Real data on disk and real processes
# --------------------------------------------------------------------------------------------------
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_imagefolder(
    root: Path, *, classes: int = 4, train_per_class: int = 16, val_per_class: int = 4, size: int = 40, seed: int = 0
) -> Path:
    """A tiny ImageFolder tree of real JPEG files whose classes differ by colour and stripe
    direction, so a model can learn them within a few steps."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((size, size, 3), dtype=np.float64)
                base[..., c % 3] = 160
                stripes = (
                    (np.arange(size) // 4 % 2 == 0)[:, None] if c % 2 else (np.arange(size) // 4 % 2 == 0)[None, :]
                )
                base += 60 * stripes[..., None]
                base += rng.normal(0, 25, base.shape)
                Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(folder / f"{split}_{c}_{i}.jpg", quality=90)
    return root


def run_script(
    script: str, *overrides: str, timeout: float = 600, env: dict | None = None, fresh: bool = False
) -> subprocess.CompletedProcess:
    """Run train.py / eval.py as a user would, from the repository root: a process of its own, forked
    from the tests' fork server (tests/forked.py: the imports are paid once), or with `fresh` a new
    interpreter (for what happens during the imports themselves)."""
    if not fresh:
        return run_forked(script, *overrides, timeout=timeout, env=env)
    return subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=REPO,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_scripts(commands: list[tuple]) -> list[subprocess.CompletedProcess]:
    """Several commands, each (a script of the repository or a module such as `convnext_train.bench`,
    its arguments[, packages to hide from it]), one after another, each a process of its own forked
    from the fork server. One result per command."""
    return [run_forked(command[0], *command[1], hide=tuple(command[2]) if command[2:] else ()) for command in commands]


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory) -> Path:
    """A directory for one module's shared fixtures (runs, photos, .beton files), removed when that
    module's tests are done unless one of them failed. Function-scoped `tmp_path` directories go as
    each test passes (pyproject's tmp_path_retention_policy); without this, the module-scoped runs
    of every module would pile up on disk (several GB) until the session ends."""
    path = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    failures_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failures_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))


def skip_module_without_ffcv() -> None:
    """For test modules that need FFCV (and the numba it brings): skip them where `dev.sh` recorded
    that FFCV cannot be installed on this machine (its system libraries are missing), quoting why;
    fail where it should be there, so that a broken install never passes as a skip. Asked of the
    installed packages, not by importing FFCV, which compiles numba code for seconds: every parallel
    worker collects every module."""
    import importlib.util

    if importlib.util.find_spec("ffcv") is not None and importlib.util.find_spec("numba") is not None:
        return
    marker = Path(sys.prefix) / "ffcv-unavailable"
    if not marker.is_file():
        raise RuntimeError("ffcv is not installed; `bash dev.sh test` installs it (see the README's 'Fast data path')")
    pytest.skip(f"FFCV is not installed: {marker.read_text().strip()}", allow_module_level=True)


def sample_photos() -> list[Image.Image]:
    """The two JPEG photographs bundled with scikit-learn, read from disk. (Imported here, not at
    the top: the GPU suite runs the CUDA-only tests on a machine without scikit-learn.)"""
    import sklearn.datasets

    photo_dir = Path(sklearn.datasets.__file__).parent / "images"
    return [Image.open(photo_dir / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]


def photo_crops(photos: list[Image.Image], count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """`count` different size x size views: random squares of 1-2.5x the size, resized down."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(size * rng.uniform(1, 2.5))
        left, top = rng.integers(0, photo.width - side), rng.integers(0, photo.height - side)
        out.append(photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))
    return out
