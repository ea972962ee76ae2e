"""Throughput of the trainer's own code, measured the same way on any device.

    python -m convnext_train.bench step model=convnext_t trainer.micro_batch_size=128 trainer.precision=bf16 trainer.compile=true vs=timm
    python -m convnext_train.bench step model=convnext_t trainer.micro_batch_size=128 vs=bare
    python -m convnext_train.bench eval model=convnext_b trainer.micro_batch_size=256 trainer.precision=fp32 tf32=true vs=timm
    python -m convnext_train.bench eval model=convnext_t trainer.device=cpu trainer.precision=fp32 vs=onnxruntime
    python -m convnext_train.bench loader data.root=/datasets/imagenet data.num_workers=10
    python -m convnext_train.bench loader data=imagenet_ffcv data.root=/datasets/imagenet-ffcv data.num_workers=10

- `step`: `engine.optimizer_step`, the training step itself (forward, loss, backward, AdamW at the
  scheduled lr, EMA), on the parts `parts.build_parts` builds for training, with `data=synthetic` and one batch
  already on the device. `vs=timm` runs timm's build of the same variant through that same step;
  `vs=bare` runs the same model in a bare loop (forward, cross-entropy, backward, plain AdamW step),
  which prices the framework around the model. With `experiment=fcmae`, `vs=classification` runs the
  FCMAE encoder as a classifier through the same step (same batch, resolution and recipe): what the
  masked autoencoder costs over supervised training.
- `eval`: inference as the paper's Table 12 measured it: eval mode, no grad, channels-last by
  default, autocast per `trainer.precision`, a `trainer.micro_batch_size` batch on the device.
  `vs=timm` as above; `vs=onnxruntime` runs the same model as `python -m convnext_train.export
  format=onnx` writes it, in ONNX Runtime on the CPU with torch's thread count (predict.py's
  `backend=onnxruntime`); with `trainer.compile=true` ours is compiled.
- `loader`: fully augmented training batches from the `data` config through our real loaders
  (`data.sources.build_loaders`: any data.kind), moved to the device and mixed (Mixup/CutMix) as the
  training step does before its forward pass.

Arguments are train.py's overrides, plus the bench's own options (train.py's config has no such keys):
    vs=timm|bare|classification|onnxruntime   a second contender, measured in rounds alternating with ours
    warmup=N       untimed steps per contender before timing (compilation, allocator, autotuning)
    steps=N        timed steps per round
    rounds=N       timed rounds per contender; the median round is reported
    tf32=true      TF32 matmuls for fp32 (the paper's inference setting; PyTorch's default is off)
`step` takes `trainer.global_batch_size` equal to `trainer.micro_batch_size` (one micro-batch per
optimizer step, so the optimizer and EMA are paid on every batch) unless it is given. Nothing is
logged: `logger=none` is forced.

The timing loop and the memory, MFU and device helpers are convnext_train/measure.py's, which the GPU
suite shares. One module of about 460 lines because it is one command: the three benchmarks share
its argument parsing, the config, the resident batch, the contenders and the report.

Output: a table, then one JSON line per contender with images_per_sec, step_ms, mfu (null without
a known peak: CPU, unknown GPU), peak_mem_gb (null on CPU), device, versions and the full settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from convnext_train import configs
from convnext_train.config import validate_train_config
from convnext_train.data.loaders import Loaders
from convnext_train.data.sources import LoaderArgs, build_loaders
from convnext_train.data.transforms import EvalPreprocessing, mixup_fn
from convnext_train.deploy import OnnxModel, export_onnx
from convnext_train.distributed import Processes
from convnext_train.engine import LossWindow, optimizer_step
from convnext_train.errors import UserError, exit_on_user_error
from convnext_train.measure import (
    Contender,
    Measurement,
    Rounds,
    dense_peak_tflops,
    device_name,
    math_precision,
    measure,
    model_flops_utilisation,
)
from convnext_train.models import TIMM_NAMES, build_model
from convnext_train.models.complexity import count_gmacs
from convnext_train.parts import TrainParts, build_parts
from convnext_train.runtime import autocast, prepare_device, resolve_device
from convnext_train.tasks import build_task

MODES = ("step", "eval", "loader")
RIVALS = {"step": ("timm", "bare", "classification"), "eval": ("timm", "onnxruntime"), "loader": ()}


@dataclasses.dataclass(frozen=True)
class BenchOptions(Rounds):
    vs: str | None = None  # a second contender: timm, bare, classification (step), timm, onnxruntime (eval)
    tf32: bool = False


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m convnext_train.bench",
        description="Throughput of the training step, of inference, or of the data loader.",
        epilog="bench keys: vs=timm|bare|classification|onnxruntime warmup=N steps=N rounds=N tf32=true|false; any other key=value is a train.py override",
    )
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("arguments", nargs="*", help="train.py overrides and bench options (key=value)")
    args = parser.parse_args(argv)
    options, overrides = split_arguments(args.arguments)
    if options.vs is not None and options.vs not in RIVALS[args.mode]:
        allowed = ", ".join(f"vs={name}" for name in RIVALS[args.mode]) or "none"
        raise UserError(f"vs={options.vs} does not apply to `{args.mode}` (there: {allowed})")
    if options.tf32:
        torch.set_float32_matmul_precision("high")
    cfg, variant = compose_config(args.mode, overrides)
    pretraining = args.mode != "loader" and cfg.task == "fcmae"
    if pretraining and (args.mode == "eval" or options.vs in ("timm", "bare")):
        raise UserError(
            f"experiment=fcmae: `{args.mode}` vs={options.vs} has no FCMAE counterpart; bench step vs=classification"
        )
    if options.vs == "classification" and not pretraining:
        raise UserError(
            "vs=classification compares FCMAE's step with its encoder's classification step: add experiment=fcmae"
        )
    if options.vs == "timm" and variant not in TIMM_NAMES:
        raise UserError(f"vs=timm: timm has no counterpart of model={variant} (it has {', '.join(TIMM_NAMES)})")
    benchmark = {"step": bench_step, "eval": bench_eval, "loader": bench_loader}[args.mode]
    measurements = benchmark(cfg, variant, options)
    report(args.mode, cfg, variant, options, overrides, measurements)


def split_arguments(arguments: Sequence[str]) -> tuple[BenchOptions, list[str]]:
    """The bench's own `key=value` options, and the rest (train.py overrides, for Hydra)."""
    bench_keys = {f.name for f in dataclasses.fields(BenchOptions)}
    values: dict[str, Any] = {}
    overrides = []
    for argument in arguments:
        key, _, value = argument.partition("=")
        if key not in bench_keys:
            overrides.append(argument)
        elif key == "vs":
            values[key] = value
        elif key == "tf32":
            if value not in ("true", "false"):
                raise UserError(f"tf32={value}: must be true or false")
            values[key] = value == "true"
        else:
            if not value.isdigit() or int(value) < (0 if key == "warmup" else 1):
                raise UserError(f"{key}={value}: must be an integer >= {0 if key == 'warmup' else 1}")
            values[key] = int(value)
    return BenchOptions(**values), overrides


def compose_config(mode: str, overrides: list[str]) -> tuple[DictConfig, str]:
    """train.py's config for these overrides, and the chosen model variant's name."""
    if mode != "loader" and any(o.startswith("data=") for o in overrides):
        raise UserError(f"`{mode}` runs on synthetic data already on the device; data= applies to `loader` only")
    # The bench logs nothing; step and eval never iterate a loader, so they need no workers.
    forced = ["logger=none"] + (["data=synthetic", "data.num_workers=0"] if mode != "loader" else [])
    try:
        cfg = configs.compose_train([*overrides, *forced])
    except HydraException as error:  # a typo in an override: Hydra's message says which and why
        message = str(error).split("Config search path")[0]  # the search path is noise here
        raise UserError(" ".join(message.split())) from error
    variant = cfg.hydra.runtime.choices.model
    with open_dict(cfg):
        del cfg["hydra"]
    if mode == "step" and not any(o.startswith("trainer.global_batch_size=") for o in overrides):
        cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size
    validate_train_config(cfg)
    return cfg, variant


# --------------------------------------------------------------------------------------------------
# The three benchmarks
# --------------------------------------------------------------------------------------------------
def bench_step(cfg: DictConfig, variant: str, options: BenchOptions) -> list[Measurement]:
    device = prepare_device(resolve_device(cfg.trainer.device))
    batch = resident_batch(cfg, device)
    steps_per_epoch = max(1, cfg.data.train_length // cfg.trainer.global_batch_size)  # the lr schedule's length

    # Each contender builds its own state inside `measure`, which counts the memory it holds.
    def trainer_parts(model: nn.Module) -> TrainParts:
        return build_parts(cfg, model, Processes(), device, steps_per_epoch=steps_per_epoch)  # one process

    factories = {"ours": lambda: trainer_step(trainer_parts(build_model(cfg.model)), batch)}
    if options.vs == "classification":  # the FCMAE encoder as a classifier: same batch, resolution, recipe
        classifying = classification_config(cfg)
        labelled = resident_batch(classifying, device)

        def classifier_parts() -> TrainParts:
            model = build_model(classifying.model)
            return build_parts(classifying, model, Processes(), device, steps_per_epoch=steps_per_epoch)

        factories["classification"] = lambda: trainer_step(classifier_parts(), labelled)
    elif options.vs == "timm":
        factories["timm"] = lambda: trainer_step(trainer_parts(timm_model(cfg, variant)), batch)
    elif options.vs == "bare":
        factories["bare"] = lambda: bare_step(cfg, device, batch)
    return measure(factories, options, device)


def bench_eval(cfg: DictConfig, variant: str, options: BenchOptions) -> list[Measurement]:
    device = prepare_device(resolve_device(cfg.trainer.device))
    images = resident_batch(cfg, device)[0]
    factories = {"ours": lambda: inference_step(build_model(cfg.model), images, cfg, device)}
    if options.vs == "timm":
        factories["timm"] = lambda: inference_step(timm_model(cfg, variant), images, cfg, device)
    elif options.vs == "onnxruntime":
        if device.type != "cpu" or cfg.trainer.precision != "fp32":
            raise UserError(
                "vs=onnxruntime measures ONNX Runtime's CPU provider in fp32: add trainer.device=cpu trainer.precision=fp32"
            )
        factories["onnxruntime"] = lambda: onnxruntime_step(build_model(cfg.model), images, cfg)
    return measure(factories, options, device)


def bench_loader(cfg: DictConfig, variant: str, options: BenchOptions) -> list[Measurement]:
    device = prepare_device(resolve_device(cfg.trainer.device))
    return measure({"ours": lambda: loader_step(cfg, device)}, options, device)


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def classification_config(cfg: DictConfig) -> DictConfig:
    """An FCMAE config's encoder as a ConvNeXt V2 classifier (1000 classes, plain cross-entropy: the
    FCMAE recipe has no Mixup, CutMix or smoothing), everything else as it is."""
    m = cfg.model
    classifying = OmegaConf.merge(cfg, {"task": "classification", "data": {"num_classes": 1000}})
    classifying.model = OmegaConf.create(
        {
            "_target_": "convnext_train.models.ConvNeXtV2",
            "depths": m.depths,
            "dims": m.dims,
            "in_chans": m.in_chans,
            "drop_path_rate": m.drop_path_rate,
            "num_classes": 1000,
        }
    )
    return classifying


def resident_batch(cfg: DictConfig, device: torch.device) -> Batch:
    """One micro-batch of `data=synthetic` training items, collated by our loader and moved to the
    device once, in the layout the model takes (so the step's `.to()` is free). `replaced` stays on
    the CPU, where the step reads it. Targets are the task's: labels, or FCMAE's masks."""
    cpu = LoaderArgs(
        seed=cfg.trainer.seed,
        batch_size=cfg.trainer.micro_batch_size,
        device=torch.device("cpu"),
        sample_target=build_task(cfg).sample_target,
    )
    images, targets, replaced = next(iter(build_loaders(cfg.data, cfg.aug, cpu).train))
    return images.to(device, memory_format=memory_format_of(cfg)), targets.to(device), replaced


def trainer_step(parts: TrainParts, batch: Batch) -> Contender:
    """`engine.optimizer_step` on `parts`, fed the same resident batch every micro-step."""
    parts.forward.train()
    batches = itertools.repeat(batch)
    window = LossWindow(parts.device, 0)
    steps = itertools.count()
    return Contender(
        step=lambda: optimizer_step(parts, batches, window, next(steps)),
        images_per_step=parts.accumulation * batch[0].shape[0],
        check=window.raise_if_non_finite,
    )


def bare_step(cfg: DictConfig, device: torch.device, batch: Batch) -> Contender:
    """The same model and settings in the loop anyone would write first: forward, cross-entropy on
    hard labels, backward, plain AdamW over all parameters. What it lacks is what the framework adds:
    the lr schedule, parameter groups, Mixup/CutMix and its loss, the loss window and the EMA. It
    keeps the optimizer kernel (fused on CUDA, like ours) and, for fp16 only, the grad scaler that
    correct fp16 training needs."""
    images, targets, _ = batch
    model = build_model(cfg.model).to(device=device, memory_format=memory_format_of(cfg)).train()
    forward = torch.compile(model) if cfg.trainer.compile else model
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        fused=True if device.type == "cuda" else None,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "fp16")
    accumulation = cfg.trainer.global_batch_size // cfg.trainer.micro_batch_size  # as build_parts, on one device

    def step() -> None:
        for _micro in range(accumulation):
            with autocast(cfg.trainer.precision, device.type):
                loss = nn.functional.cross_entropy(forward(images), targets)
            scaler.scale(loss / accumulation).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return Contender(step=step, images_per_step=accumulation * cfg.trainer.micro_batch_size)


def inference_step(model: nn.Module, images: torch.Tensor, cfg: DictConfig, device: torch.device) -> Contender:
    model = model.to(device=device, memory_format=memory_format_of(cfg)).eval()
    forward = torch.compile(model) if cfg.trainer.compile else model

    def step() -> None:
        with torch.no_grad(), autocast(cfg.trainer.precision, device.type):
            forward(images)

    return Contender(step=step, images_per_step=images.shape[0])


def onnxruntime_step(model: nn.Module, images: torch.Tensor, cfg: DictConfig) -> Contender:
    """The model as `python -m convnext_train.export format=onnx` writes it, run by ONNX Runtime on
    the CPU with as many threads as torch has (predict.py's backend=onnxruntime)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        preprocessing = EvalPreprocessing(images.shape[-1], cfg.aug.crop_pct)
        export_onnx(model.eval(), path, preprocessing=preprocessing, class_names=[], variant="bench")
        onnx_model = OnnxModel.load(path, threads=torch.get_num_threads())
    contiguous = images.contiguous()  # NCHW, as ONNX takes it

    def step() -> None:
        onnx_model(contiguous)

    return Contender(step=step, images_per_step=images.shape[0])


def loader_step(cfg: DictConfig, device: torch.device) -> Contender:
    """Next training batch as the trainer loads it, then what `optimizer_step` does to it before the
    forward pass: the copy to the device (channels-last) and Mixup/CutMix."""
    t = cfg.trainer
    loaders = build_loaders(cfg.data, cfg.aug, LoaderArgs(seed=t.seed, batch_size=t.micro_batch_size, device=device))
    batches = epoch_after_epoch(loaders)
    memory_format = memory_format_of(cfg)
    mixup = mixup_fn(cfg.aug, cfg.data.num_classes)

    def step() -> None:
        images, targets, _replaced = next(batches)
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            mixup(images, targets)

    return Contender(step=step, images_per_step=t.micro_batch_size)


def epoch_after_epoch(loaders: Loaders) -> Iterator[Batch]:
    """The training loader's batches without end, each epoch in its own order as in training."""
    for epoch in itertools.count():
        loaders.start_at(epoch, 0)
        yield from loaders.train


def timm_model(cfg: DictConfig, variant: str) -> nn.Module:
    """timm's build of our variant, with our head size, input channels, stochastic depth and
    activation checkpointing. Everything else is timm's own (its atto..nano use 1x1 convolutions
    for the MLP, where the paper's code, and ours, use Linear layers)."""
    m = cfg.model
    model = timm.create_model(
        TIMM_NAMES[variant], num_classes=m.num_classes, in_chans=m.in_chans, drop_path_rate=m.drop_path_rate
    )
    model.set_grad_checkpointing(bool(m.get("grad_checkpointing", False)))
    return model


def memory_format_of(cfg: DictConfig) -> torch.memory_format:
    return torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def describe_settings(mode: str, cfg: DictConfig, variant: str) -> str:
    t = cfg.trainer
    if mode == "loader":
        return (
            f"data={cfg.data.kind}, {cfg.data.img_size} px, batch {t.micro_batch_size}, {cfg.data.num_workers} workers"
        )
    batch = (
        f"batch {t.global_batch_size} (micro {t.micro_batch_size})" if mode == "step" else f"batch {t.micro_batch_size}"
    )
    layout = "channels-last" if t.channels_last else "contiguous"
    return f"model={variant}, {cfg.data.img_size} px, {batch}, {t.precision}, {layout}, {'compiled' if t.compile else 'eager'}"


def report(
    mode: str,
    cfg: DictConfig,
    variant: str,
    options: BenchOptions,
    overrides: list[str],
    measurements: list[Measurement],
) -> None:
    """The table, the ratio of ours to the rival, then one JSON line per contender."""
    device = prepare_device(resolve_device(cfg.trainer.device))
    name = device_name(device)
    t = cfg.trainer
    peak = dense_peak_tflops(name, math_precision(t.precision)) if device.type == "cuda" else None
    gmacs = None
    if mode != "loader":
        with torch.device("meta"):
            gmacs = count_gmacs(build_model(cfg.model), cfg.data.img_size)

    print(f"bench {mode}: {describe_settings(mode, cfg, variant)}, on {name}")
    width = max(len(m.name) for m in measurements)
    print(f"{'':<{width}} {'images/s':>10} {'step ms':>10} {'MFU':>7} {'peak GB':>8}")
    rows = []
    for m in measurements:
        mfu = None
        if gmacs is not None:
            mfu = model_flops_utilisation(m.images_per_sec, gmacs, training=mode == "step", peak_tflops=peak)
        peak_gb = m.peak_mem_bytes / 2**30 if m.peak_mem_bytes is not None else None
        print(
            f"{m.name:<{width}} {m.images_per_sec:>10.1f} {m.step_seconds * 1e3:>10.2f} "
            f"{'–' if mfu is None else f'{mfu:.1%}':>7} {'–' if peak_gb is None else f'{peak_gb:.2f}':>8}"
        )
        row: dict[str, Any] = {
            "bench": mode,
            "impl": m.name,
            "model": None if mode == "loader" else variant,
            "images_per_sec": m.images_per_sec,
            "step_ms": m.step_seconds * 1e3,
            "round_step_ms": [seconds * 1e3 for seconds in m.round_seconds],  # the spread behind the median
            "peak_mem_gb": peak_gb,
        }
        if mode != "loader":
            row["mfu"] = mfu
        rows.append(row)
    ours = measurements[0]
    for rival, row in zip(measurements[1:], rows[1:], strict=True):
        ratio = ours.images_per_sec / rival.images_per_sec
        row["ours_over_this"] = ratio
        print(
            f"ours / {rival.name} images/s: {ratio:.3f} (ours' step time {ours.step_seconds / rival.step_seconds - 1:+.1%})"
        )

    environment = {
        "device": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "settings": {
            "overrides": overrides,
            "bench": dataclasses.asdict(options),
            "gmacs_per_image": gmacs,
            "peak_tflops": peak,
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    }
    for row in rows:
        print(json.dumps(row | environment), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
