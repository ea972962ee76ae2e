"""eval.py's work: score checkpoints on a validation set with the official protocol.

Prints one paper-style table (params, GMACs, images/s, top-1, top-5) and writes `eval.json` to the
run directory. Without `model=` each checkpoint's own architecture and class count are used
(convnext_train/inference.py), and the first one's training img_size and crop_pct unless given. For up to `eval.per_class_max` classes it adds each class's top-1 to
eval.json and draws the confusion matrix (scikit-learn's) with the class names, beside eval.json.
With `robustness.root=` (or `data=` one of the robustness sets) the scores and the table are
convnext_train/robustness.py's instead, on one process or under torchrun.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from convnext_train.config import validate_eval_config
from convnext_train.data.sources import LoaderArgs, build_val_loader
from convnext_train.distributed import device_for, init_processes, launch_environment, shutdown
from convnext_train.errors import UserError
from convnext_train.inference import CheckpointModel, load_checkpoint_model
from convnext_train.models import build_model
from convnext_train.models.complexity import count_gmacs, count_params
from convnext_train.robustness import Scorer, is_robustness_run, score_sets
from convnext_train.robustness import format_table as robustness_table
from convnext_train.runtime import autocast, prepare_device, resolve_device
from convnext_train.tasks.classification import evaluate

IMAGENET_CLASSES = 1000  # the class count when neither data.num_classes nor a checkpoint gives one


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    validate_eval_config(cfg)
    hydra_cfg = HydraConfig.get()
    # conf/eval.yaml's model default is null, so a chosen group means `model=` was given: a default
    # architecture would silently win over the checkpoint's own.
    given = hydra_cfg.runtime.choices.get("model")
    checkpoints = list(cfg.checkpoint) if isinstance(cfg.checkpoint, ListConfig) else [cfg.checkpoint]
    e = cfg.eval
    if given is None and not all(checkpoints):
        raise UserError("eval.py needs checkpoint=<file> (its architecture is taken from it) or model=<variant>")
    if not (isinstance(e.per_class_max, int) and e.per_class_max >= 0):
        raise UserError(f"eval.per_class_max={e.per_class_max}: must be an integer >= 0 (0 turns per-class off)")
    robust = is_robustness_run(cfg)
    if launch_environment().distributed and not robust:
        raise UserError(
            "eval.py runs on several processes only for the robustness sets (robustness.root=, or data=imagenet_v2 "
            "and the like); run it as one process (python eval.py ...) for data.root="
        )
    device = resolve_device(e.device)
    processes = init_processes(device.type, e.dist_timeout_minutes) if robust else None
    if processes is not None and processes.distributed:
        device = device_for(processes, device.type)
    device = prepare_device(device)
    try:
        return _run(cfg, checkpoints, given, device, processes, robust)
    finally:
        shutdown()


def _run(cfg, checkpoints, given, device, processes, robust) -> list[dict[str, Any]]:
    hydra_cfg = HydraConfig.get()
    e = cfg.eval
    on_main = processes is None or processes.is_main
    memory_format = torch.channels_last if e.channels_last else torch.contiguous_format
    out_dir = Path(hydra_cfg.runtime.output_dir)
    loader = None
    results = []
    for index, checkpoint in enumerate(checkpoints):
        loaded = _load(cfg, checkpoint, given)
        if index == 0:  # the first checkpoint's class count and training resolution are the data's
            _take_from_checkpoint(cfg, loaded, hydra_cfg.overrides.task)
        if robust and len(loaded.class_names) != IMAGENET_CLASSES:
            raise UserError(
                f"the robustness sets are scored over ImageNet-1K's {IMAGENET_CLASSES} classes, but "
                f"{checkpoint or 'the model'} has a {len(loaded.class_names)}-class head"
            )
        if loader is None and cfg.data.root and not robust:
            loader = build_val_loader(cfg.data, e.crop_pct, LoaderArgs(seed=0, batch_size=e.batch_size, device=device))
        with torch.device("meta"):
            gmacs = count_gmacs(build_model(loaded.model_cfg), cfg.data.img_size)
        model = loaded.model.to(device=device, memory_format=memory_format).eval()
        result: dict[str, Any] = {
            "model": loaded.variant,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "ema": bool(e.use_ema),
            "img_size": cfg.data.img_size,
            "params": count_params(model),
            "gmacs": round(gmacs, 3),
        }
        if robust:
            scorer = Scorer(
                model,
                device,
                partial(autocast, e.precision, device.type),
                memory_format,
                e.batch_size,
                cfg.data.num_workers,
                processes.rank,
                processes.world_size,
            )
            result["robustness"] = score_sets(cfg, scorer, on_main)
        elif loader is not None:
            recorder = _Recorder(model)
            started = time.perf_counter()
            scores = evaluate(
                model,
                recorder.batches(loader),
                device=device,
                autocast=partial(autocast, e.precision, device.type),
                memory_format=memory_format,
            )
            result.update(
                top1=scores["top1"],
                top5=scores["top5"],
                images=scores["images"],
                images_per_sec=scores["images"] / (time.perf_counter() - started),
            )
            recorder.close()
            name = "confusion_matrix.png" if len(checkpoints) == 1 else f"confusion_matrix_{index}.png"
            result.update(_per_class(recorder, loaded.class_names, e.per_class_max, out_dir / name))
        results.append(result)

    if on_main:
        print(robustness_table(results) if robust else format_table(results))
        out = out_dir / "eval.json"
        out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    return results


def _take_from_checkpoint(cfg: DictConfig, loaded: CheckpointModel, overrides: list[str]) -> None:
    """data.num_classes, data.img_size and eval.crop_pct from the checkpoint unless given. The last two
    have defaults (the data group's 224, the paper's 0.875) that cannot say whether a user chose them,
    so the command line is asked; a checkpoint that does not say keeps them."""
    given = {override.lstrip("+~").partition("=")[0] for override in overrides}
    if cfg.data.num_classes is None:
        cfg.data.num_classes = len(loaded.class_names)
    if loaded.img_size and "data.img_size" not in given:
        cfg.data.img_size = loaded.img_size
    if loaded.crop_pct and "eval.crop_pct" not in given:
        cfg.eval.crop_pct = loaded.crop_pct


def _load(cfg: DictConfig, checkpoint: str | None, given: str | None) -> CheckpointModel:
    e = cfg.eval
    if checkpoint:
        return load_checkpoint_model(
            checkpoint,
            cfg.model if given else None,
            given_variant=given,
            num_classes=cfg.data.num_classes,
            use_ema=e.use_ema,
            trusted=e.trust_checkpoint,
        )
    # No checkpoint: the size columns of a freshly initialised model.
    model_cfg = OmegaConf.merge(cfg.model, {"num_classes": cfg.data.num_classes or IMAGENET_CLASSES})
    count = model_cfg.num_classes
    return CheckpointModel(build_model(model_cfg), model_cfg, given, [f"class {i}" for i in range(count)], None, None)


class _Recorder:
    """Each image's target and top-1 prediction, taken beside tasks.classification.evaluate (the one scoring loop
    training shares) from the same forwards: the targets as the batches pass, the predictions by a
    forward hook, so per-class numbers cost no second pass over the data."""

    def __init__(self, model: torch.nn.Module):
        self.targets: list[torch.Tensor] = []
        self.predictions: list[torch.Tensor] = []
        self._hook = model.register_forward_hook(lambda _m, _i, logits: self.predictions.append(logits.argmax(1)))

    def batches(self, loader: Iterable) -> Iterator:
        for batch in loader:
            self.targets.append(batch[1])
            yield batch

    def close(self) -> None:
        self._hook.remove()

    def pairs(self) -> tuple[list[int], list[int]]:
        return torch.cat(self.targets).tolist(), torch.cat(self.predictions).tolist()


def _per_class(recorder: _Recorder, names: list[str], limit: int, png: Path) -> dict[str, Any]:
    """Each class's top-1 (percent; null for a class without images) and the confusion-matrix PNG."""
    if len(names) > limit:
        print(f"per-class accuracy and the confusion matrix skipped: {len(names)} classes > eval.per_class_max={limit}")
        return {}
    from sklearn.metrics import confusion_matrix

    targets, predictions = recorder.pairs()
    matrix = confusion_matrix(targets, predictions, labels=list(range(len(names))))
    per_class = {
        name: {"top1": 100.0 * int(row[i]) / int(row.sum()) if row.sum() else None, "images": int(row.sum())}
        for i, (name, row) in enumerate(zip(names, matrix, strict=True))
    }
    _draw(matrix, names, png)
    print(f"confusion matrix: {png}")
    return {"per_class": per_class, "confusion_matrix": str(png)}


def _draw(matrix, names: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    side = min(4 + 0.3 * len(names), 60)  # room for a readable label per class
    figure, axes = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(matrix, display_labels=names).plot(
        ax=axes, xticks_rotation="vertical", include_values=len(names) <= 30, colorbar=False
    )
    axes.set_title("confusion matrix")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | checkpoint | img | params (M) | GMACs | images/s | top-1 (%) | top-5 (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        scored = "top1" in r
        name = (r["checkpoint"] or "random init") + (" (EMA)" if r["ema"] else "")
        lines.append(
            f"| {r['model']} | {name} | {r['img_size']} | {r['params'] / 1e6:.2f} | {r['gmacs']:.2f} | "
            + (f"{r['images_per_sec']:.0f} | {r['top1']:.2f} | {r['top5']:.2f} |" if scored else "– | – | – |")
        )
    return "\n".join(lines)
