"""predict.py's work: run a trained model on a folder (or glob) of new images and write a CSV of
each image's top-k classes and probabilities.

The model, its class names and its training img_size / crop_pct come from the checkpoint
(convnext_train/inference.py); images get the official evaluation preprocessing
(convnext_train/data/transforms.py's eval_transform), in batches, on the GPU when there is one. An image that
cannot be decoded gets a row with its error instead of stopping the run, and is counted at the end.
"""

from __future__ import annotations

import csv
import glob
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from convnext_train.config import DEVICES, PRECISIONS
from convnext_train.data.imagefolder import UnreadableImageError, load_image
from convnext_train.data.transforms import eval_transform
from convnext_train.errors import UserError
from convnext_train.inference import Inference, load_checkpoint_model
from convnext_train.runtime import prepare_device, resolve_device

DEFAULT_IMG_SIZE, DEFAULT_CROP_PCT = 224, 0.875  # the paper's, for checkpoints that do not say


def run(cfg: DictConfig) -> Path:
    _check(cfg)
    paths = find_images(str(cfg.images))
    chosen_model = HydraConfig.get().runtime.choices.get("model")  # null default: see conf/predict.yaml
    loaded = load_checkpoint_model(
        cfg.checkpoint,
        cfg.model if chosen_model else None,
        chosen_variant=chosen_model,
        use_ema=cfg.use_ema,
        trusted=cfg.trust_checkpoint,
    )
    img_size = cfg.img_size or loaded.img_size or DEFAULT_IMG_SIZE
    crop_pct = cfg.crop_pct or loaded.crop_pct or DEFAULT_CROP_PCT
    how = Inference(prepare_device(resolve_device(cfg.device)), cfg.precision, cfg.channels_last, cfg.batch_size)
    model = how.prepare(loaded.model)
    names = loaded.class_names
    topk = min(cfg.topk, len(names))
    images = DataLoader(
        _Images(paths, eval_transform(img_size, crop_pct), img_size),
        batch_size=how.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=how.device.type == "cuda",
    )
    out = Path(cfg.out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    unreadable = 0
    header = ["path"] + [f"{kind}_{rank}" for rank in range(1, topk + 1) for kind in ("class", "prob")] + ["error"]
    with out.open("w", newline="") as file, torch.no_grad(), tqdm(total=len(paths), unit="img") as progress:
        writer = csv.writer(file)
        writer.writerow(header)
        for batch, indices, errors in images:
            with how.autocast():
                logits = model(batch.to(how.device, non_blocking=True, memory_format=how.memory_format))
            probs, classes = logits.float().softmax(dim=1).topk(topk, dim=1)
            for index, error, p, c in zip(indices.tolist(), errors, probs.tolist(), classes.tolist(), strict=True):
                if error:
                    unreadable += 1
                    writer.writerow([paths[index]] + [""] * (2 * topk) + [error])
                else:
                    ranked = [value for k in range(topk) for value in (names[c[k]], f"{p[k]:.6f}")]
                    writer.writerow([paths[index], *ranked, ""])
            progress.update(len(indices))
    print(f"{len(paths)} images ({loaded.variant}, {img_size}px): predictions in {out}")
    if unreadable:
        print(f"{unreadable} of them could not be read: their rows have no classes and say why in the error column")
    return out


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
