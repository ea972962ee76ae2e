"""The suite's measurements: ours against timm through the bench's steps and `measure`'s rounds,
the largest micro-batch that fits, and the GPU-hours that follow from the training rates."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from convnext_train import bench, measure
from convnext_train.distributed import Processes
from convnext_train.engine import LossWindow, optimizer_step
from convnext_train.gpu_suite.plan import EPOCHS, IMAGENET_TRAIN_IMAGES, Plan, release_device_memory
from convnext_train.models import build_model
from convnext_train.models.complexity import count_gmacs
from convnext_train.parts import build_parts


def throughput_item(plan: Plan, mode: str, variant: str, precision: str, compiled: bool, device) -> dict[str, Any]:
    """ours against timm, interleaved rounds (`measure.measure`) of the bench's own steps."""
    batch = plan.train_batch if mode == "step" else plan.eval_batch
    # tf32: the paper's inference setting, fp32 with TF32 matmuls (convolutions use TF32 by default).
    autocast = "fp32" if precision == "tf32" else precision
    cfg, _ = bench.compose_config(mode, plan.overrides(variant, batch, autocast, compiled, device))
    options = dataclasses.replace(plan.options, vs="timm")
    run = bench.bench_step if mode == "step" else bench.bench_eval
    if precision == "tf32":
        torch.set_float32_matmul_precision("high")
    try:
        ours, rival = run(cfg, variant, options)
        peak = measure.dense_peak_tflops(measure.device_name(device), measure.math_precision(cfg.trainer.precision))
    finally:
        torch.set_float32_matmul_precision("highest")
    with torch.device("meta"):
        gmacs = count_gmacs(build_model(cfg.model), plan.img_size)
    result: dict[str, Any] = {"status": "measured", "mode": mode, "model": variant, "precision": precision}
    result |= {"compiled": compiled, "batch": batch, "gmacs_per_image": gmacs, "peak_tflops": peak}
    for m in (ours, rival):
        mfu = measure.model_flops_utilisation(m.images_per_sec, gmacs, training=mode == "step", peak_tflops=peak)
        result[m.name] = {
            "images_per_sec": m.images_per_sec,
            "step_ms": m.step_seconds * 1e3,
            "mfu": mfu,
            "peak_mem_gb": None if m.peak_mem_bytes is None else m.peak_mem_bytes / 2**30,
        }
    result["ours_over_timm"] = ours.images_per_sec / rival.images_per_sec
    return result


def fits(plan: Plan, variant: str, batch: int, device: torch.device) -> tuple[bool, float | None]:
    """Whether one training step (the plan's precision, channels-last) at micro-batch `batch` fits,
    and its peak GB."""
    cfg, _ = bench.compose_config("step", plan.overrides(variant, batch, plan.precisions[0], False, device))
    measure.reset_peak_memory(device)
    try:
        peak = one_training_step(cfg, device)
        fitted = True
    except torch.cuda.OutOfMemoryError:
        fitted, peak = False, None
    # After the except block, which kept the failed step's frames (and their tensors) alive.
    release_device_memory()
    return fitted, None if peak is None else peak / 2**30


def one_training_step(cfg, device: torch.device) -> int | None:
    """One optimizer step on a random batch made on the device; the peak memory. Its own function
    so that everything it allocated is garbage once it returns or raises."""
    parts = build_parts(cfg, build_model(cfg.model), Processes(), device, steps_per_epoch=1)
    n, size = cfg.trainer.micro_batch_size, cfg.data.img_size
    images = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=parts.memory_format)
    targets = torch.randint(0, cfg.data.num_classes, (n,), device=device)
    optimizer_step(parts, iter([(images, targets, torch.zeros(n, dtype=torch.bool))]), LossWindow(device, 0), 0)
    measure.synchronize(device)
    return measure.peak_memory_bytes(device)


def largest_batch_item(plan: Plan, variant: str, device: torch.device) -> dict[str, Any]:
    """Doubling from the training batch until a step runs out of memory, then halving the gap down
    to a multiple of 16 (a step of the search is one training step)."""
    low, high, probes = 0, None, []
    batch = plan.train_batch
    while batch <= plan.search_cap:
        ok, peak = fits(plan, variant, batch, device)
        probes.append({"batch": batch, "fits": ok, "peak_mem_gb": peak})
        if not ok:
            high = batch
            break
        low, batch = batch, batch * 2
    while high is not None and high - low > 16:
        middle = (low + high) // 32 * 16
        ok, peak = fits(plan, variant, middle, device)
        probes.append({"batch": middle, "fits": ok, "peak_mem_gb": peak})
        low, high = (middle, high) if ok else (low, middle)
    return {
        "status": "measured",
        "model": variant,
        "largest_micro_batch": low,
        "capped": high is None,  # every probe up to the cap fitted
        "probes": probes,
    }


def gpu_hours_item(records: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """One GPU's hours for 300 epochs from the fastest measured training step of ours per variant
    (the step alone: data loading and evaluation excluded; on N GPUs divide by N at best)."""
    rows = []
    for variant in plan.train_variants:
        rates = [
            (r["ours"]["images_per_sec"], r["compiled"])
            for r in records
            if r.get("mode") == "step" and r.get("model") == variant and r["status"] == "measured"
        ]
        if not rates:
            rows.append({"model": variant, "images_per_sec": None, "gpu_hours": None, "compiled": None})
            continue
        rate, compiled = max(rates)
        hours = EPOCHS * IMAGENET_TRAIN_IMAGES / rate / 3600
        rows.append({"model": variant, "images_per_sec": rate, "compiled": compiled, "gpu_hours": hours})
    return {"status": "measured", "epochs": EPOCHS, "train_images": IMAGENET_TRAIN_IMAGES, "rows": rows}
