"""Checks of the composed config that Hydra's types cannot express, run before any compute.

Every problem names the key and the accepted values, so a typo costs seconds, not a queued job.
"""

from __future__ import annotations

from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from convnext_train.checkpointing.layout import FORMATS, resolve_format
from convnext_train.data.sources import source
from convnext_train.errors import UserError
from convnext_train.parallelize import STRATEGIES
from convnext_train.problems import Problems
from convnext_train.problems import number as _number
from convnext_train.problems import positive_int as _positive_int
from convnext_train.runtime import resolve_device

PRECISIONS = ("bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


def validate_train_config(cfg: DictConfig, world_size: int = 1) -> None:
    data_source = source(cfg.data.kind)
    if data_source.evaluation_only:
        raise UserError(f"data={cfg.data.kind} is an evaluation set: score a checkpoint on it with eval.py")
    data_source.fill_from_data(cfg.data, "train_split")
    _resolve(cfg)
    _require_set(cfg)
    t, opt, aug = cfg.trainer, cfg.optimizer, cfg.aug
    problems = Problems(cfg)
    require = problems.require

    require(t.precision in PRECISIONS, "trainer.precision", f"must be one of {', '.join(PRECISIONS)}")
    require(t.device in DEVICES, "trainer.device", f"must be one of {', '.join(DEVICES)}")
    require(t.strategy in STRATEGIES, "trainer.strategy", f"must be one of {', '.join(STRATEGIES)}")
    require(isinstance(t.sync_bn, bool), "trainer.sync_bn", "must be true or false")
    if t.sync_bn is True and world_size > 1 and t.device in DEVICES:
        require(
            resolve_device(t.device).type == "cuda",
            "trainer.sync_bn",
            "needs GPUs (torch's SyncBatchNorm runs on CUDA devices only); on the CPU keep sync_bn=false, "
            "each process then normalises its own batch",
        )
    # fp16 needs a grad scaler whose overflow check spans every rank's gradient shard (FSDP1 had
    # ShardedGradScaler); torch.amp.GradScaler would let each rank skip steps on its own shard alone.
    require(
        not (t.strategy == "fsdp" and t.precision == "fp16"),
        "trainer.precision",
        "fp16 is not supported with trainer.strategy=fsdp; use bf16 (or fp32)",
    )
    require(
        _number(t.dist_timeout_minutes) and t.dist_timeout_minutes > 0, "trainer.dist_timeout_minutes", "must be > 0"
    )
    require(_positive_int(t.epochs), "trainer.epochs", "must be a positive integer")
    require(_positive_int(t.micro_batch_size), "trainer.micro_batch_size", "must be a positive integer")
    require(_positive_int(t.global_batch_size), "trainer.global_batch_size", "must be a positive integer")
    if _positive_int(t.micro_batch_size) and _positive_int(t.global_batch_size):
        per_step = t.micro_batch_size * world_size
        require(
            t.global_batch_size % per_step == 0,
            "trainer.global_batch_size",
            f"must be a multiple of micro_batch_size x processes = {t.micro_batch_size} x {world_size}",
        )
    require(_positive_int(t.log_every), "trainer.log_every", "must be a positive integer")
    require(_positive_int(t.eval_every_epochs), "trainer.eval_every_epochs", "must be a positive integer")
    require(
        _number(t.slow_work_timeout_minutes) and t.slow_work_timeout_minutes > 0,
        "trainer.slow_work_timeout_minutes",
        "must be > 0",
    )
    _require_checkpoint(require, cfg, world_size)
    require(
        t.clip_grad is None or (_number(t.clip_grad) and t.clip_grad > 0), "trainer.clip_grad", "must be null or > 0"
    )
    # NumPy's seeds are 32-bit; ranks and resumes derive theirs from it with a SeedSequence.
    require(
        isinstance(t.seed, int) and not isinstance(t.seed, bool) and 0 <= t.seed < 2**32,
        "trainer.seed",
        "must be an integer in [0, 2**32)",
    )
    require(_number(opt.lr) and opt.lr > 0, "optimizer.lr", "must be > 0")
    require(_positive_int(opt.lr_reference_batch), "optimizer.lr_reference_batch", "must be a positive integer")
    require(_number(opt.weight_decay) and opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    require(_number(opt.layer_decay) and 0 < opt.layer_decay <= 1, "optimizer.layer_decay", "must be in (0, 1]")
    require(
        _number(cfg.scheduler.warmup_epochs) and cfg.scheduler.warmup_epochs >= 0,
        "scheduler.warmup_epochs",
        "must be >= 0",
    )
    require(_number(cfg.scheduler.min_lr) and cfg.scheduler.min_lr >= 0, "scheduler.min_lr", "must be >= 0")
    if _number(cfg.scheduler.warmup_epochs) and _positive_int(t.epochs):
        require(
            cfg.scheduler.warmup_epochs <= t.epochs,
            "scheduler.warmup_epochs",
            f"must not exceed trainer.epochs={t.epochs}",
        )
    require(_number(cfg.ema.decay) and 0 <= cfg.ema.decay < 1, "ema.decay", "must be in [0, 1)")
    for key in ("reprob", "hflip", "label_smoothing", "mixup_prob", "mixup_switch_prob"):
        require(_number(aug[key]) and 0 <= aug[key] <= 1, f"aug.{key}", "must be in [0, 1]")
    for key in ("mixup", "cutmix"):
        require(_number(aug[key]) and aug[key] >= 0, f"aug.{key}", "must be >= 0 (0 turns it off)")
    require(_number(aug.crop_pct) and 0 < aug.crop_pct <= 1, "aug.crop_pct", "must be in (0, 1]")
    require(aug.mixup_mode in ("batch", "pair", "elem"), "aug.mixup_mode", "must be batch, pair or elem")
    require(
        aug.remode in ("const", "rand", "pixel"), "aug.remode", "must be const, rand or pixel (random erasing's fill)"
    )
    mixing = _number(aug.mixup) and _number(aug.cutmix) and (aug.mixup > 0 or aug.cutmix > 0)
    if mixing and _positive_int(t.micro_batch_size):
        require(t.micro_batch_size % 2 == 0, "trainer.micro_batch_size", "must be even when Mixup/CutMix is on")
    _require_data(problems, cfg)
    if not problems.found and aug.random_resized_crop:
        problems.found += _augmentation_problems(aug, cfg.data.img_size)
    problems.raise_if_any()


def _require_checkpoint(require: Callable[[bool, str, str], None], cfg: DictConfig, world_size: int) -> None:
    c = cfg.checkpoint
    require(_positive_int(c.keep_last), "checkpoint.keep_last", "must be a positive integer")
    require(_number(c.every_minutes) and c.every_minutes > 0, "checkpoint.every_minutes", "must be > 0")
    require(c.format in FORMATS, "checkpoint.format", f"must be one of {', '.join(FORMATS)}")
    require(isinstance(c.async_save, bool), "checkpoint.async_save", "must be true or false")
    if c.async_save is True and c.format in FORMATS:
        resolved = resolve_format(c.format, cfg.trainer.strategy, world_size)
        require(resolved == "dcp", "checkpoint.async_save", f"needs checkpoint.format=dcp (it is {resolved} here)")
    allowed = c.allow_changes
    require(
        allowed is None or (OmegaConf.is_list(allowed) and all(isinstance(k, str) for k in allowed)),
        "checkpoint.allow_changes",
        "must be a list of config keys, e.g. [optimizer.lr,trainer.epochs]",
    )


def validate_eval_config(cfg: DictConfig) -> None:
    source(cfg.data.kind).fill_from_data(cfg.data, "val_split")  # the split eval.py reads
    _resolve(cfg)
    _require_set(cfg)
    e = cfg.eval
    problems = Problems(cfg)
    require = problems.require
    require(e.precision in PRECISIONS, "eval.precision", f"must be one of {', '.join(PRECISIONS)}")
    require(e.device in DEVICES, "eval.device", f"must be one of {', '.join(DEVICES)}")
    require(_number(e.crop_pct) and 0 < e.crop_pct <= 1, "eval.crop_pct", "must be in (0, 1]")
    require(_positive_int(e.batch_size), "eval.batch_size", "must be a positive integer")
    for key in ("use_ema", "trust_checkpoint", "channels_last"):
        require(isinstance(e[key], bool), f"eval.{key}", "must be true or false")
    _require_data(problems, cfg)
    problems.raise_if_any()


def _require_data(problems: Problems, cfg: DictConfig) -> None:
    """The data keys every source has (train.py and eval.py alike), then the source's own."""
    problems.require(_positive_int(cfg.data.img_size), "data.img_size", "must be a positive integer")
    problems.require(
        isinstance(cfg.data.num_workers, int) and cfg.data.num_workers >= 0,
        "data.num_workers",
        "must be an integer >= 0",
    )
    source(cfg.data.kind).check(cfg.data, problems)


def _require_set(cfg: DictConfig) -> None:
    """Keys the config leaves for the user (`???`, data.root above all), named before anything runs."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if not missing:
        return
    hint = f" (data.root: {source(cfg.data.kind).root_hint})" if "data.root" in missing else ""
    raise UserError(f"set {', '.join(missing)} on the command line, e.g. data.root=/datasets/imagenet{hint}")


def _augmentation_problems(aug: DictConfig, img_size: int) -> list[str]:
    """timm checks its augmentation strings (`rand-m9-mstd0.5-inc1`, interpolation names) only with
    asserts as it builds them, so build the transform now: a typo then costs a line, not a trace."""
    from convnext_train.data.transforms import train_transform

    try:
        train_transform(aug, img_size)
    except (AssertionError, ValueError, KeyError, TypeError) as error:
        said = str(error) or type(error).__name__
        return [
            f"timm cannot build the training augmentation ({said}): check aug.auto_augment={aug.auto_augment} "
            f"(the recipe's is rand-m9-mstd0.5-inc1) and aug.train_interpolation={aug.train_interpolation}"
        ]
    return []


def _resolve(cfg: DictConfig) -> None:
    """Resolve every interpolation now. An experiment's per-variant table (`ft_in1k_384.convnext_b`,
    say) has no row for a variant it does not cover: name the table's variants instead of a trace."""
    try:
        OmegaConf.resolve(cfg)
    except InterpolationResolutionError as error:
        key = str(error).split("'")[1] if "'" in str(error) else ""
        table, _, _ = key.partition(".")
        if table in cfg and isinstance(cfg[table], DictConfig):
            variant = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
            raise UserError(
                f"experiment {table} has no values for model={variant}: it covers "
                f"{', '.join(cfg[table].keys())}; pick one of those or set the missing keys yourself"
            ) from None
        raise UserError(f"the config does not resolve: {error}") from None
