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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from convnext_train.config import validate_eval_config
from convnext_train.data.sources import LoaderArgs, build_val_loader
from convnext_train.distributed import Processes, device_for, init_processes, launch_environment, shutdown
from convnext_train.errors import UserError
from convnext_train.inference import CheckpointModel, Inference, load_checkpoint_model
from convnext_train.models import build_model
from convnext_train.models.complexity import count_gmacs, count_params
from convnext_train.robustness import Scorer, is_robustness_run, score_sets
from convnext_train.robustness import format_table as robustness_table
from convnext_train.runtime import prepare_device, resolve_device
from convnext_train.tasks.classification import evaluate  # eval.py scores classifiers: a checkpoint's head

IMAGENET_CLASSES = 1000  # the class count when neither data.num_classes nor a checkpoint gives one


@dataclass
class EvalJob:
    """One eval.py run: what to score and how."""

    cfg: DictConfig
    checkpoints: list[str | None]  # None: no checkpoint, the size columns of a fresh model
    chosen_model: str | None  # the `model=` of the command line (conf/eval.yaml has no default)
    how: Inference
    processes: Processes
    out_dir: Path


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    validate_eval_config(cfg)
    e = cfg.eval
    hydra_cfg = HydraConfig.get()
    # conf/eval.yaml's model default is null, so a chosen group means `model=` was given: a default
    # architecture would silently win over the checkpoint's own.
    chosen_model = hydra_cfg.runtime.choices.get("model")
    checkpoints = list(cfg.checkpoint) if isinstance(cfg.checkpoint, ListConfig) else [cfg.checkpoint]
    if chosen_model is None and not all(checkpoints):
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
    processes = init_processes(device.type, e.dist_timeout_minutes) if robust else Processes()
    if processes.distributed:
        device = device_for(processes, device.type)
    how = Inference(prepare_device(device), e.precision, e.channels_last, e.batch_size, cfg.data.num_workers)
    job = EvalJob(cfg, checkpoints, chosen_model, how, processes, Path(hydra_cfg.runtime.output_dir))
    try:
        results = score_robustness(job) if robust else score(job)
    finally:
        shutdown()
    if processes.is_main:
        print(robustness_table(results) if robust else format_table(results))
        out = job.out_dir / "eval.json"
        out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    return results


def score(job: EvalJob) -> list[dict[str, Any]]:
    """Top-1/top-5 and images/s of each checkpoint on data.root's validation split, per-class top-1 and
    the confusion matrix beside them; without data.root, the size columns only."""
    e, loader, results = job.cfg.eval, None, []
    for index, (_checkpoint, loaded, model, result) in enumerate(_models(job)):
        if loader is None and job.cfg.data.root:
            args = LoaderArgs(seed=0, batch_size=job.how.batch_size, device=job.how.device)
            loader = build_val_loader(job.cfg.data, e.crop_pct, args)
        if loader is not None:
            recorder = _Recorder(model)
            started = time.perf_counter()
            how = job.how
            scores = evaluate(
                model,
                recorder.batches(loader),
                device=how.device,
                autocast=how.autocast,
                memory_format=how.memory_format,
            )
            result.update(
                top1=scores["top1"],
                top5=scores["top5"],
                images=scores["images"],
                images_per_sec=scores["images"] / (time.perf_counter() - started),
            )
            recorder.close()
            name = "confusion_matrix.png" if len(job.checkpoints) == 1 else f"confusion_matrix_{index}.png"
            result.update(_per_class(recorder, loaded.class_names, e.per_class_max, job.out_dir / name))
        results.append(result)
    return results


def score_robustness(job: EvalJob) -> list[dict[str, Any]]:
    """The robustness table's sets (robustness.py) for each checkpoint, on every process's shard."""
    results = []
    for checkpoint, loaded, model, result in _models(job):
        if len(loaded.class_names) != IMAGENET_CLASSES:
            raise UserError(
                f"the robustness sets are scored over ImageNet-1K's {IMAGENET_CLASSES} classes, but "
                f"{checkpoint or 'the model'} has a {len(loaded.class_names)}-class head"
            )
        scorer = Scorer(model, job.how, job.processes)
        result["robustness"] = score_sets(job.cfg, scorer, job.processes.is_main)
        results.append(result)
    return results


def _models(job: EvalJob) -> Iterator[tuple[str | None, CheckpointModel, torch.nn.Module, dict[str, Any]]]:
    """Each checkpoint's model, loaded and on the device, with its result's size columns. The first
    one's class count and training resolution become the data's."""
    cfg = job.cfg
    for index, checkpoint in enumerate(job.checkpoints):
        loaded = _load(cfg, checkpoint, job.chosen_model)
        if index == 0:
            _take_from_checkpoint(cfg, loaded, HydraConfig.get().overrides.task)
        with torch.device("meta"):
            gmacs = count_gmacs(build_model(loaded.model_cfg), cfg.data.img_size)
        model = job.how.prepare(loaded.model)
        result: dict[str, Any] = {
            "model": loaded.variant,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "ema": bool(cfg.eval.use_ema),
            "img_size": cfg.data.img_size,
            "params": count_params(model),
            "gmacs": round(gmacs, 3),
        }
        yield checkpoint, loaded, model, result


def _take_from_checkpoint(cfg: DictConfig, loaded: CheckpointModel, overrides: list[str]) -> None:
    """data.num_classes, data.img_size and eval.crop_pct from the checkpoint unless given. The last two
    have defaults (the data group's 224, the paper's 0.875) that cannot say whether a user chose them,
    so the command line is asked; a checkpoint that does not say keeps them."""
    overridden = {override.lstrip("+~").partition("=")[0] for override in overrides}
    if cfg.data.num_classes is None:
        cfg.data.num_classes = len(loaded.class_names)
    if loaded.img_size and "data.img_size" not in overridden:
        cfg.data.img_size = loaded.img_size
    if loaded.crop_pct and "eval.crop_pct" not in overridden:
        cfg.eval.crop_pct = loaded.crop_pct


def _load(cfg: DictConfig, checkpoint: str | None, chosen_model: str | None) -> CheckpointModel:
    e = cfg.eval
    if checkpoint:
        return load_checkpoint_model(
            checkpoint,
            cfg.model if chosen_model else None,
            chosen_variant=chosen_model,
            num_classes=cfg.data.num_classes,
            use_ema=e.use_ema,
            trusted=e.trust_checkpoint,
        )
    # No checkpoint: the size columns of a freshly initialised model.
    model_cfg = OmegaConf.merge(cfg.model, {"num_classes": cfg.data.num_classes or IMAGENET_CLASSES})
    count = model_cfg.num_classes
    return CheckpointModel(
        build_model(model_cfg), model_cfg, chosen_model, [f"class {i}" for i in range(count)], None, None
    )


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
