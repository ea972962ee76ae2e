"""Plot a run's curves from its metrics.jsonl: training loss and learning rate against step, top-1
(and EMA top-1, when the run keeps an EMA) against epoch.

    python -m convnext_train.plot <run_dir> [--out <png>]     # default: <run_dir>/curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from convnext_train.errors import UserError, exit_on_user_error
from convnext_train.metrics import METRICS_FILE, read_metrics

DEFAULT_PLOT_FILE = "curves.png"


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the curves of the run in `run_dir` to `out` (default `<run_dir>/curves.png`) and return it."""
    run_dir = Path(run_dir)
    rows = _rows_to_plot(run_dir)
    out = run_dir / DEFAULT_PLOT_FILE if out is None else Path(out)

    # A bare Figure on the Agg canvas rather than pyplot: no global figure state and no display needed.
    figure = Figure(figsize=(15, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, lr_axes, top1_axes = figure.subplots(1, 3)
    _plot_series(loss_axes, rows, x="step", series={"loss": "train loss"}, ylabel="loss")
    _plot_series(lr_axes, rows, x="step", series={"lr": "learning rate"}, ylabel="learning rate")
    _plot_series(top1_axes, rows, x="epoch", series={"top1": "top-1", "top1_ema": "EMA top-1"}, ylabel="top-1 (%)")
    top1_axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    figure.suptitle(str(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def _rows_to_plot(run_dir: Path) -> list[dict]:
    metrics_path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass the run directory that holds {METRICS_FILE}")
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} does not exist; pass a training run directory (it holds {METRICS_FILE})")
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{metrics_path} has no rows yet; plot again once the run has logged a step")
    return rows


def _plot_series(axes: Axes, rows: list[dict], *, x: str, series: dict[str, str], ylabel: str) -> None:
    """One line per key in `series` (key -> legend label), from the rows that have that key."""
    plotted = False
    for key, label in series.items():
        points = [(row[x], row[key]) for row in rows if key in row and x in row]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, label=label, marker="." if len(points) < 50 else None)
            plotted = True
    axes.set_xlabel(x)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if not plotted:
        # Early in a run there are train rows but no eval rows yet: say so instead of an empty frame.
        axes.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=axes.transAxes, color="gray")
    elif len(series) > 1:
        axes.legend()


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help=f"a training run directory (holds {METRICS_FILE})")
    parser.add_argument("--out", type=Path, default=None, help=f"PNG to write (default: <run_dir>/{DEFAULT_PLOT_FILE})")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main()
