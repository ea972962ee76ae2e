"""train.py's work: build everything from the config, resume, loop over epochs, evaluate, save, log.

    python train.py model=convnext_t data.root=/datasets/imagenet

The run directory (Hydra's, `hydra.run.dir`) holds `metrics.jsonl`, `summary.json` and
`checkpoints/`. Running the same command in the same directory resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from convnext_train.checkpoints import CheckpointError, load_pretrained
from convnext_train.config import validate_train_config
from convnext_train.data.datasets import build_loaders
from convnext_train.data.transforms import mixup_fn, train_loss
from convnext_train.distributed import (
    Processes,
    broadcast_flags,
    device_for,
    gather_objects,
    init_processes,
    launch_environment,
    main_process_first,
    shutdown,
)
from convnext_train.ema import WeightEma
from convnext_train.engine import NonFiniteLoss, evaluate, train_one_epoch
from convnext_train.errors import UserError
from convnext_train.metrics import RunLogger
from convnext_train.models import build_model
from convnext_train.optim import build_optimizer
from convnext_train.parallelize import (
    all_finite,
    full_state_dicts,
    is_sharded,
    load_full_state_dicts,
    parallelize,
    reshard,
)
from convnext_train.preemption import Preemption
from convnext_train.resume import RunCheckpoints, restore_rng_state, rng_state
from convnext_train.schedule import cosine_lr

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class TrainState:
    """What a checkpoint needs beyond the components' own state dicts."""

    epoch: int = 0  # the epoch in progress, or the next one to start
    step: int = 0  # optimizer steps taken since the start of training
    best_top1: float = -1.0
    best_top1_ema: float = -1.0
    last_eval: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    train_images: int = 0
    skipped_images: int = 0  # unreadable training images replaced under data.skip_corrupt


@dataclass
class Run:
    """Everything one training run is made of; built once by `build_run`."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    model: torch.nn.Module  # the module itself (sharded in place under FSDP): optimizer, EMA, checkpoints
    forward: torch.nn.Module  # what the step calls: the model, DDP-wrapped and compiled as asked
    no_sync: Callable[[], contextlib.AbstractContextManager]  # skip the gradient all-reduce
    processes: Processes
    ema: WeightEma | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    mixup: Callable | None
    train_loader: Any
    train_start_at: Callable[[int, int], None]  # (epoch, samples this rank has consumed)
    val_loader: Any  # None: no validation split (ImageNet-22K pre-training)
    steps_per_epoch: int
    accumulation: int
    samples_per_step_per_rank: int
    lr_at: Callable[[int], float]
    memory_format: torch.memory_format
    logger: RunLogger
    checkpoints: RunCheckpoints
    state: TrainState
    preemption: Preemption = field(default_factory=Preemption)
    stopping: bool = False  # a stop was requested and agreed on: save, requeue, exit
    last_save: float = field(default_factory=time.monotonic)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.cfg.trainer.precision, self.device.type)

    def progress(self, epoch: int, first_step: int) -> tqdm:
        return tqdm(
            total=self.steps_per_epoch,
            initial=first_step,
            desc=f"epoch {epoch + 1}/{self.cfg.trainer.epochs}",
            unit="step",
            dynamic_ncols=True,
            disable=not (sys.stderr.isatty() and self.processes.is_main),
            leave=False,
        )

    def log_training(self, window: dict, lr: float, progress: tqdm) -> None:
        images = window["steps"] * self.cfg.trainer.global_batch_size
        self.state.train_seconds += window["seconds"]
        self.state.train_images += images
        self.state.skipped_images += window["skipped_images"]
        row = {
            "step": self.state.step,
            "epoch": self.state.step / self.steps_per_epoch,
            "lr": lr,
            "loss": window["loss"],
            "images_per_sec": images / max(window["seconds"], 1e-9),
        }
        if window["skipped_images"]:
            row["skipped_images"] = window["skipped_images"]
        self.logger.log(row)
        progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_sec']:.0f}")
        if progress.disable and self.processes.is_main:  # no terminal (CI, SLURM logs): plain lines
            print(
                f"step {row['step']} epoch {row['epoch']:.2f} loss {row['loss']:.4f} lr {lr:.3e} "
                f"{row['images_per_sec']:.0f} img/s",
                flush=True,
            )

    def checkpoint_due(self) -> bool:
        """Save now? On the clock, or because the job is being stopped (see `preemption.py`); rank
        0 decides, so every rank enters `save_checkpoint` (a collective) together."""
        due = time.monotonic() - self.last_save >= 60 * self.cfg.trainer.checkpoint_every_minutes
        due, self.stopping = broadcast_flags(due, self.preemption.requested)
        return due or self.stopping

    def save_checkpoint(self, epoch: int) -> Path:
        # A finite loss can still leave non-finite weights behind (the update after it diverged):
        # such weights must never replace the last good checkpoint.
        if not all_finite(self.model):
            raise NonFiniteLoss(
                f"the weights became non-finite by step {self.state.step}; the run stopped and the last "
                "checkpoint before it is kept. Lower optimizer.lr or set trainer.clip_grad"
            )
        self.state.epoch = epoch
        # Collectives (gathers under FSDP, of the RNG states always): every rank comes here.
        weights, optimizer_state = full_state_dicts(self.model, self.optimizer)
        if self.ema is not None:
            with self.ema.swapped_into(self.model):
                # Copies: unsharded, the state dict holds the model's own tensors, which get the
                # trained weights back when the block ends.
                ema_weights = {k: v.clone() for k, v in full_state_dicts(self.model, None)[0].items()}
        rng_per_rank = gather_objects(rng_state())
        if not self.processes.is_main:
            self.last_save = time.monotonic()
            return self.checkpoints.directory / "last.pt"
        checkpoint = {
            "model": weights,
            "optimizer": optimizer_state,  # keyed by parameter name: loads under any strategy
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "train_state": asdict(self.state),
            "rng": rng_per_rank,  # one entry per rank
        }
        if self.ema is not None:
            checkpoint["model_ema"] = ema_weights
        path = self.checkpoints.save(checkpoint)
        self.last_save = time.monotonic()
        return path

    def evaluate(self) -> dict[str, float]:
        """top1, top5, val_loss of the model (and with an `_ema` suffix, of the EMA weights)."""
        result = self._scores("")
        if self.ema is not None:
            with self.ema.swapped_into(self.model):
                result |= self._scores("_ema")
        return result

    def _scores(self, suffix: str) -> dict[str, float]:
        # The module itself, not DDP's wrapper: evaluation shards are uneven and DDP's forward
        # would wait for peers. An FSDP forward is collective however: every rank runs as many
        # batches as the one with the most (see `evaluate`), then the weights go back to shards.
        image_shape = (1, self.cfg.model.in_chans, self.cfg.data.img_size, self.cfg.data.img_size)
        scores = evaluate(
            self.model,
            self.val_loader,
            device=self.device,
            autocast=self.autocast,
            memory_format=self.memory_format,
            lockstep_shape=image_shape if is_sharded(self.model) else None,
        )
        reshard(self.model)
        return {
            f"top1{suffix}": scores["top1"],
            f"top5{suffix}": scores["top5"],
            f"val_loss{suffix}": scores["loss"],
            "val_images": scores["images"],  # counted over every process's shard
        }


def run(cfg: DictConfig) -> dict[str, Any]:
    validate_train_config(cfg, world_size=launch_environment().world_size)
    processes = init_processes(resolve_device(cfg.trainer.device).type, cfg.trainer.dist_timeout_minutes)
    try:
        return train(build_run(cfg, Path(HydraConfig.get().runtime.output_dir), processes))
    finally:
        shutdown()


def train(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    state, epochs = run.state, cfg.trainer.epochs
    started = time.perf_counter()
    if run.processes.is_main:
        print(f"run directory: {run.run_dir} ({run.processes.world_size} process(es))", flush=True)
    if state.epoch >= epochs:
        print(f"already trained for {epochs} epochs; nothing to do", flush=True)
    with run.logger:  # closes the W&B run (as failed, on an exception) whatever happens
        for epoch in range(state.epoch, epochs):
            train_one_epoch(run, epoch)
            if run.stopping:
                run.preemption.requeue(run.processes, state.step)
                return {"stopped_at_step": state.step}
            evaluation_due = (epoch + 1) % cfg.trainer.eval_every_epochs == 0 or epoch + 1 == epochs
            if run.val_loader is not None and evaluation_due:
                evaluate_and_keep_best(run, epoch)
            else:
                run.save_checkpoint(epoch + 1)
        return write_summary(run, wall_seconds=time.perf_counter() - started)


def evaluate_and_keep_best(run: Run, epoch: int) -> None:
    state = run.state
    result = run.evaluate()
    state.last_eval = result
    run.logger.log({"step": state.step, "epoch": epoch + 1, **result})
    text = f"epoch {epoch + 1}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%"
    if "top1_ema" in result:
        text += f"  EMA top-1 {result['top1_ema']:.2f}%"
    if run.processes.is_main:
        print(text, flush=True)
    improved = result["top1"] > state.best_top1
    improved_ema = "top1_ema" in result and result["top1_ema"] > state.best_top1_ema
    state.best_top1 = max(state.best_top1, result["top1"])
    state.best_top1_ema = max(state.best_top1_ema, result.get("top1_ema", -1.0))
    path = run.save_checkpoint(epoch + 1)
    if not run.processes.is_main:
        return
    if improved:
        run.checkpoints.mark_best("best.pt", path)
    if improved_ema:
        run.checkpoints.mark_best("best_ema.pt", path)


def write_summary(run: Run, wall_seconds: float) -> dict[str, Any]:
    state = run.state
    evaluated = bool(state.last_eval)  # best_top1 starts below any score: -1 would read as one
    summary = {
        "epochs": state.epoch,
        "steps": state.step,
        "top1": state.last_eval.get("top1"),
        "top5": state.last_eval.get("top5"),
        "best_top1": state.best_top1 if evaluated else None,
        "wall_seconds": wall_seconds,
        "train_seconds": state.train_seconds,
        "images_per_sec": state.train_images / state.train_seconds if state.train_seconds else None,
        "skipped_images": state.skipped_images,
    }
    if run.ema is not None:
        summary.update(
            top1_ema=state.last_eval.get("top1_ema"), best_top1_ema=state.best_top1_ema if evaluated else None
        )
    run.logger.write_summary(summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------
def build_run(cfg: DictConfig, run_dir: Path, processes: Processes) -> Run:
    t = cfg.trainer
    device = device_for(processes, resolve_device(t.device).type)
    world_size, rank = processes.world_size, processes.rank
    if device.type == "cuda":
        # Fixed image sizes: let cuDNN pick the fastest convolution algorithms once.
        torch.backends.cudnn.benchmark = True
    # The same seed everywhere for the weights (DDP also broadcasts rank 0's); `reseed_per_rank`
    # below gives each rank its own stream for drop path and Mixup before training starts.
    seed_everything(t.seed)

    with main_process_first(processes):  # the first builds caches (the digits tree) alone
        loaders = build_loaders(
            cfg.data,
            cfg.aug,
            seed=t.seed,
            batch_size=t.micro_batch_size,
            device=device,
            rank=rank,
            world_size=world_size,
        )
    accumulation = t.global_batch_size // (t.micro_batch_size * world_size)
    steps_per_epoch = loaders.train_length // t.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"the training set has {loaders.train_length} images, fewer than one global batch "
            f"(trainer.global_batch_size={t.global_batch_size}): lower it or add data"
        )

    checkpoints = RunCheckpoints(run_dir / "checkpoints", keep_last=t.keep_last)
    resumed = checkpoints.latest()
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = build_model(cfg.model)
    if cfg.finetune.checkpoint and resumed is None:
        f = cfg.finetune
        if load_pretrained(model, f.checkpoint, use_ema=f.use_ema, trusted=f.trust_checkpoint):
            print(
                f"fine-tuning from {f.checkpoint}: the head is re-initialised for {cfg.data.num_classes} classes",
                flush=True,
            )
    model_bound = bind_model(model, cfg, processes, device, memory_format)
    lr_at = partial(
        cosine_lr,
        base_lr=peak_lr(cfg),
        min_lr=cfg.scheduler.min_lr,
        warmup_steps=round(cfg.scheduler.warmup_epochs * steps_per_epoch),
        total_steps=t.epochs * steps_per_epoch,
    )

    state = TrainState()
    reseed_per_rank(t.seed, processes)
    if resumed is not None:
        b = model_bound
        state = restore(resumed, cfg, b["model"], b["ema"], b["optimizer"], b["scaler"], processes)
        if processes.is_main:
            print(f"resumed from {checkpoints.directory} at epoch {state.epoch}, step {state.step}", flush=True)
    logger = RunLogger(
        run_dir,
        cfg.logger,
        config=OmegaConf.to_container(cfg, resolve=True),
        resume_step=state.step if resumed is not None else None,
        enabled=processes.is_main,
    )
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        **model_bound,
        processes=processes,
        criterion=train_loss(cfg.aug),
        mixup=mixup_fn(cfg.aug, cfg.data.num_classes),
        train_loader=loaders.train,
        train_start_at=loaders.start_at,
        val_loader=loaders.val,
        steps_per_epoch=steps_per_epoch,
        accumulation=accumulation,
        samples_per_step_per_rank=t.global_batch_size // world_size,
        lr_at=lr_at,
        memory_format=memory_format,
        logger=logger,
        checkpoints=checkpoints,
        state=state,
    )


def bind_model(
    model: torch.nn.Module, cfg: DictConfig, processes: Processes, device: torch.device, memory_format
) -> dict[str, Any]:
    """The parts of a Run that belong to one model: the model on its device, what the step calls,
    the EMA, the optimizer and the grad scaler (the benchmark swaps in timm's model through this)."""
    t = cfg.trainer
    model = model.to(device=device, memory_format=memory_format)
    parallel = parallelize(
        model, processes, device, strategy=t.strategy, precision=t.precision, compile_model=t.compile
    )
    return {
        "model": model,
        "forward": parallel.forward,
        "no_sync": parallel.no_sync,
        # After wrapping: DDP has broadcast rank 0's weights (FSDP: each rank's shard of the same
        # seeded weights), so the EMA starts from them.
        "ema": WeightEma(model, decay=cfg.ema.decay) if cfg.ema.enabled else None,
        "optimizer": build_optimizer(model, cfg.optimizer, device.type),
        "scaler": torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "fp16"),
    }


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The one autocast of `trainer.precision`: fp32 runs without one."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def peak_lr(cfg: DictConfig) -> float:
    """`optimizer.lr` is the recipe's value at `lr_reference_batch`; it follows the global batch
    linearly only when `optimizer.scale_lr_with_batch` asks for it."""
    opt = cfg.optimizer
    if opt.scale_lr_with_batch:
        return opt.lr * cfg.trainer.global_batch_size / opt.lr_reference_batch
    return opt.lr


def restore(checkpoint: dict, cfg: DictConfig, model, ema, optimizer, scaler, processes: Processes) -> TrainState:
    try:
        load_full_state_dicts(model, optimizer, checkpoint["model"], checkpoint["optimizer"])
        if ema is not None and "model_ema" in checkpoint:
            with ema.swapped_into(model):
                load_full_state_dicts(model, None, checkpoint["model_ema"], None)
        scaler.load_state_dict(checkpoint["scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError, AssertionError) as error:
        raise CheckpointError(
            f"the run directory's checkpoint does not fit this config ({error}); "
            "use another hydra.run.dir or remove its checkpoints/ to start afresh"
        ) from error
    rng_per_rank = checkpoint["rng"]
    if len(rng_per_rank) == processes.world_size:
        restore_rng_state(rng_per_rank[processes.rank])
    else:
        reseed_per_rank(cfg.trainer.seed, processes, resumed_at_step=checkpoint["step"])
    return TrainState(**checkpoint["train_state"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is visible: use trainer.device=cpu or auto")
    return torch.device(name)


def reseed_per_rank(seed: int, processes: Processes, *, resumed_at_step: int | None = None) -> None:
    """Each rank's own stream for drop path and Mixup. A fresh run: rank 0 goes on with the stream
    `seed` started (so one process reproduces a single-process run), the others take streams derived
    from (seed, rank). Resumed on another number of processes, the saved streams cannot continue one
    to one: every rank, 0 included, takes a stream derived from (seed, rank, step), so the run stays
    reproducible and no rank replays draws it made before."""
    if resumed_at_step is None and processes.rank == 0:
        return
    entropy = [seed, processes.rank] + ([] if resumed_at_step is None else [resumed_at_step])
    seed_everything(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
