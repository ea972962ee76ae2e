"""The device's fast path checked against the CPU's fp32 reference, from the same weights and batch.

What the GPU suite (`convnext_train.gpu_suite`) runs first, before it times anything:
- `check_training_step`: one optimizer step of the recipe (Mixup/CutMix, soft-target loss, AdamW,
  EMA) through the trainer's own `build_parts` + `engine.optimizer_step`, once as configured for the
  device (bf16 autocast, channels-last, torch.compile, fused AdamW on CUDA) and once in fp32 eager
  on the CPU. Drop path is off: its draws come from each device's own generator.
- `check_inference`: eval-mode logits, likewise.
- `check_batch_augment`: the per-batch steps that run on the training device (normalisation,
  random erasing, Mixup/CutMix) on the device and on the CPU.

The tolerances are stated here and recorded with each result, so a report says what "passed"
meant. bf16 keeps 8 bits of mantissa (about 3 significant digits), hence the loose loss bound; a
first AdamW step moves every weight by about lr * sign(gradient) (Adam's normalisation), so a
gradient sign that bf16 flips costs 2 lr on that weight and the weights can only be bounded by
that, with the direction of the whole update compared by cosine.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from convnext_train.data.batch_augment import BatchAugment, normalize
from convnext_train.data.transforms import mixup_fn
from convnext_train.distributed import Processes
from convnext_train.engine import LossWindow, optimizer_step
from convnext_train.models import build_model
from convnext_train.parts import build_parts
from convnext_train.runtime import autocast

CPU = torch.device("cpu")
TOLERANCES = {
    "loss_rtol": 1e-2,  # |loss(device) - loss(cpu)| / loss(cpu)
    "grad_cosine_min": 0.999,  # per stage: stem, stage1..4 (with their downsampling), head
    "update_cosine_min": 0.98,  # of the whole weight update (after - before)
    "weight_atol_lrs": 2.1,  # max |w(device) - w(cpu)| after the step, in units of the step's lr
    "logit_cosine_min": 0.999,  # per image
    "logit_rel_max": 0.05,  # max |logit difference| / max |logit|
    "normalize_atol": 1e-6,
    "mixup_atol": 1e-5,
}


def reference_config(cfg: DictConfig) -> DictConfig:
    """`cfg` as the CPU reference runs it: fp32, eager, contiguous."""
    reference = copy.deepcopy(cfg)
    with open_dict(reference):
        reference.trainer.update(precision="fp32", compile=False, channels_last=False, device="cpu")
    return reference


def random_batch(cfg: DictConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A normalised-looking float batch with labels, as a loader hands it over (on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    size, n = cfg.data.img_size, cfg.trainer.micro_batch_size
    images = torch.randn(n, 3, size, size, generator=generator)
    targets = torch.randint(0, cfg.data.num_classes, (n,), generator=generator)
    return images, targets, torch.zeros(n, dtype=torch.bool)


def stage_of(name: str) -> str:
    """The report's grouping of a parameter: stem, stage1..4 (each with the downsampling before
    it), head (the final norm and the classifier)."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        return "stem" if parts[1] == "0" else f"stage{int(parts[1]) + 1}"
    if parts[0] == "stages":
        return f"stage{int(parts[1]) + 1}"
    return "head"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denominator = a.norm() * b.norm()
    return 1.0 if denominator == 0 else float(a @ b / denominator)


def one_step(cfg: DictConfig, model: nn.Module, device: torch.device, batch, *, seed: int) -> dict:
    """One optimizer step of `cfg`'s recipe on `model`: loss, gradients and weights (on the CPU)."""
    parts = build_parts(cfg, model, Processes(), device, steps_per_epoch=1)
    before = {n: p.detach().float().cpu().clone() for n, p in parts.model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def keep_gradients(_optimizer, _args, _kwargs) -> None:  # after backward, before AdamW uses them
        grads.update({n: p.grad.float().cpu() for n, p in parts.model.named_parameters() if p.grad is not None})

    parts.optimizer.register_step_pre_hook(keep_gradients)
    window = LossWindow(device, 0)
    random.seed(seed)  # timm's Mixup draws its lambda and boxes from numpy: the same on both sides
    np.random.seed(seed)
    lr = optimizer_step(parts, iter([batch]), window, 0)
    after = {n: p.detach().float().cpu() for n, p in parts.model.named_parameters()}
    return {"loss": float(window.total), "lr": lr, "before": before, "grads": grads, "after": after}


def check_training_step(cfg: DictConfig, device: torch.device, *, seed: int = 0) -> dict:
    """The device's step against the CPU's fp32 step, from the same weights, batch and Mixup draws."""
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    reference_model = copy.deepcopy(model)
    batch = random_batch(cfg, seed)
    ours = one_step(cfg, model, device, batch, seed=seed)
    ref = one_step(reference_config(cfg), reference_model, CPU, batch, seed=seed)

    stages = sorted({stage_of(n) for n in ref["grads"]}, key=lambda s: (s != "stem", s == "head", s))
    grad_cosine = {
        stage: cosine(
            torch.cat([ours["grads"][n].flatten() for n in ref["grads"] if stage_of(n) == stage]),
            torch.cat([ref["grads"][n].flatten() for n in ref["grads"] if stage_of(n) == stage]),
        )
        for stage in stages
    }
    update_cosine = cosine(
        torch.cat([(ours["after"][n] - ours["before"][n]).flatten() for n in ref["after"]]),
        torch.cat([(ref["after"][n] - ref["before"][n]).flatten() for n in ref["after"]]),
    )
    weight_diff = max(float((ours["after"][n] - ref["after"][n]).abs().max()) for n in ref["after"])
    loss_rtol = abs(ours["loss"] - ref["loss"]) / abs(ref["loss"])
    t = TOLERANCES
    checks = {
        "loss": loss_rtol <= t["loss_rtol"],
        "gradients": min(grad_cosine.values()) > t["grad_cosine_min"],
        "update": update_cosine >= t["update_cosine_min"],
        "weights": weight_diff <= t["weight_atol_lrs"] * ref["lr"],
        "same_start": all(torch.equal(ours["before"][n], ref["before"][n]) for n in ref["before"]),
    }
    return {
        "status": "passed" if all(checks.values()) else "failed",
        "checks": checks,
        "loss": ours["loss"],
        "loss_reference": ref["loss"],
        "loss_rel_diff": loss_rtol,
        "grad_cosine": grad_cosine,
        "update_cosine": update_cosine,
        "weight_max_abs_diff": weight_diff,
        "lr": ref["lr"],
        "tolerances": {k: t[k] for k in ("loss_rtol", "grad_cosine_min", "update_cosine_min", "weight_atol_lrs")},
    }


@torch.no_grad()
def check_inference(cfg: DictConfig, device: torch.device, *, seed: int = 0) -> dict:
    """Eval-mode logits as configured for the device (autocast, channels-last, compiled) against
    fp32 eager on the CPU, same weights and images."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    images = random_batch(cfg, seed)[0]
    reference = model(images).double()
    t = cfg.trainer
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    ours_model = copy.deepcopy(model).to(device=device, memory_format=memory_format)
    forward = torch.compile(ours_model) if t.compile else ours_model
    with autocast(t.precision, device.type):
        ours = forward(images.to(device, memory_format=memory_format)).double().cpu()
    per_image = [cosine(a, b) for a, b in zip(ours, reference, strict=True)]
    relative = float((ours - reference).abs().max() / reference.abs().max())
    tol = TOLERANCES
    checks = {"cosine": min(per_image) >= tol["logit_cosine_min"], "max_diff": relative <= tol["logit_rel_max"]}
    return {
        "status": "passed" if all(checks.values()) else "failed",
        "checks": checks,
        "logit_cosine_min": min(per_image),
        "logit_rel_max_diff": relative,
        "top1_agreement": float((ours.argmax(1) == reference.argmax(1)).double().mean()),
        "tolerances": {k: tol[k] for k in ("logit_cosine_min", "logit_rel_max")},
    }


def check_batch_augment(cfg: DictConfig, device: torch.device, *, seed: int = 0, batch_size: int = 16) -> dict:
    """Normalisation, random erasing and Mixup/CutMix on the device against the CPU.

    Erasing draws where to erase from a seeded `random.Random` (the same rectangles everywhere) and
    the noise it fills them with from a torch generator of the batch's device (CUDA's Philox differs
    from the CPU's stream): the erased pixels must coincide, their values need not."""
    generator = torch.Generator().manual_seed(seed)
    size = cfg.data.img_size
    batch = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    tol = TOLERANCES
    normalized = normalize(batch)
    normalize_diff = float((normalize(batch.to(device)).cpu() - normalized).abs().max())

    erasing_cfg = copy.deepcopy(cfg.aug)
    with open_dict(erasing_cfg):
        erasing_cfg.reprob = max(float(erasing_cfg.get("reprob", 0)), 0.5)  # the recipe's 0.25, or more
    augment = BatchAugment(erasing_cfg)
    erased_cpu = augment(batch, seed=seed) != normalized
    erased_device = (augment(batch.to(device), seed=seed).cpu() != normalized).cpu()
    erased_images = int(erased_cpu.flatten(1).any(1).sum())

    mixup = mixup_fn(cfg.aug, cfg.data.num_classes)
    mixup_diff = 0.0
    if mixup is not None:
        images = normalized
        targets = torch.randint(0, cfg.data.num_classes, (batch_size,), generator=generator)
        for draw in range(8):  # the recipe switches between Mixup and CutMix per batch
            outputs = []
            for where in (CPU, device):
                np.random.seed(seed + draw)
                random.seed(seed + draw)
                x, y = mixup(images.clone().to(where), targets.to(where))
                outputs.append((x.cpu(), y.cpu()))
            (x_cpu, y_cpu), (x_dev, y_dev) = outputs
            mixup_diff = max(mixup_diff, float((x_cpu - x_dev).abs().max()), float((y_cpu - y_dev).abs().max()))
    checks = {
        "normalize": normalize_diff <= tol["normalize_atol"],
        "erasing": bool(torch.equal(erased_cpu, erased_device)) and erased_images > 0,
        "mixup": mixup_diff <= tol["mixup_atol"],
    }
    return {
        "status": "passed" if all(checks.values()) else "failed",
        "checks": checks,
        "normalize_max_abs_diff": normalize_diff,
        "erased_images": erased_images,
        "mixup_max_abs_diff": mixup_diff if mixup is not None else None,
        "tolerances": {k: tol[k] for k in ("normalize_atol", "mixup_atol")},
    }
