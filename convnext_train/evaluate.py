"""eval.py's work: score checkpoints on a validation set with the official protocol.

Prints one paper-style table (params, GMACs, images/s, top-1, top-5) and writes `eval.json` to the
run directory.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

from convnext_train.checkpoints import load_weights
from convnext_train.config import validate_eval_config
from convnext_train.data.datasets import build_val_loader
from convnext_train.engine import evaluate
from convnext_train.models import build_model
from convnext_train.models.complexity import count_gmacs, count_params
from convnext_train.runtime import autocast, prepare_device, resolve_device


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    validate_eval_config(cfg)
    hydra_cfg = HydraConfig.get()
    variant = hydra_cfg.runtime.choices.get("model", "model")
    checkpoints = list(cfg.checkpoint) if isinstance(cfg.checkpoint, ListConfig) else [cfg.checkpoint]
    e = cfg.eval
    device = prepare_device(resolve_device(e.device))
    memory_format = torch.channels_last if e.channels_last else torch.contiguous_format
    loader = None
    if cfg.data.root:
        loader = build_val_loader(cfg.data, e.crop_pct, batch_size=e.batch_size, device=device)
    with torch.device("meta"):
        gmacs = count_gmacs(build_model(cfg.model), cfg.data.img_size)

    results = []
    for checkpoint in checkpoints:
        model = build_model(cfg.model)
        if checkpoint:
            load_weights(model, checkpoint, use_ema=e.use_ema, trusted=e.trust_checkpoint)
        model = model.to(device=device, memory_format=memory_format).eval()
        result: dict[str, Any] = {
            "model": variant,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "ema": bool(e.use_ema),
            "img_size": cfg.data.img_size,
            "params": count_params(model),
            "gmacs": round(gmacs, 3),
        }
        if loader is not None:
            started = time.perf_counter()
            scores = evaluate(
                model,
                loader,
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
        results.append(result)

    print(format_table(results))
    out = Path(hydra_cfg.runtime.output_dir) / "eval.json"
    out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    return results


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
