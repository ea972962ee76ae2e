"""The README's recipe table: every training recipe of the papers, read from the configs train.py runs.

    python -m convnext_train.readme.recipes                  # print it (Markdown)
    python -m convnext_train.readme.recipes --update README.md

A recipe is conf/train.yaml's defaults (the ImageNet-1K recipe) plus at most one conf/experiment
file, which holds only what differs. An experiment's per-variant values sit in a table under a
top-level key named after it, one row per variant the authors ran it for; those rows are the
variants the README lists for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from convnext_train import configs
from convnext_train.data.transforms import SQUASH_FROM_SIZE
from convnext_train.readme import table_command
from convnext_train.readme.models import PAPER_TOP1

START, END = "<!-- recipe-table:start -->", "<!-- recipe-table:end -->"

# ImageNet-1K top-1 (%) of the fine-tuned models, from the paper's Table 1 (also the official README).
IN1K_384_TOP1 = {"convnext_b": 85.1, "convnext_l": 85.5}
IN22K_IN1K_224_TOP1 = {"convnext_b": 85.8, "convnext_l": 86.6, "convnext_xl": 87.0}
IN22K_IN1K_384_TOP1 = {"convnext_b": 86.8, "convnext_l": 87.5, "convnext_xl": 87.8}


@dataclass(frozen=True)
class Recipe:
    experiment: str | None  # conf/experiment/<name>.yaml; None: the ImageNet-1K defaults alone
    models: tuple[str, ...]
    top1: Mapping[str, float] = field(default_factory=dict)  # the paper's ImageNet-1K top-1 per variant
    overrides: tuple[str, ...] = ()

    def command(self, model: str) -> str:
        """The train.py arguments that select this recipe for `model`."""
        return " ".join(
            [f"model={model}", *([f"experiment={self.experiment}"] if self.experiment else []), *self.overrides]
        )


def experiment_models(experiment: str) -> tuple[str, ...]:
    """The variants an experiment file has a row for in its per-variant table."""
    return tuple(configs.load("experiment", experiment)[experiment])


def recipes() -> list[Recipe]:
    """The ImageNet-1K recipe of every V1 variant the paper trained, then the other recipes."""
    return [
        Recipe(None, ("convnext_t", "convnext_s", "convnext_b", "convnext_l"), PAPER_TOP1),
        Recipe("in1k_isotropic", experiment_models("in1k_isotropic"), PAPER_TOP1),
        Recipe("in22k_pretrain", experiment_models("in22k_pretrain")),  # its top-1 is after fine-tuning
        Recipe("ft_in1k_384", experiment_models("ft_in1k_384"), IN1K_384_TOP1),
        Recipe("ft_in22k_in1k", experiment_models("ft_in22k_in1k"), IN22K_IN1K_224_TOP1),
        Recipe("ft_in22k_in1k", experiment_models("ft_in22k_in1k"), IN22K_IN1K_384_TOP1, ("data.img_size=384",)),
        Recipe("v2_ft_in1k", experiment_models("v2_ft_in1k"), PAPER_TOP1),
    ]


def compose_config(model: str, experiment: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config of `python train.py model=<model> [experiment=<experiment>] <overrides>`,
    without the `hydra` node: what `--cfg job --resolve` prints, composed in this process."""
    choices = [f"model={model}", *([f"experiment={experiment}"] if experiment else [])]
    cfg = configs.compose_train([*choices, *overrides])
    # Experiments pick their per-variant row through ${hydra:runtime.choices.model}, which reads
    # Hydra's runtime config: set it as a real run does.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


# --------------------------------------------------------------------------------------------------
# The Markdown table
# --------------------------------------------------------------------------------------------------
COLUMNS = (
    "train.py arguments",
    "epochs",
    "global batch",
    "lr",
    "warmup epochs",
    "weight decay",
    "layer decay",
    "drop path",
    "layer scale",
    "head init",
    "EMA",
    "mixup / cutmix",
    "label smoothing",
    "img size",
    "paper top-1 (%)",
)


def row(recipe: Recipe, model: str, cfg: DictConfig) -> list[str]:
    aug, opt, m = cfg.aug, cfg.optimizer, cfg.model
    mixing = f"{_num(aug.mixup)} / {_num(aug.cutmix)}" if aug.mixup or aug.cutmix else "–"
    return [
        f"`{recipe.command(model)}`",
        _num(cfg.trainer.epochs),
        _num(cfg.trainer.global_batch_size),
        _num(opt.lr),
        _num(cfg.scheduler.warmup_epochs),
        _num(opt.weight_decay),
        _num(opt.layer_decay) if opt.layer_decay != 1.0 else "–",
        _num(m.drop_path_rate),
        _num(m.layer_scale_init_value) if "layer_scale_init_value" in m else "– (V2)",
        _num(m.head_init_scale),
        _num(cfg.ema.decay) if cfg.ema.enabled else "–",
        mixing,
        _num(aug.label_smoothing),
        _num(cfg.data.img_size),
        f"{recipe.top1[model]:.1f}" if model in recipe.top1 else "–",
    ]


def common_settings(configs: Sequence[DictConfig]) -> str:
    """The values every recipe shares, as one paragraph. A value that differs between recipes
    belongs in a column instead: finding one stops the table."""
    below_squash = [c for c in configs if c.data.img_size < SQUASH_FROM_SIZE]
    shared = {
        "AdamW betas {}": (lambda c: tuple(c.optimizer.betas), configs),
        "eps {}": (lambda c: c.optimizer.eps, configs),
        "min lr {}": (lambda c: c.scheduler.min_lr, configs),
        "RandAugment {}": (lambda c: c.aug.auto_augment, configs),
        "random erasing {}": (lambda c: c.aug.reprob, configs),
        "{} train interpolation": (lambda c: c.aug.train_interpolation, configs),
        "gradient clipping {}": (lambda c: c.trainer.clip_grad, configs),
        f"eval centre crop {{}} below {SQUASH_FROM_SIZE} px (at {SQUASH_FROM_SIZE} px the whole image, squashed)": (
            lambda c: c.aug.crop_pct,
            below_squash,
        ),
    }
    parts = []
    for template, (read, rows) in shared.items():
        values = {read(c) for c in rows}
        if len(values) != 1:
            raise ValueError(
                f"recipes differ in '{template}' ({sorted(map(str, values))}): make it a column of the table"
            )
        parts.append(template.format(_show(values.pop())))
    return (
        "Every row also has " + ", ".join(parts) + ". The lr is the value at the row's global batch; it "
        "warms up linearly from 0, then follows a cosine to the min lr, stepped per iteration."
    )


def markdown_table() -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    configs = []
    for recipe in recipes():
        for model in recipe.models:
            cfg = compose_config(model, recipe.experiment, recipe.overrides)
            configs.append(cfg)
            lines.append("| " + " | ".join(row(recipe, model, cfg)) + " |")
    return "\n".join(lines) + "\n\n" + common_settings(configs) + "\n\n" + pretraining_table()


# --------------------------------------------------------------------------------------------------
# FCMAE pre-training (ConvNeXt V2): its own columns, no classifier
# --------------------------------------------------------------------------------------------------
# The sizes the official models/fcmae.py builds (convnextv2_atto .. convnextv2_huge), ours by name.
FCMAE_MODELS = (
    "convnextv2_atto",
    "convnextv2_femto",
    "convnextv2_pico",
    "convnextv2_nano",
    "convnextv2_t",
    "convnextv2_b",
    "convnextv2_l",
    "convnextv2_h",
)
PRETRAINING_COLUMNS = (
    *COLUMNS[: COLUMNS.index("weight decay") + 1],
    "AdamW betas",
    "mask ratio",
    "decoder (blocks x width)",
    "crop scale",
    "flip",
    "EMA",
)


def pretraining_table() -> str:
    """One row per V2 size for experiment=fcmae: the official main_pretrain.py defaults and
    TRAINING.md, read from the composed config (conf/experiment/fcmae.yaml names each source)."""
    lines = [
        'FCMAE pre-training (ConvNeXt V2, `experiment=fcmae`; section "ConvNeXt V2 pre-training"):',
        "",
        "| " + " | ".join(PRETRAINING_COLUMNS) + " |",
        "|---|" + "---:|" * (len(PRETRAINING_COLUMNS) - 1),
    ]
    shared = set()
    for model in FCMAE_MODELS:
        cfg = compose_config(model, "fcmae")
        m = cfg.model
        shared.add(
            (
                cfg.data.img_size,
                m.patch_size,
                m.norm_pix_loss,
                cfg.aug.train_interpolation,
                cfg.scheduler.min_lr,
                m.drop_path_rate,
            )
        )
        m, opt = cfg.model, cfg.optimizer
        lr = opt.lr * cfg.trainer.global_batch_size / opt.lr_reference_batch if opt.scale_lr_with_batch else opt.lr
        cells = [
            f"`model={model} experiment=fcmae`",
            _num(cfg.trainer.epochs),
            _num(cfg.trainer.global_batch_size),
            f"{_num(lr)} ({_num(opt.lr)} x batch / {opt.lr_reference_batch})" if opt.scale_lr_with_batch else _num(lr),
            _num(cfg.scheduler.warmup_epochs),
            _num(opt.weight_decay) + (" (GRN too)" if opt.decay_grn else ""),
            _show(tuple(opt.betas)),
            _num(m.mask_ratio),
            f"{m.decoder_depth} x {m.decoder_embed_dim}",
            _show(tuple(cfg.aug.scale)),
            _num(cfg.aug.hflip),
            _num(cfg.ema.decay) if cfg.ema.enabled else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(shared) != 1:
        raise ValueError(f"FCMAE recipes differ in a setting the table states once: {sorted(map(str, shared))}")
    ((size, patch, norm_pix, interpolation, min_lr, drop_path),) = shared
    targets = "per-patch normalised pixel targets" if norm_pix else "raw pixel targets"
    return "\n".join(lines) + (
        f"\n\nEvery row: {size} px, patches of {patch}, {targets}, {interpolation} RandomResizedCrop and flip "
        f"only, a cosine to lr {_num(min_lr)}, drop path {_num(drop_path)}."
    )


def _num(value: float | int) -> str:
    """4e-3 as `4e-3`, 0.05 as `0.05`, 1.0 as `1.0`, 300 as `300`: the way the paper's tables write them."""
    if isinstance(value, int):
        return str(value)
    if value == 0 or 0.01 <= abs(value) < 1e4:
        return f"{value:.1f}" if value.is_integer() else f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "(" + ", ".join(_num(v) for v in value) + ")"
    return _num(value) if isinstance(value, (int, float)) else f"`{value}`"


def main() -> None:
    table_command(__doc__, START, END, markdown_table)


if __name__ == "__main__":
    main()
