"""What the suite runs (the full plan on a GPU, its miniature with --quick), and what every item
needs between runs."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

from convnext_train import bench

REPO = Path(__file__).resolve().parents[2]
IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 300


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the suite runs: the full plan on a GPU, a miniature of it with --quick."""

    quick: bool
    img_size: int = 224
    num_classes: int = 1000
    train_batch: int = 128  # per GPU: the paper's 4096 over 32 GPUs
    eval_batch: int = 256
    check_batch: int = 32
    train_variants: tuple[str, ...] = ("convnext_t", "convnext_s", "convnext_b")
    eval_variants: tuple[str, ...] = ("convnext_t", "convnext_s", "convnext_b", "convnext_l")
    search_variants: tuple[str, ...] = ("convnext_t", "convnext_b", "convnext_l")
    search_cap: int = 4096
    compile: tuple[bool, ...] = (False, True)
    precisions: tuple[str, str] = ("bf16", "tf32")  # the training/inference autocast, the second inference one
    resume_steps: int = 60
    options: bench.BenchOptions = bench.BenchOptions(warmup=10, steps=20, rounds=3)

    @classmethod
    def quick_plan(cls) -> Plan:
        atto = ("convnext_atto",)
        return cls(
            quick=True,
            img_size=32,
            num_classes=10,
            train_batch=8,
            eval_batch=8,
            check_batch=8,
            train_variants=atto,
            eval_variants=atto,
            search_variants=atto,
            search_cap=16,
            compile=(False,),
            precisions=("fp32", "tf32"),  # the CPU's bf16 convolutions are slow: fp32 keeps CI short
            resume_steps=6,
            options=bench.BenchOptions(warmup=1, steps=2, rounds=1),
        )

    def overrides(self, variant: str, batch: int, precision: str, compiled: bool, device: torch.device) -> list[str]:
        return [
            f"model={variant}",
            f"data.img_size={self.img_size}",
            f"data.num_classes={self.num_classes}",
            f"trainer.micro_batch_size={batch}",
            f"trainer.global_batch_size={batch}",
            f"trainer.precision={precision}",
            f"trainer.compile={str(compiled).lower()}",
            "trainer.channels_last=true",
            f"trainer.device={device.type}",
        ]


def release_device_memory() -> None:
    # A fresh dynamo between items: every model variant recompiles the same forward code, and past
    # its recompile limit dynamo would fall back to eager without a word, timing the wrong thing.
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
