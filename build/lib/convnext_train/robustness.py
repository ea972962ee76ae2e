"""The robustness table: clean top-1, ImageNet-V2, ReaL, -A, -R, -Sketch and -C mCE in one eval.py run.

`robustness.root=/datasets` looks for each set under the root at the folder name its data config
gives (`dirname`: the name its release extracts to; `robustness.paths.<set>=` points elsewhere),
scores every set it finds and shows a dash, with the expected path, for one it does not. `data=<set>`
(with `data.root=`) scores one set alone through the same code.

Scoring is one loop for all of them: the arg-max of the logits, over the set's own classes when it
has fewer than 1000 (ImageNet-A and -R: their authors' evaluation), is right when it is in the image's
label set (one label, or ReaL's). Under torchrun each process scores an interleaved shard of every
set and the counts are summed, so the numbers are those of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from convnext_train import configs
from convnext_train.data.loaders import EpochSampler, make_loader
from convnext_train.data.robustness import LAYOUTS, class_subset, corruption_folders, robustness_dataset
from convnext_train.data.sources import source
from convnext_train.distributed import Processes, all_reduce_sum
from convnext_train.errors import UserError
from convnext_train.imagenet_c import corruption_errors
from convnext_train.inference import Inference

# The table's sets, in its column order; `imagenet` is the clean validation set (conf/data/imagenet.yaml).
SETS = ("imagenet", "imagenet_v2", "imagenet_real", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_c")
COLUMNS = {
    "imagenet": "clean top-1",
    "imagenet_v2": "V2",
    "imagenet_real": "ReaL",
    "imagenet_a": "A",
    "imagenet_r": "R",
    "imagenet_sketch": "Sketch",
}
# Where a set lives under robustness.root when its data config does not say (the clean set's).
DEFAULT_DIRNAME = "imagenet"


def is_robustness_run(cfg: DictConfig) -> bool:
    return bool(cfg.get("robustness", {}).get("root")) or source(cfg.data.kind).evaluation_only


@dataclass
class Scorer:
    """What scoring one set needs besides its data: the model (prepared by `how`), how to run it,
    and this process's share of the images."""

    model: torch.nn.Module
    how: Inference
    processes: Processes = Processes()

    @torch.no_grad()
    def top1(self, samples, subset: tuple[int, ...] | None) -> dict[str, Any]:
        """Top-1 (percent) over every image of `samples` (all processes together)."""
        how, device = self.how, self.how.device
        sampler = EpochSampler(
            len(samples),
            seed=0,
            shuffle=False,
            drop_last=False,
            rank=self.processes.rank,
            world_size=self.processes.world_size,
        )
        loader = make_loader(
            samples,
            sampler,
            batch_size=how.batch_size,
            num_workers=how.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=False,
        )
        classes = torch.tensor(subset, device=device) if subset is not None else None
        correct = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        self.model.eval()
        for images, labels, _replaced in loader:
            images = images.to(device, non_blocking=True, memory_format=how.memory_format)
            labels = labels.to(device, non_blocking=True)
            with how.autocast():
                logits = self.model(images).float()
            predicted = classes[logits[:, classes].argmax(1)] if classes is not None else logits.argmax(1)
            correct += (labels == predicted[:, None]).any(1).sum()
            count += labels.shape[0]
        correct, count = all_reduce_sum(torch.stack([correct, count])).tolist()
        if count == 0:
            raise UserError("a robustness set has no images")  # the readers refuse empty trees first
        return {"top1": 100.0 * correct / count, "images": int(count)}


def requested_sets(cfg: DictConfig) -> list[tuple[str, DictConfig | None, str]]:
    """(name, data config or None when not found, path) for each set to score."""
    if source(cfg.data.kind).evaluation_only and not cfg.get("robustness", {}).get("root"):
        if not cfg.data.root:
            raise UserError(
                f"data={cfg.data.kind} needs data.root=<the set's folder> ({LAYOUTS[cfg.data.kind]}), "
                "or robustness.root=<the folder holding every set> for the whole table"
            )
        return [(cfg.data.kind, _with_eval_settings(cfg.data.copy(), cfg), str(cfg.data.root))]
    r = cfg.robustness
    unknown = [name for name in r.sets if name not in SETS]
    if unknown:
        raise UserError(f"robustness.sets: unknown {', '.join(unknown)}; choose from {', '.join(SETS)}")
    found = []
    for name in r.sets:
        set_cfg = configs.load("data", name)
        given = (r.get("paths") or {}).get(name)
        path = Path(given) if given else Path(r.root) / set_cfg.get("dirname", DEFAULT_DIRNAME)
        set_cfg.root = str(path)
        exists = (path / set_cfg.val_split).is_dir() if name in ("imagenet", "imagenet_real") else path.is_dir()
        found.append((name, _with_eval_settings(set_cfg, cfg) if exists else None, str(path)))
    return found


def _with_eval_settings(set_cfg: DictConfig, cfg: DictConfig) -> DictConfig:
    """The run's resolution and loader settings (the checkpoint's img_size), not the set file's."""
    for key in ("img_size", "num_workers"):
        set_cfg[key] = cfg.data[key]
    set_cfg.setdefault("skip_corrupt", False)
    return set_cfg


def score_sets(cfg: DictConfig, scorer: Scorer, on_main: bool) -> dict[str, Any]:
    """Every requested set's scores, keyed by set name; a set not found is {"missing": path}."""
    results: dict[str, Any] = {}
    # ImageNet-C last: its relative mCE needs the clean top-1 of this run.
    for name, set_cfg, path in sorted(requested_sets(cfg), key=lambda found: found[0] == "imagenet_c"):
        if set_cfg is None:
            results[name] = {"missing": path, "layout": LAYOUTS["imagefolder" if name == "imagenet" else name]}
            continue
        crop_pct = set_cfg.get("crop_pct") or cfg.eval.crop_pct
        if name == "imagenet_c":
            results[name] = _score_imagenet_c(set_cfg, scorer, crop_pct, results.get("imagenet"))
        else:
            subset = class_subset(set_cfg.kind)
            dataset = robustness_dataset(set_cfg, crop_pct)
            results[name] = {**scorer.top1(dataset, subset), "path": path}
            if dataset.images.excluded:
                results[name]["excluded"] = dataset.images.excluded
        if on_main:
            print(f"{name}: {_summary(results[name])}", flush=True)
    return results


def _score_imagenet_c(set_cfg: DictConfig, scorer: Scorer, crop_pct: float, clean: dict | None) -> dict[str, Any]:
    present, missing = corruption_folders(set_cfg.root)
    errors: dict[str, list[float]] = {}
    images = 0
    for corruption, severity in present:
        scores = scorer.top1(robustness_dataset(set_cfg, crop_pct, corruption=corruption, severity=severity), None)
        errors.setdefault(corruption, []).append(1 - scores["top1"] / 100)
        images += scores["images"]
    complete = {name: values for name, values in errors.items() if len(values) == 5}
    clean_error = 1 - clean["top1"] / 100 if clean and "top1" in clean else None
    result = {**corruption_errors(complete, clean_error), "images": images, "path": str(set_cfg.root)}
    if missing:
        result["missing_folders"] = missing
    return result


def _summary(result: dict[str, Any]) -> str:
    if "mce" in result:
        return f"mCE {_cell(result['mce'])}, relative mCE {_cell(result['relative_mce'])} ({result['images']} images)"
    extra = f", {result['excluded']} without a ReaL label left out" if "excluded" in result else ""
    return f"top-1 {result['top1']:.2f} ({result['images']} images{extra})"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """The paper-style table, one row per checkpoint, and a note per set that was not scored."""
    header = ["model", "checkpoint", "img", *COLUMNS.values(), "C mCE", "C rel. mCE"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    notes: dict[str, str] = {}
    for r in results:
        sets = r["robustness"]
        cells = []
        for name in COLUMNS:
            cells.append(_cell(sets.get(name, {}).get("top1")))
        c = sets.get("imagenet_c", {})
        cells += [_cell(c.get("mce")), _cell(c.get("relative_mce"))]
        name = (r["checkpoint"] or "random init") + (" (EMA)" if r["ema"] else "")
        lines.append(f"| {r['model']} | {name} | {r['img_size']} | " + " | ".join(cells) + " |")
        for set_name, scores in sets.items():
            if "missing" in scores:
                notes[set_name] = f"- {set_name}: not found at {scores['missing']} (expected {scores['layout']})"
            elif scores.get("missing_folders"):
                shown = ", ".join(scores["missing_folders"][:5])
                more = len(scores["missing_folders"]) - 5
                notes[set_name] = (
                    f"- imagenet_c: {len(scores['missing_folders'])} of 75 corruption/severity folders missing "
                    f"({shown}{f' and {more} more' if more > 0 else ''}): mCE needs all of them"
                )
            elif set_name == "imagenet_c" and scores.get("relative_mce") is None and scores.get("mce") is not None:
                notes[set_name] = "- imagenet_c: relative mCE needs the clean top-1 in the same run (robustness.root)"
    footer = "A and R: arg-max over their 200 classes; ReaL: right if in the image's label set; mCE: AlexNet = 100, lower is better"
    return "\n".join([*lines, "", footer, *notes.values()])
