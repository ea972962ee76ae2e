"""Where a training run's numbers go: `<run_dir>/metrics.jsonl`, `<run_dir>/summary.json`, and
optionally Weights & Biases (`logger=wandb`).

metrics.jsonl is the record the plot and the tests read; W&B mirrors it. A resumed run drops the
rows logged after the checkpoint it resumes from, because it is about to log those steps again, and
rewinds the W&B run to that step likewise (`resume_from="<id>?_step=<N>"`) when there were such rows.
W&B's rewind is a preview feature that a server may refuse: the run then resumes without it (a
warning says so), and W&B shows the dropped steps twice.
"""

from __future__ import annotations

import json
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from convnext_train.atomic import write_text_atomically
from convnext_train.errors import UserError

if TYPE_CHECKING:
    import wandb

__all__ = ["METRICS_FILE", "SUMMARY_FILE", "WANDB_RUN_ID_FILE", "RunLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# Lets an auto-resumed run continue the same W&B run instead of starting a second one.
WANDB_RUN_ID_FILE = "wandb_run_id"

LOGGER_NAMES = ("none", "wandb")


class RunLogger:
    """Logs metric rows and the final summary of one run.

    `resume_step=None` starts a fresh run: metrics.jsonl starts empty and W&B gets a new run. With
    `resume_step`, rows past that step are dropped and the W&B run recorded in the run dir goes on.
    `enabled=False` (every rank but the first in a distributed run) turns every method into a no-op.
    """

    def __init__(
        self,
        run_dir: Path,
        logger_cfg: Mapping[str, Any],
        *,
        config: dict,
        resume_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        name = logger_cfg["name"]
        # Checked on every rank, so that a typo fails the same way everywhere.
        if name not in LOGGER_NAMES:
            raise UserError(f"unknown logger {name!r}; choose one of: {', '.join(f'logger={n}' for n in LOGGER_NAMES)}")
        self._enabled = enabled
        self._wandb_run: wandb.Run | None = None
        self._metrics_file: TextIO | None = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run_dir = run_dir
        metrics_path = run_dir / METRICS_FILE
        kept, dropped = _rows_up_to(metrics_path, resume_step) if resume_step is not None else ([], 0)
        # W&B first: when it cannot start, metrics.jsonl is left as it was.
        if name == "wandb":
            rewind_to = resume_step if dropped else None
            self._wandb_run = _start_wandb_run(
                run_dir, logger_cfg, config, resuming=resume_step is not None, rewind_to=rewind_to
            )
        if dropped:
            write_text_atomically(metrics_path, "".join(line + "\n" for line in kept))
        # Flushed after every row (see log): a killed run keeps every row it logged.
        self._metrics_file = metrics_path.open("a" if resume_step is not None else "w", encoding="utf-8")

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row, e.g. `{"step", "epoch", "lr", "loss", "images_per_sec"}` or an eval row."""
        if not self._enabled:
            return
        if "step" not in row:
            raise ValueError(f"a metrics row needs a 'step' (resuming and W&B order rows by it); got {sorted(row)}")
        plain_row = {key: _plain_value(value) for key, value in row.items()}
        self._metrics_file.write(json.dumps(plain_row) + "\n")
        self._metrics_file.flush()
        if self._wandb_run is not None:
            values = {key: value for key, value in plain_row.items() if key != "step"}
            self._wandb_run.log(values, step=plain_row["step"])

    def log_image(self, path: Path, step: int) -> None:
        """Send a figure the run wrote (`reconstructions.png`) to W&B under its file name's stem."""
        if self._enabled and self._wandb_run is not None:
            import wandb

            self._wandb_run.log({path.stem: wandb.Image(str(path))}, step=step)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write `summary.json` (replacing any earlier one) and the W&B run summary."""
        if not self._enabled:
            return
        plain_summary = {key: _plain_value(value) for key, value in summary.items()}
        write_text_atomically(self._run_dir / SUMMARY_FILE, json.dumps(plain_summary, indent=2) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.summary.update(plain_summary)

    def close(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and finish the W&B run; a non-zero `exit_code` marks it failed there."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.finish(exit_code=exit_code)
            # finish() can return before wandb's service process has written the run to disk (seen
            # offline: only the file header there). teardown waits for it; wandb's own atexit hook
            # would too, but its docs call that unreliable under multiprocessing.
            wandb.teardown(exit_code=exit_code)
            self._wandb_run = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl`, in logged order."""
    return [json.loads(line) for line in _complete_lines(Path(run_dir) / METRICS_FILE)]


def _complete_lines(path: Path) -> list[str]:
    # A run killed in the middle of a write leaves a last line without its newline: not a row.
    *complete, _unterminated = path.read_text(encoding="utf-8").split("\n")
    return [line for line in complete if line.strip()]


def _rows_up_to(metrics_path: Path, resume_step: int) -> tuple[list[str], int]:
    """(the rows up to `resume_step`, how many lines come after them), a torn last line included."""
    if not metrics_path.exists():
        return [], 0
    text = metrics_path.read_text(encoding="utf-8")
    kept = [line for line in _complete_lines(metrics_path) if json.loads(line)["step"] <= resume_step]
    return kept, len([line for line in text.split("\n") if line.strip()]) - len(kept)


def _plain_value(value: Any) -> Any:
    # 0-dim torch tensors and numpy scalars both expose `.item()`, which gives the Python number json
    # needs; anything bigger than one element raises there, which is a caller bug worth a traceback.
    return value.item() if hasattr(value, "item") else value


def _start_wandb_run(
    run_dir: Path, logger_cfg: Mapping[str, Any], config: dict, *, resuming: bool, rewind_to: int | None
) -> wandb.Run:
    # Imported here so that `logger=none` never loads wandb (slow to import, and it patches stdout).
    try:
        import wandb
    except ImportError as error:
        raise UserError(
            f"logger=wandb needs the wandb package ({error}); run `pip install wandb`, or use logger=none"
        ) from error

    run_id = _wandb_run_id(run_dir, resuming=resuming)
    settings = dict(
        project=logger_cfg.get("project"),
        entity=logger_cfg.get("entity"),
        name=logger_cfg.get("run_name"),
        tags=list(logger_cfg.get("tags") or []),
        config=config,
        dir=run_dir,
    )
    try:
        if rewind_to is not None:
            try:
                return wandb.init(**settings, resume_from=f"{run_id}?_step={rewind_to}")
            except Exception as error:  # noqa: BLE001 - a server without the rewind preview: resume plainly
                warnings.warn(
                    f"W&B could not rewind run {run_id} to step {rewind_to} ({_first_line(error)}); it resumes "
                    "without rewinding, so W&B shows the steps logged after that checkpoint twice",
                    stacklevel=2,
                )
        return wandb.init(**settings, id=run_id, resume="allow")
    except Exception as error:  # wandb raises many types (no login, no network, bad entity); all need the user
        raise UserError(
            f"W&B could not start a run ({_first_line(error)}); run `wandb login`, or set WANDB_MODE=offline, "
            "or use logger=none"
        ) from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _wandb_run_id(run_dir: Path, *, resuming: bool) -> str:
    id_path = run_dir / WANDB_RUN_ID_FILE
    if resuming and id_path.exists():
        return id_path.read_text(encoding="utf-8").strip()
    # W&B run ids are short lowercase alphanumerics; 8 hex digits make a collision negligible.
    run_id = secrets.token_hex(4)
    write_text_atomically(id_path, run_id + "\n")
    return run_id
