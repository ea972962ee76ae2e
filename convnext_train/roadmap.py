"""The paper's roadmap as a table and a figure: each step from a ResNet to a ConvNeXt (ConvNeXt paper,
Figure 2; appendix C, Tables 10 and 11) with its parameters and GMACs counted from its config, the
paper's GFLOPs and top-1, and, given training runs, your top-1 beside the paper's.

    python -m convnext_train.roadmap                                    # ResNet-50 -> ConvNeXt-T (Table 10)
    python -m convnext_train.roadmap regime=r200 runs=outputs/roadmap   # ResNet-200 -> ConvNeXt-B, with your runs
    python -m convnext_train.roadmap runs=[runs/a,runs/b] out=figures/roadmap.png
    python -m convnext_train.roadmap measure=true batch_size=64 steps=[resnet50,separate_downsampling]

- `regime=`: one of `REGIMES` (r50, r200); each step is `conf/model/roadmap_<regime>/<step>.yaml`.
- `runs=`: run directories, or folders searched recursively for them (a run directory holds
  `.hydra/hydra.yaml` and `metrics.jsonl`, as train.py writes it; `experiment=roadmap` puts every step's
  run under outputs/roadmap). A run counts for the step its `model=` names; runs of other models are left
  out. Its top-1 is summary.json's `best_top1` once it has finished, else the best `top1` in metrics.jsonl
  so far, marked `*`; several runs of one step (seeds) show their mean and how many there are.
- `measure=true`: images/s of each step as `python -m convnext_train.bench eval` measures it (eval mode,
  no grad, autocast per `precision=`, channels-last per `channels_last=`, one resident batch of
  `batch_size=`; bench's warm-up and steps per round, `rounds=` rounds, the median round).
- `steps=[...]`: only these rows (each is built and counted: a few seconds per step).

Prints the table and writes the figure to `out=` (default roadmap.png): a bar per step in the paper's
order, ResNet at the top, the paper's top-1 and yours beside it, side branches hatched. Bad input
(unknown regime or step, a missing runs= path, no run of this regime there) is one line and exit code 2,
and nothing is written.

One module over 400 lines: the paper's two tables (the registry), reading runs, the table and the figure
are one command's parts, each a section, none used elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from omegaconf import DictConfig, ListConfig, OmegaConf

from convnext_train import configs
from convnext_train.atomic import write_atomically
from convnext_train.command_record import SUBDIR
from convnext_train.configs import CONFIG_DIR
from convnext_train.errors import UserError, exit_on_user_error
from convnext_train.metrics import METRICS_FILE, SUMMARY_FILE, read_metrics
from convnext_train.models.complexity import count_gmacs, count_params
from convnext_train.runtime import AUTOCAST_DTYPES, prepare_device, resolve_device


# --------------------------------------------------------------------------------------------------
# The paper's numbers: ConvNeXt paper (Liu et al., "A ConvNet for the 2020s", arXiv 2201.03545),
# appendix C, Table 10 (ResNet-50 regime) and Table 11 (ResNet-200 regime), top-1 and GFLOPs as printed.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    name: str  # conf/model/roadmap_<regime>/<name>.yaml
    change: str  # what this step changes in the one before it
    paper_top1: float
    paper_gflops: float
    side_branch: bool = False  # tried, not adopted: the next adopted step builds on another (kernel_7)
    note: str = ""  # where the paper's number and our count part, and why


@dataclass(frozen=True)
class Regime:
    name: str  # regime=
    folder: str  # conf/model/<folder>/
    start: str
    end: str
    table: str
    original_recipe_top1: float  # the start model trained with its original (PyTorch) recipe, not the roadmap's
    steps: tuple[Step, ...]  # in the paper's order: Figure 2 top to bottom

    def model_name(self, step: Step) -> str:
        return f"{self.folder}/{step.name}"

    def step(self, name: str) -> Step:
        return next(step for step in self.steps if step.name == name)


R50 = Regime(
    name="r50",
    folder="roadmap_r50",
    start="ResNet-50",
    end="ConvNeXt-T",
    table="Table 10",
    original_recipe_top1=76.13,
    steps=(
        Step("resnet50", "ResNet-50, modern recipe", 78.82, 4.09),
        Step("stage_ratio", "(3,4,6,3) -> (3,3,9,3) blocks", 79.36, 4.53),
        Step("patchify_stem", "4x4 stride-4 stem", 79.51, 4.42),
        Step("depthwise_conv", "depthwise 3x3 conv", 78.28, 2.35),
        Step("wider", "width 64 -> 96", 80.50, 5.27),
        Step("inverted_bottleneck", "inverted bottleneck (4x hidden)", 80.64, 4.64),
        Step("move_up_dwconv", "depthwise conv moved up", 79.92, 4.07),
        Step("kernel_5", "kernel 3 -> 5", 80.35, 4.10, side_branch=True),
        Step("kernel_7", "kernel 3 -> 7", 80.57, 4.15),
        Step("kernel_9", "kernel 3 -> 9", 80.57, 4.21, side_branch=True),
        Step("kernel_11", "kernel 3 -> 11", 80.47, 4.29, side_branch=True),
        Step("gelu", "ReLU -> GELU", 80.62, 4.15),
        Step("fewer_activations", "one activation per block", 81.27, 4.15),
        Step("fewer_norms", "one norm per block", 81.41, 4.15),
        Step(
            "layer_norm",
            "BatchNorm -> LayerNorm",
            81.47,
            4.46,
            note="a typo: no conv changes at this step (Figure 2 prints 4.2G); 4.46 is the next step's count",
        ),
        Step(
            "separate_downsampling",
            "separate downsampling layers (ConvNeXt-T)",
            81.97,
            4.49,
            note="ConvNeXt-T's conv and linear layers count 4.46 (Table 1 prints 4.5G)",
        ),
    ),
)

R200 = Regime(
    name="r200",
    folder="roadmap_r200",
    start="ResNet-200",
    end="ConvNeXt-B",
    table="Table 11",
    original_recipe_top1=78.20,
    steps=(
        Step("resnet200", "ResNet-200, modern recipe", 81.14, 15.01),
        Step("stage_ratio", "(3,24,36,3) -> (3,3,27,3) blocks, width 84", 81.33, 14.52),
        Step("patchify_stem", "4x4 stride-4 stem", 81.59, 14.38),
        Step("depthwise_conv", "depthwise 3x3 conv", 80.54, 7.23),
        Step("wider", "width 84 -> 128", 81.85, 16.76),
        Step("inverted_bottleneck", "inverted bottleneck (4x hidden)", 82.64, 15.68),
        Step("move_up_dwconv", "depthwise conv moved up", 82.04, 14.63),
        Step("kernel_5", "kernel 3 -> 5", 82.32, 14.70, side_branch=True),
        Step("kernel_7", "kernel 3 -> 7", 82.30, 14.81),
        Step("kernel_9", "kernel 3 -> 9", 82.27, 14.95, side_branch=True),
        Step("kernel_11", "kernel 3 -> 11", 82.18, 15.13, side_branch=True),
        Step("gelu", "ReLU -> GELU", 82.19, 14.81),
        Step("fewer_activations", "one activation per block", 82.71, 14.81),
        Step("fewer_norms", "one norm per block", 83.17, 14.81),
        Step("layer_norm", "BatchNorm -> LayerNorm", 83.35, 14.81),
        Step("separate_downsampling", "separate downsampling layers (ConvNeXt-B)", 83.60, 15.35),
    ),
)

REGIMES: dict[str, Regime] = {regime.name: regime for regime in (R50, R200)}


# --------------------------------------------------------------------------------------------------
# Your runs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunResult:
    path: Path
    model: str | None  # the run's model= choice (hydra.runtime.choices.model), e.g. roadmap_r50/gelu
    top1: float | None  # None: no evaluation logged yet
    finished: bool  # it wrote summary.json


@dataclass(frozen=True)
class Yours:
    """One step's runs: the mean top-1 of those that have evaluated."""

    top1: float
    runs: int
    unfinished: bool  # one of them is still training (or stopped before its end)

    def __str__(self) -> str:
        return f"{self.top1:.2f}{'*' if self.unfinished else ''}" + (f" ({self.runs} runs)" if self.runs > 1 else "")


def find_runs(paths: Iterable[Path]) -> list[RunResult]:
    """Every run directory under each path (the path itself included), read."""
    found = []
    for path in paths:
        if not path.exists():
            raise UserError(f"runs={path} does not exist; pass a run directory or a folder holding run directories")
        under = [_read_run(run_dir) for run_dir in _run_directories(path)]
        if not under:
            raise UserError(
                f"runs={path} holds no training run (a run directory holds {SUBDIR}/hydra.yaml and {METRICS_FILE})"
            )
        found += under
    return found


def _run_directories(root: Path) -> list[Path]:
    return sorted(
        Path(folder)
        for folder, subfolders, files in os.walk(root)
        if SUBDIR in subfolders and METRICS_FILE in files and (Path(folder) / SUBDIR / "hydra.yaml").is_file()
    )


def _read_run(run_dir: Path) -> RunResult:
    try:
        record = OmegaConf.load(run_dir / SUBDIR / "hydra.yaml")  # interpolations (${now:...}) stay unresolved
    except Exception as error:  # a truncated or hand-edited file: YAML's and OmegaConf's errors alike
        raise UserError(f"cannot read {run_dir / SUBDIR / 'hydra.yaml'}: {' '.join(str(error).split())}") from error
    model = OmegaConf.select(record, "hydra.runtime.choices.model")
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        return RunResult(run_dir, model, json.loads(summary_path.read_text(encoding="utf-8")).get("best_top1"), True)
    scores = [row["top1"] for row in read_metrics(run_dir) if row.get("top1") is not None]
    return RunResult(run_dir, model, max(scores, default=None), False)


def yours_by_step(regime: Regime, runs: Sequence[RunResult]) -> dict[str, Yours]:
    """The runs of this regime's steps, by step name; the others are left out, but when none is this
    regime's, that is an error that names the models found."""
    names = {regime.model_name(step): step.name for step in regime.steps}
    ours = [run for run in runs if run.model in names]
    if not ours:
        found = Counter(str(run.model) for run in runs)
        listed = ", ".join(f"{model} ({count})" for model, count in sorted(found.items()))
        raise UserError(
            f"none of the {len(runs)} run(s) found is a step of regime={regime.name} (model={regime.folder}/<step>): "
            f"found model= {listed}"
        )
    scored: dict[str, list[RunResult]] = defaultdict(list)
    for run in ours:
        if run.top1 is not None:  # a run that has not evaluated yet has nothing to show
            scored[names[run.model]].append(run)
    return {
        step: Yours(statistics.fmean(run.top1 for run in group), len(group), not all(run.finished for run in group))
        for step, group in scored.items()
    }


# --------------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """How images/s are measured: `bench eval`'s conditions, on random images (throughput does not
    depend on their values)."""

    device: torch.device
    batch_size: int
    precision: str
    channels_last: bool
    rounds: int


@dataclass(frozen=True)
class Row:
    step: Step
    params: int
    gmacs: float  # conv and linear multiply-accumulates of one image, as the paper's "FLOPs"
    images_per_sec: float | None = None
    yours: Yours | None = None


def table_rows(
    regime: Regime,
    *,
    img_size: int = 224,
    steps: Sequence[str] | None = None,
    yours: Mapping[str, Yours] | None = None,
    speed: Speed | None = None,
) -> list[Row]:
    """One row per step (`steps`: only these, in the paper's order), counted on the meta device."""
    rows = []
    for step in regime.steps:
        if steps is not None and step.name not in steps:
            continue
        cfg = configs.model(regime.model_name(step))
        with torch.device("meta"):
            model = instantiate(cfg)
        rows.append(
            Row(
                step,
                count_params(model),
                count_gmacs(model, img_size),
                images_per_sec=measure_images_per_sec(cfg, img_size, speed) if speed is not None else None,
                yours=(yours or {}).get(step.name),
            )
        )
    return rows


def measure_images_per_sec(cfg: DictConfig, img_size: int, speed: Speed) -> float:
    """bench eval's own contender and timing loop, one model at a time (each step's weights are freed
    before the next is built: the 16 R200 steps would not all fit beside each other on a small GPU)."""
    # Imported here: the bench pulls in the data and training stacks, which the table alone never needs.
    from convnext_train.bench import inference_step
    from convnext_train.measure import Rounds, measure

    # The trainer keys bench eval's contender reads (compile stays off: the table times eager models).
    bench_cfg = OmegaConf.create(
        {"trainer": {"precision": speed.precision, "channels_last": speed.channels_last, "compile": False}}
    )
    layout = torch.channels_last if speed.channels_last else torch.contiguous_format
    images = torch.randn(speed.batch_size, cfg.in_chans, img_size, img_size, device=speed.device)
    images = images.contiguous(memory_format=layout)
    factory = {"ours": lambda: inference_step(instantiate(cfg), images, bench_cfg, speed.device)}
    (measurement,) = measure(factory, Rounds(rounds=speed.rounds), speed.device)
    return measurement.images_per_sec


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
SIDE_MARK = " †"
UNFINISHED_FOOTNOTE = "* still training (or stopped early): the best top-1 in its metrics.jsonl so far"


def title(regime: Regime) -> str:
    return f"{regime.start} -> {regime.end} (regime={regime.name}): ImageNet-1K, ConvNeXt paper {regime.table}"


def format_table(regime: Regime, rows: Sequence[Row], img_size: int) -> str:
    """Plain aligned text: the optional columns (images/s, your top-1) only when some row has them."""
    columns: list[tuple[str, list[str]]] = [
        ("step", [row.step.name + (SIDE_MARK if row.step.side_branch else "") for row in rows]),
        ("change", [row.step.change for row in rows]),
        ("params (M)", [f"{row.params / 1e6:.2f}" for row in rows]),
        (f"GMACs @{img_size}", [f"{row.gmacs:.2f}" for row in rows]),
        ("paper GFLOPs", [f"{row.step.paper_gflops:.2f}" + ("°" if row.step.note else " ") for row in rows]),
        ("paper top-1", [f"{row.step.paper_top1:.2f}" for row in rows]),
    ]
    if any(row.images_per_sec is not None for row in rows):
        columns.append(("images/s", [_or_dash(row.images_per_sec, "{:.1f}") for row in rows]))
    if any(row.yours is not None for row in rows):
        columns.append(("your top-1", [_or_dash(row.yours, "{}") for row in rows]))
    widths = [max(len(header), *map(len, cells)) for header, cells in columns]
    left = 2  # the text columns (step, change) align left, the numbers right

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [title(regime), line([header for header, _ in columns])]
    lines += [line([cells[i] for _, cells in columns]) for i in range(len(rows))]
    lines += _footnotes(regime, rows)
    return "\n".join(lines)


def _or_dash(value: object, template: str) -> str:
    return "–" if value is None else template.format(value)


def _footnotes(regime: Regime, rows: Sequence[Row]) -> list[str]:
    notes = [
        f"Every row is trained with the modern recipe (experiment=roadmap); {regime.start} with its original "
        f"recipe: {regime.original_recipe_top1:.2f}% top-1 (paper {regime.table}).",
    ]
    if any(row.step.side_branch for row in rows):
        notes.append(f"{SIDE_MARK.strip()} side branch: tried, not adopted (the roadmap goes on from kernel_7)")
    notes += [
        f"° {row.step.name}: the paper prints {row.step.paper_gflops:.2f}, {row.step.note}"
        for row in rows
        if row.step.note
    ]
    if any(row.yours is not None and row.yours.unfinished for row in rows):
        notes.append(UNFINISHED_FOOTNOTE)
    return notes


# --------------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------------
DPI = 100
FIGURE_WIDTH = 10.0  # inches: 1000 px
# Inches: a title and an axis at any size, then a bar per row (exact in binary, so the pixel size is too).
FIGURE_BASE_HEIGHT, FIGURE_ROW_HEIGHT = 1.5, 0.5
PAPER_COLOUR, YOURS_COLOUR = "#4c72b0", "#dd8452"
SIDE_HATCH = "///"


def figure_size(rows: int) -> tuple[float, float]:
    return FIGURE_WIDTH, FIGURE_BASE_HEIGHT + FIGURE_ROW_HEIGHT * rows


def draw(regime: Regime, rows: Sequence[Row]) -> Figure:
    """Figure 2's layout: a horizontal bar per step, the start model at the top; the paper's top-1 as the
    bar, yours as a thinner bar below it; side branches hatched; each step labelled with its GMACs."""
    # A bare Figure on the Agg canvas rather than pyplot, as plot.py: no global state, no display needed.
    figure = Figure(figsize=figure_size(len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    with_yours = any(row.yours is not None for row in rows)
    # With your bars beside them the paper's move up a little; alone they sit on their tick.
    paper_at, paper_height = (-0.12, 0.5) if with_yours else (0.0, 0.6)
    for y, row in enumerate(rows):
        hatch = SIDE_HATCH if row.step.side_branch else None
        _bar(axes, y + paper_at, row.step.paper_top1, f"{row.step.paper_top1:.2f}", paper_height, PAPER_COLOUR, hatch)
        if row.yours is not None:
            _bar(axes, y + 0.27, row.yours.top1, str(row.yours), 0.22, YOURS_COLOUR, hatch)
    axes.set_yticks(range(len(rows)), [f"{row.step.name}\n{row.gmacs:.2f} GMACs" for row in rows], fontsize="small")
    axes.set_ylim(len(rows) - 0.5, -0.5)  # the first step at the top, as the paper's figure
    values = [row.step.paper_top1 for row in rows] + [row.yours.top1 for row in rows if row.yours is not None]
    # From a bit below the lowest bar (the differences are tenths of a point), with room for the labels.
    axes.set_xlim(math.floor(min(values) - 0.5), max(values) + 0.15 * (max(values) - min(values)) + 0.6)
    axes.set_xlabel("ImageNet-1K top-1 (%)")
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    axes.set_title(f"{regime.start} -> {regime.end} (regime={regime.name}): the paper's {regime.table} and yours")
    handles = [Patch(color=PAPER_COLOUR, label=f"paper ({regime.table})")]
    if with_yours:
        handles.append(Patch(color=YOURS_COLOUR, label="yours (mean of runs; * still training)"))
    if any(row.step.side_branch for row in rows):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=SIDE_HATCH, label="side branch (not adopted)"))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return figure


def _bar(axes, y: float, value: float, label: str, height: float, colour: str, hatch: str | None) -> None:
    axes.barh(y, value, height=height, color=colour, hatch=hatch, edgecolor="white" if hatch else colour)
    axes.annotate(label, (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize="small")


def write_figure(figure: Figure, out: Path) -> Path:
    """Whole or not at all (atomic.py): a reader never finds half a PNG."""
    write_atomically(out, lambda file: figure.savefig(file, format="png", dpi=DPI))
    return out


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
MIN_IMG_SIZE = 32  # every step downsamples 32x: a smaller image leaves the last stage nothing


def run(cfg: DictConfig) -> Path:
    regime, steps, paths, speed = _check(cfg)
    yours = yours_by_step(regime, find_runs(paths)) if paths else None
    rows = table_rows(regime, img_size=cfg.img_size, steps=steps, yours=yours, speed=speed)
    print(format_table(regime, rows, cfg.img_size))
    if speed is not None:
        from convnext_train.measure import device_name

        layout = "channels-last" if speed.channels_last else "contiguous"
        print(
            f"images/s: {device_name(speed.device)}, batch {speed.batch_size}, {cfg.img_size} px, {speed.precision}, "
            f"{layout}, eval mode, no grad (as python -m convnext_train.bench eval)"
        )
    out = write_figure(draw(regime, rows), Path(cfg.out).expanduser())
    print(f"wrote {out}")
    return out


def _check(cfg: DictConfig) -> tuple[Regime, list[str] | None, list[Path], Speed | None]:
    """Everything the user gave, checked before any work: the regime, the steps, the runs= paths, and
    with measure=true the device and settings."""
    if cfg.regime not in REGIMES:
        choices = ", ".join(f"{name} ({r.start} -> {r.end}, {r.table})" for name, r in REGIMES.items())
        raise UserError(f"regime={cfg.regime} is not one of the paper's roadmaps: choose {choices}")
    regime = REGIMES[cfg.regime]
    steps = _as_list(cfg.steps)
    if steps == []:
        raise UserError("steps=[] shows nothing: name some steps, or steps=null for all of them")
    unknown = [name for name in steps or () if name not in {step.name for step in regime.steps}]
    if unknown:
        raise UserError(
            f"steps={','.join(unknown)}: not a step of regime={regime.name}; its steps: "
            + ", ".join(step.name for step in regime.steps)
        )
    problems = []
    for key, least in (("img_size", MIN_IMG_SIZE), ("batch_size", 1), ("rounds", 1)):
        if not (isinstance(cfg[key], int) and not isinstance(cfg[key], bool) and cfg[key] >= least):
            problems.append(f"{key}={cfg[key]}: must be an integer >= {least}")
    for key in ("measure", "channels_last"):
        if not isinstance(cfg[key], bool):
            problems.append(f"{key}={cfg[key]}: must be true or false")
    if cfg.precision not in AUTOCAST_DTYPES:
        problems.append(f"precision={cfg.precision}: must be one of {', '.join(AUTOCAST_DTYPES)}")
    if Path(str(cfg.out)).suffix.lower() != ".png":
        problems.append(f"out={cfg.out}: the figure is a .png file")
    if problems:
        raise UserError("invalid roadmap config: " + "; ".join(problems))
    paths = [Path(str(path)).expanduser() for path in _as_list(cfg.runs) or ()]
    speed = None
    if cfg.measure:
        speed = Speed(_device(cfg.device), cfg.batch_size, cfg.precision, cfg.channels_last, cfg.rounds)
    return regime, steps, paths, speed


def _as_list(value: object) -> list[str] | None:
    """A config key that takes one value or a list of them (`runs=a`, `runs=[a,b]`); null stays None."""
    if value is None:
        return None
    return [str(item) for item in value] if isinstance(value, (ListConfig, list)) else [str(value)]


def _device(name: str) -> torch.device:
    try:
        return prepare_device(resolve_device(str(name)))
    except (UserError, RuntimeError) as error:  # resolve_device names train.py's key (trainer.device)
        raise UserError(f"device={name}: no such device here; use device=auto, cpu or cuda") from error


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="roadmap")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
