"""Measuring throughput the same way on any device: what the bench (`python -m convnext_train.bench`)
and the GPU suite share. Contenders are timed in alternating rounds after a warm-up, each with its
own peak memory; MFU is the model's FLOPs per second against the device's dense peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, keyed by a part of
# torch.cuda.get_device_name(); the first key found in the name wins, so specific names come first.
DENSE_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM5 ("H100 80GB HBM3")
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe alike
}
# A training step costs about three forward passes (forward, then gradients of the input and of
# the weights); a multiply-accumulate is two FLOPs.
TRAIN_FLOPS_PER_FORWARD = 3
FLOPS_PER_MAC = 2


@dataclasses.dataclass(frozen=True)
class Rounds:
    warmup: int = 10  # untimed steps per contender first (compilation, allocator, autotuning)
    steps: int = 20  # timed steps per round
    rounds: int = 5  # timed rounds per contender; the median round is reported


@dataclasses.dataclass
class Contender:
    """One thing being timed: `step()` does one unit of work (an optimizer step, a forward batch,
    a loader batch) of `images_per_step` images, queued on the device without a host sync."""

    step: Callable[[], None]
    images_per_step: int
    check: Callable[[], None] = lambda: None  # after timing: raise if the work went wrong (NaN loss)


@dataclasses.dataclass
class Measurement:
    name: str
    images_per_step: int
    round_seconds: list[float]
    peak_mem_bytes: int | None

    @property
    def step_seconds(self) -> float:
        return statistics.median(self.round_seconds)

    @property
    def images_per_sec(self) -> float:
        return self.images_per_step / self.step_seconds


def measure(factories: dict[str, Callable[[], Contender]], options: Rounds, device: torch.device) -> list[Measurement]:
    """Build and warm up each contender in turn, then time them in alternating rounds, so a drift
    of the machine (clocks, temperature, other load) reaches all of them alike.

    Peak memory is each contender's own: all of them live in one process, so the memory the others
    hold between their steps (weights, optimizer state, EMA) is subtracted from the peak seen while
    it runs. The shared resident batch counts for each.
    """
    contenders: list[Contender] = []
    held_bytes: list[int] = []
    for build in factories.values():
        before = allocated_bytes(device)
        contender = build()
        for _ in range(options.warmup):
            contender.step()
        synchronize(device)
        contenders.append(contender)
        held_bytes.append(allocated_bytes(device) - before)

    round_seconds: list[list[float]] = [[] for _ in contenders]
    peaks: list[int | None] = [None for _ in contenders]
    for _round in range(options.rounds):
        for i, contender in enumerate(contenders):
            reset_peak_memory(device)
            synchronize(device)
            started = time.perf_counter()
            for _ in range(options.steps):
                contender.step()
            synchronize(device)
            round_seconds[i].append((time.perf_counter() - started) / options.steps)
            peak = peak_memory_bytes(device)
            if peak is not None:
                others = sum(held_bytes) - held_bytes[i]
                peaks[i] = max(peaks[i] or 0, peak - others)
    for contender in contenders:
        contender.check()
    return [
        Measurement(name, c.images_per_step, seconds, peak)
        for name, c, seconds, peak in zip(factories, contenders, round_seconds, peaks, strict=True)
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def dense_peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for `precision` (bf16, fp16, tf32, fp32), or None when unknown."""
    for key, peaks in DENSE_PEAK_TFLOPS.items():
        if key in device_name:
            return peaks[precision]
    return None


def math_precision(precision: str) -> str:
    """What the tensor cores run for `trainer.precision`: fp32 runs as TF32 once matmuls allow it
    (ConvNeXt's FLOPs are mostly its pointwise Linear layers, which follow the matmul setting)."""
    if precision != "fp32":
        return precision
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"


def model_flops_utilisation(
    images_per_sec: float, gmacs_per_image: float, *, training: bool, peak_tflops: float | None
) -> float | None:
    if peak_tflops is None:
        return None
    flops_per_image = gmacs_per_image * 1e9 * FLOPS_PER_MAC * (TRAIN_FLOPS_PER_FORWARD if training else 1)
    return images_per_sec * flops_per_image / (peak_tflops * 1e12)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


def cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"
