"""predict.py's work: run a trained model on a folder (or glob) of new images and write a CSV of
each image's top-k classes and probabilities, and with `embeddings=true` a `.npy` beside it of each
image's pooled features (`forward_features`: one row per CSV row, same order), for retrieval and
clustering.

Two backends (`BACKENDS`): `pytorch` runs a checkpoint of any format we read, its model, class names
and training img_size / crop_pct taken from it (convnext_train/inference.py), on the GPU when there
is one; `onnxruntime` runs an ONNX file that `python -m convnext_train.export format=onnx` wrote, its
preprocessing and class names taken from the file's metadata (convnext_train/deploy.py). Either way
images get the official evaluation preprocessing (`EvalPreprocessing`), in batches. An image that
cannot be decoded gets a row with its error (and a NaN embedding) instead of stopping the run, and
is counted at the end. The CSV and the `.npy` appear whole when every image is done.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from convnext_train.atomic import write_atomically
from convnext_train.config import DEVICES, PRECISIONS
from convnext_train.data.imagefolder import UnreadableImageError, load_image
from convnext_train.data.transforms import EvalPreprocessing
from convnext_train.deploy import OnnxModel, is_onnx
from convnext_train.errors import UserError
from convnext_train.inference import Inference, load_command_model
from convnext_train.runtime import prepare_device, resolve_device


@dataclass
class Predictor:
    """A model ready to run on preprocessed batches, with what predict.py needs to know of it."""

    variant: str
    class_names: list[str]
    preprocessing: EvalPreprocessing
    batch_size: int
    pin_memory: bool
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (logits, embeddings), float32, CPU


def pytorch_backend(cfg: DictConfig) -> Predictor:
    """The checkpoint's model in PyTorch, on the GPU when there is one (device=, precision=, channels_last=)."""
    if is_onnx(cfg.checkpoint):
        raise UserError(f"checkpoint={cfg.checkpoint} is an ONNX file: add backend=onnxruntime")
    loaded = load_command_model(cfg)
    how = Inference(prepare_device(resolve_device(cfg.device)), cfg.precision, cfg.channels_last, cfg.batch_size)
    model = how.prepare(loaded.model)

    def forward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with how.autocast():
            embeddings = model.forward_features(
                batch.to(how.device, non_blocking=True, memory_format=how.memory_format)
            )
            logits = model.head(embeddings)
        return logits.float().cpu(), embeddings.float().cpu()

    preprocessing = loaded.preprocessing(cfg.img_size, cfg.crop_pct)
    return Predictor(
        loaded.variant, loaded.class_names, preprocessing, how.batch_size, how.device.type == "cuda", forward
    )


def onnxruntime_backend(cfg: DictConfig) -> Predictor:
    """An ONNX file of ours in ONNX Runtime: its preprocessing and class names from its metadata."""
    ignored = [
        f"{key}={cfg[key]}" for key, default in (("precision", "fp32"), ("use_ema", False)) if cfg[key] != default
    ]
    if HydraConfig.get().runtime.choices.get("model") or ignored:
        raise UserError(
            f"backend=onnxruntime runs the ONNX file as exported: {', '.join(ignored) or 'model='} does not apply "
            "(export again from the checkpoint with the setting you want)"
        )
    onnx_model = OnnxModel.load(cfg.checkpoint, device=cfg.device)
    preprocessing = onnx_model.preprocessing
    if cfg.img_size is not None and cfg.img_size != preprocessing.img_size:
        raise UserError(
            f"img_size={cfg.img_size}: {cfg.checkpoint} takes {preprocessing.img_size}px images; leave img_size= out "
            "or export the model again at that size"
        )
    if cfg.crop_pct is not None:
        preprocessing = dataclasses.replace(preprocessing, crop_pct=cfg.crop_pct)
    return Predictor(onnx_model.variant, onnx_model.class_names, preprocessing, cfg.batch_size, False, onnx_model)


BACKENDS: dict[str, Callable[[DictConfig], Predictor]] = {
    "pytorch": pytorch_backend,
    "onnxruntime": onnxruntime_backend,
}


def run(cfg: DictConfig) -> Path:
    _check(cfg)
    paths = find_images(str(cfg.images))
    predictor = BACKENDS[cfg.backend](cfg)
    names, size = predictor.class_names, predictor.preprocessing.img_size
    topk = min(cfg.topk, len(names))
    images = DataLoader(
        _Images(paths, predictor.preprocessing.transform(), size),
        batch_size=predictor.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=predictor.pin_memory,
    )
    out = Path(cfg.out).expanduser().resolve()
    unreadable, vectors = 0, []
    header = ["path"] + [f"{kind}_{rank}" for rank in range(1, topk + 1) for kind in ("class", "prob")] + ["error"]

    def write_rows(binary: BinaryIO) -> None:
        nonlocal unreadable
        file = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        writer = csv.writer(file)
        writer.writerow(header)
        with torch.no_grad(), tqdm(total=len(paths), unit="img") as progress:
            for batch, indices, errors in images:
                logits, embeddings = predictor.forward(batch)
                probs, classes = logits.softmax(dim=1).topk(topk, dim=1)
                if cfg.embeddings:
                    failed = torch.tensor([bool(error) for error in errors])
                    vectors.append(embeddings.masked_fill(failed[:, None], float("nan")))
                for index, error, p, c in zip(indices.tolist(), errors, probs.tolist(), classes.tolist(), strict=True):
                    if error:
                        unreadable += 1
                        writer.writerow([paths[index]] + [""] * (2 * topk) + [error])
                    else:
                        ranked = [value for k in range(topk) for value in (names[c[k]], f"{p[k]:.6f}")]
                        writer.writerow([paths[index], *ranked, ""])
                progress.update(len(indices))
        file.flush()
        file.detach()  # the binary file stays open for write_atomically to sync and rename

    # The CSV appears whole when every image is done (atomic.py); the embeddings' file just before it.
    write_atomically(out, write_rows, before_rename=lambda: _write_embeddings(cfg, out, vectors))
    print(f"{len(paths)} images ({predictor.variant}, {size}px, {cfg.backend}): predictions in {out}")
    if cfg.embeddings:
        print(f"embeddings: {out.with_suffix('.npy')}, {len(paths)} vectors (float32), rows in the CSV's order")
    if unreadable:
        print(
            f"{unreadable} of them could not be read: their rows have no classes and say why in the error column"
            + (" (and NaN embeddings)" if cfg.embeddings else "")
        )
    return out


def _write_embeddings(cfg: DictConfig, out: Path, vectors: list[torch.Tensor]) -> None:
    if cfg.embeddings:
        array = torch.cat(vectors).numpy()
        write_atomically(out.with_suffix(".npy"), lambda file: np.save(file, array))


def find_images(spec: str) -> list[str]:
    """A folder (searched recursively for image files), one file, or a glob (`**` recursive)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not found:
        raise UserError(
            f"no images found at images={spec}: pass a folder (searched recursively for "
            f"{', '.join(IMG_EXTENSIONS)} files), one image, or a quoted glob such as 'photos/**/*.jpg'"
        )
    return sorted(str(p) for p in found)


class _Images(Dataset):
    """(preprocessed image, index, error): an unreadable file is a blank image and its error, so the
    batch goes on and the row says why."""

    def __init__(self, paths: list[str], transform, img_size: int):
        self.paths, self.transform, self.img_size = paths, transform, img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.transform(load_image(self.paths[index])), index, ""
        except UnreadableImageError as error:
            return torch.zeros(3, self.img_size, self.img_size), index, str(error.__cause__ or error)


def _check(cfg: DictConfig) -> None:
    problems = []
    for key in ("checkpoint", "images"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            problems.append(f"set {key}=<{'file' if key == 'checkpoint' else 'folder or glob'}>")
    for key in ("topk", "batch_size"):
        if not (isinstance(cfg[key], int) and not isinstance(cfg[key], bool) and cfg[key] > 0):
            problems.append(f"{key}={cfg[key]}: must be a positive integer")
    if not (isinstance(cfg.num_workers, int) and cfg.num_workers >= 0):
        problems.append(f"num_workers={cfg.num_workers}: must be an integer >= 0")
    if cfg.backend not in BACKENDS:
        problems.append(f"backend={cfg.backend}: must be one of {', '.join(BACKENDS)}")
    if not isinstance(cfg.embeddings, bool):
        problems.append(f"embeddings={cfg.embeddings}: must be true or false")
    if cfg.device not in DEVICES:
        problems.append(f"device={cfg.device}: must be one of {', '.join(DEVICES)}")
    if cfg.precision not in PRECISIONS:
        problems.append(f"precision={cfg.precision}: must be one of {', '.join(PRECISIONS)}")
    if cfg.img_size is not None and not (isinstance(cfg.img_size, int) and cfg.img_size > 0):
        problems.append(f"img_size={cfg.img_size}: must be null or a positive integer")
    if cfg.crop_pct is not None and not (isinstance(cfg.crop_pct, (int, float)) and 0 < cfg.crop_pct <= 1):
        problems.append(f"crop_pct={cfg.crop_pct}: must be null or in (0, 1]")
    if problems:
        raise UserError("invalid predict config: " + "; ".join(problems))
