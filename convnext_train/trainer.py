"""train.py's work: build the run from the config, resume, loop over epochs, evaluate, save, log.

    python train.py model=convnext_t data.root=/datasets/imagenet

The run directory (Hydra's, `hydra.run.dir`) holds `metrics.jsonl`, `summary.json`, `run.lock`,
`checkpoints/` and `.hydra/` (the command, written only once the lock is held: command_record.py).
Running the same command in the same directory resumes where it stopped; the `Checkpointer`
(convnext_train/checkpointing) owns everything about that, and this module is its only caller of
`save`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from convnext_train import preemption
from convnext_train.checkpointing import Checkpointer
from convnext_train.checkpointing.state import EmaState, ModelState, OptimizerState, RngStreams
from convnext_train.command_record import CommandRecord
from convnext_train.config import validate_train_config
from convnext_train.data.sources import LoaderArgs, build_loaders
from convnext_train.distributed import (
    Processes,
    device_for,
    init_processes,
    launch_environment,
    main_process_first,
    raise_if_timeout,
    shutdown,
    wait_for_main,
)
from convnext_train.engine import LossWindow, optimizer_step
from convnext_train.errors import UserError
from convnext_train.metrics import RunLogger
from convnext_train.models import build_model
from convnext_train.next_steps import closing_summary, warn_if_small_from_scratch
from convnext_train.parallelize import is_sharded, reshard
from convnext_train.parts import TrainParts, build_parts
from convnext_train.runtime import prepare_device, reseed_per_rank, resolve_device, seed_everything
from convnext_train.tasks import build_task
from convnext_train.weights import load_pretrained


@dataclass
class TrainState:
    """Where the run stands, beyond the parts' own state dicts."""

    epoch: int = 0  # the epoch in progress, or the next one to start
    step: int = 0  # optimizer steps taken since the start of training
    best: float | None = None  # the task's metric (top-1) at its best so far; None: not evaluated yet
    best_ema: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    train_images: int = 0
    skipped_images: int = 0  # unreadable training images replaced under data.skip_corrupt
    steps_per_epoch: int = 0  # what `step` counts in: a resume must have the same

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Run:
    """Everything one training run is made of; built once by `build_run`."""

    cfg: DictConfig
    run_dir: Path
    processes: Processes
    parts: TrainParts
    train_loader: Any
    train_start_at: Any  # (epoch, samples this rank has consumed) -> None
    val_loader: Any  # None: no validation split (ImageNet-22K pre-training)
    steps_per_epoch: int
    samples_per_step_per_rank: int
    logger: RunLogger
    checkpointer: Checkpointer
    state: TrainState
    class_names: list[str] | None  # what each output index means (ImageFolder's folders); None: unnamed

    def save(self, epoch: int, best: tuple[str, ...] = ()) -> None:
        self.state.epoch = epoch
        report = self.checkpointer.save(best=best)
        self.logger.log(report.row())

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

    def evaluate(self) -> dict[str, float]:
        """The task's scores of the model (top1, top5, val_loss), and with an `_ema` suffix of the
        EMA weights."""
        result = self._scores("")
        if self.parts.ema is not None:
            with self.parts.ema.swapped_into(self.parts.model):
                result |= self._scores("_ema")
        return result

    def _scores(self, suffix: str) -> dict[str, float]:
        # The module itself, not DDP's wrapper: evaluation shards are uneven and DDP's forward
        # would wait for peers. An FSDP forward is collective however: every rank runs as many
        # batches as the one with the most (tasks/evaluation.py), then the weights go back to shards.
        p = self.parts
        image_shape = (1, self.cfg.model.in_chans, self.cfg.data.img_size, self.cfg.data.img_size)
        scores = p.task.evaluate(
            p.model,
            self.val_loader,
            device=p.device,
            autocast=p.autocast,
            memory_format=p.memory_format,
            lockstep_shape=image_shape if is_sharded(p.model) else None,
        )
        reshard(p.model)
        row = {"val_images": scores.pop("images")}  # counted over every process's shard
        scores.pop("skipped_images", None)
        # The evaluation's loss is `val_loss` beside the training loss of metrics.jsonl's rows.
        return row | {f"{'val_loss' if key == 'loss' else key}{suffix}": value for key, value in scores.items()}


def run(cfg: DictConfig) -> dict[str, Any]:
    preemption.install()  # train.py did already; idempotent, for callers that come in here directly
    command = CommandRecord.capture(cfg)  # before validation resolves cfg in place
    t = cfg.trainer
    validate_train_config(cfg, world_size=launch_environment().world_size)
    processes = init_processes(resolve_device(t.device).type, t.dist_timeout_minutes, t.slow_work_timeout_minutes)
    try:
        hydra = HydraConfig.get()
        run_dir, ignored = Path(hydra.runtime.output_dir), list(hydra.job.config.override_dirname.exclude_keys)
        # Before any compute: the run directory's lock, and the recipe of the checkpoint to resume from.
        with Checkpointer(run_dir, cfg, processes, ignored_keys=ignored) as checkpointer:
            built = build_run(cfg, run_dir, processes, checkpointer)
            # Here, not in the Checkpointer (which knows nothing of Hydra): the lock is held and the
            # checkpoint accepted (its recipe, its epoch length, its data layout), so a refused job never
            # reaches this line and leaves the record alone.
            if processes.is_main:
                command.write(run_dir)
            return train(built)
    except RuntimeError as error:
        raise_if_timeout(error, processes)  # a collective timed out: name the rank that stopped answering
        raise
    finally:
        shutdown()


def train(run: Run) -> dict[str, Any]:
    cfg, state, checkpointer = run.cfg, run.state, run.checkpointer
    started = time.perf_counter()
    if run.processes.is_main:
        print(f"run directory: {run.run_dir} ({run.processes.world_size} process(es))", flush=True)
    with run.logger:  # closes the W&B run (as failed, on an exception) whatever happens
        if checkpointer.stop_agreed():  # a stop signal during start-up: nothing trained, nothing to save
            return stop(run, saved=False)
        if state.epoch >= cfg.trainer.epochs:
            print(f"already trained for {cfg.trainer.epochs} epochs; nothing to do", flush=True)
        for epoch in range(state.epoch, cfg.trainer.epochs):
            if train_epoch(run, epoch):
                return stop(run, saved=True)
            evaluate_and_save(run, epoch)
            if checkpointer.stop_agreed():
                return stop(run, saved=True)
        summary = write_summary(run, wall_seconds=time.perf_counter() - started)
    checkpointer.finish()
    if run.processes.is_main:
        print(closing_summary(summary, run.cfg, run.run_dir, run.checkpointer.directory.directory), flush=True)
    return summary


def train_epoch(run: Run, epoch: int) -> bool:
    """The optimizer steps of `epoch` from where the run stands (mid-epoch after a resume), saving
    when the Checkpointer says so. True when it stopped for a stop request (the checkpoint written)."""
    parts, state, log_every = run.parts, run.state, run.cfg.trainer.log_every
    end = (epoch + 1) * run.steps_per_epoch
    first_step = min(max(state.step - epoch * run.steps_per_epoch, 0), run.steps_per_epoch)
    run.train_start_at(epoch, first_step * run.samples_per_step_per_rank)
    parts.forward.train()
    batches = iter(run.train_loader)
    window = LossWindow(parts.device, state.step, run.processes)
    progress = run.progress(epoch, first_step)
    for _ in range(first_step, run.steps_per_epoch):
        lr = optimizer_step(parts, batches, window, state.step)
        state.step += 1
        progress.update()
        if state.step % log_every == 0:
            run.log_training(window.read_and_reset(state.step), lr, progress)
        decision = run.checkpointer.poll()
        # The epoch's last step is saved at the epoch's end, after the evaluation, unless stopping.
        if decision.stop or (decision.save and state.step < end):
            if window.count:  # logged first: the checkpoint's counters include these steps
                run.log_training(window.read_and_reset(state.step), lr, progress)
            run.save(epoch)
            if decision.stop:
                progress.close()
                return True
    if window.count:  # the epoch's last steps since the previous row
        run.log_training(window.read_and_reset(state.step), parts.lr_at(state.step - 1), progress)
    progress.close()
    return False


def evaluate_and_save(run: Run, epoch: int) -> None:
    cfg, state, task = run.cfg, run.state, run.parts.task
    best = ()
    evaluation_due = (epoch + 1) % cfg.trainer.eval_every_epochs == 0 or epoch + 1 == cfg.trainer.epochs
    if run.val_loader is not None and evaluation_due:
        result = run.evaluate()
        state.last_eval = result
        run.logger.log({"step": state.step, "epoch": epoch + 1, **result})
        if run.processes.is_main:
            print(f"epoch {epoch + 1}: {task.describe(result)}", flush=True)
            for figure in task.write_figures(run.run_dir):  # FCMAE's reconstructions.png
                run.logger.log_image(figure, step=state.step)

        def better(score: float | None, than: float | None) -> bool:
            return score is not None and (than is None or (score > than if task.higher_is_better else score < than))

        improved, improved_ema = (
            better(result[task.metric], state.best),
            better(result.get(f"{task.metric}_ema"), state.best_ema),
        )
        state.best = result[task.metric] if improved else state.best
        state.best_ema = result[f"{task.metric}_ema"] if improved_ema else state.best_ema
        best = ("best",) * improved + ("best_ema",) * improved_ema
    run.save(epoch + 1, best=best)


def stop(run: Run, *, saved: bool) -> dict[str, Any]:
    """After a stop request: the checkpoint is written (or nothing was trained); requeue, exit 0."""
    run.checkpointer.finish()
    step = run.state.step
    what = f"checkpoint saved at step {step}" if saved else f"no step trained since step {step}, nothing to save"
    preemption.requeue(run.processes.is_main, run.checkpointer.stop_signal, what)
    return {"stopped_at_step": step}


def write_summary(run: Run, wall_seconds: float) -> dict[str, Any]:
    state, metric = run.state, run.parts.task.metric
    summary = {
        "epochs": state.epoch,
        "steps": state.step,
        **{key: state.last_eval.get(key) for key in run.parts.task.summary_keys},
        f"best_{metric}": state.best,
        "wall_seconds": wall_seconds,
        "train_seconds": state.train_seconds,
        "images_per_sec": state.train_images / state.train_seconds if state.train_seconds else None,
        "skipped_images": state.skipped_images,
        "class_names": run.class_names,
    }
    if run.parts.ema is not None:
        summary |= {f"{metric}_ema": state.last_eval.get(f"{metric}_ema"), f"best_{metric}_ema": state.best_ema}
    run.logger.write_summary(summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------
def build_run(cfg: DictConfig, run_dir: Path, processes: Processes, checkpointer: Checkpointer) -> Run:
    t = cfg.trainer
    device = prepare_device(device_for(processes, resolve_device(t.device).type))
    # The same seed everywhere for the weights (DDP also broadcasts rank 0's); `reseed_per_rank`
    # below gives each rank its own stream for drop path and Mixup before training starts.
    seed_everything(t.seed)
    task = build_task(cfg)

    # Rank 0 first: it builds caches (the digits tree) and scans the tree while the others wait.
    with main_process_first(processes):
        args = LoaderArgs(t.seed, t.micro_batch_size, device, processes.rank, processes.world_size, task.sample_target)
        loaders = build_loaders(cfg.data, cfg.aug, args)
    steps_per_epoch = loaders.train_length // t.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"the training set has {loaders.train_length} images, fewer than one global batch "
            f"(trainer.global_batch_size={t.global_batch_size}): lower it or add data"
        )

    if processes.is_main and checkpointer.resume_entry is None:
        warn_if_small_from_scratch(cfg, loaders.train_length)
    model = build_model(cfg.model)
    if cfg.finetune.checkpoint and checkpointer.resume_entry is None:
        f = cfg.finetune
        if load_pretrained(model, f.checkpoint, use_ema=f.use_ema, trusted=f.trust_checkpoint):
            print(
                f"fine-tuning from {f.checkpoint}: the head is re-initialised for {cfg.data.num_classes} classes",
                flush=True,
            )
    parts = build_parts(cfg, model, processes, device, steps_per_epoch=steps_per_epoch, task=task)
    state = TrainState()
    reseed_per_rank(t.seed, processes)
    # Everything a resume restores, by the name it has in a checkpoint, in the order it is restored.
    stateful = {
        "model": ModelState(parts.model),
        "optimizer": OptimizerState(parts.model, parts.optimizer),
        **({"model_ema": EmaState(parts.ema, parts.model)} if parts.ema is not None else {}),
        "scaler": parts.scaler,
        "train_state": state,
        "rng": RngStreams(processes, t.seed, step=lambda: state.step),
        **({"data": loaders.state} if loaders.state is not None else {}),
    }
    checkpointer.track(stateful, class_names=loaders.class_names)
    resumed = checkpointer.load_latest()
    if resumed and state.steps_per_epoch not in (0, steps_per_epoch):  # 0: saved before it was recorded
        raise UserError(
            f"the checkpoint {checkpointer.resume_entry.path} counts {state.steps_per_epoch} optimizer steps per "
            f"epoch, this run {steps_per_epoch} ({loaders.train_length} images / trainer.global_batch_size="
            f"{t.global_batch_size}): its step {state.step} cannot carry over to another epoch length. Resume with "
            "the checkpoint's global batch and training set, or start a new run from its weights "
            "(finetune.checkpoint=..., another hydra.run.dir)"
        )
    state.steps_per_epoch = steps_per_epoch
    if resumed and loaders.state is not None and 0 < state.step - state.epoch * steps_per_epoch < steps_per_epoch:
        # Stopped inside an epoch: the rest of it is the data's to read as the checkpoint's run would have.
        loaders.state.check_mid_epoch(state.epoch)
    if resumed and processes.is_main:
        print(f"resumed from {checkpointer.resume_entry.path} at epoch {state.epoch}, step {state.step}", flush=True)
    logger = RunLogger(
        run_dir,
        cfg.logger,
        config=checkpointer.config,
        resume_step=state.step if resumed else None,
        enabled=processes.is_main,
    )
    wait_for_main(processes)  # rank 0 may take a while to start W&B: the others wait with the slow-work timeout
    if checkpointer.changes:
        changes = "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in checkpointer.changes.items())
        logger.log({"step": state.step, "resumed_with_changes": changes})
        if processes.is_main:
            print(f"resumed with changes allowed by checkpoint.allow_changes: {changes}", flush=True)
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        processes=processes,
        parts=parts,
        train_loader=loaders.train,
        train_start_at=loaders.start_at,
        val_loader=loaders.val,
        steps_per_epoch=steps_per_epoch,
        samples_per_step_per_rank=t.global_batch_size // processes.world_size,
        logger=logger,
        checkpointer=checkpointer,
        state=state,
        class_names=loaders.class_names,
    )
