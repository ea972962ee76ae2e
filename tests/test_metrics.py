"""Run logging (metrics.jsonl, summary.json, W&B) and the curves plot.

W&B runs are real offline runs; what they logged is read back from the run's `.wandb` file on disk.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from omegaconf import OmegaConf

from convnext_train.configs import CONFIG_DIR
from convnext_train.errors import UserError
from convnext_train.metrics import METRICS_FILE, SUMMARY_FILE, WANDB_RUN_ID_FILE, RunLogger, read_metrics
from convnext_train.plot import main as plot_main
from convnext_train.plot import plot_run

REPO = Path(__file__).resolve().parents[1]
NONE_LOGGER = OmegaConf.load(CONFIG_DIR / "logger" / "none.yaml")
WANDB_LOGGER = OmegaConf.merge(
    OmegaConf.load(CONFIG_DIR / "logger" / "wandb.yaml"), {"run_name": "test-run", "tags": ["unit"]}
)
CONFIG = {"model": {"name": "convnext_atto"}, "optimizer": {"lr": 0.004}}


def train_row(step: int, epoch: int) -> dict:
    return {"step": step, "epoch": epoch, "lr": 1e-3 * step, "loss": 7.0 - 0.01 * step, "images_per_sec": 1000.0}


def eval_row(step: int, epoch: int) -> dict:
    accuracies = {"top1": 10.0 * epoch, "top5": 20.0 * epoch, "top1_ema": 11.0 * epoch, "top5_ema": 21.0 * epoch}
    return {"step": step, "epoch": epoch, **accuracies}


def temporary_files(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------------
# metrics.jsonl and summary.json
# --------------------------------------------------------------------------------------------------
def test_rows_are_written_and_read_back(tmp_path):
    rows = [train_row(10, 0), train_row(20, 0), eval_row(20, 0), train_row(30, 1)]
    logger = RunLogger(tmp_path, NONE_LOGGER, config=CONFIG)
    for row in rows[:2]:
        logger.log(row)
    # Flushed per row: a run killed now would keep both rows.
    assert read_metrics(tmp_path) == rows[:2]
    for row in rows[2:]:
        logger.log(row)
    logger.close()
    assert read_metrics(tmp_path) == rows
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == len(rows)


def test_tensors_and_numpy_scalars_become_plain_numbers(tmp_path):
    with RunLogger(tmp_path, NONE_LOGGER, config=CONFIG) as logger:
        logger.log({"step": torch.tensor(5), "epoch": 0, "loss": torch.tensor(2.5), "lr": np.float32(0.5)})
        logger.write_summary({"best_top1": torch.tensor(75.25, dtype=torch.float64), "epochs": np.int64(300)})
    (row,) = read_metrics(tmp_path)
    assert row == {"step": 5, "epoch": 0, "loss": 2.5, "lr": 0.5}
    assert type(row["step"]) is int and type(row["loss"]) is float
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {"best_top1": 75.25, "epochs": 300}


def test_multi_element_tensor_is_refused(tmp_path):
    with RunLogger(tmp_path, NONE_LOGGER, config=CONFIG) as logger, pytest.raises(RuntimeError):
        logger.log({"step": 1, "loss": torch.tensor([1.0, 2.0])})


def test_row_without_step_is_refused(tmp_path):
    with RunLogger(tmp_path, NONE_LOGGER, config=CONFIG) as logger, pytest.raises(ValueError, match="step"):
        logger.log({"epoch": 0, "loss": 1.0})


def test_resume_drops_only_rows_past_the_resume_step(tmp_path):
    with RunLogger(tmp_path, NONE_LOGGER, config=CONFIG) as logger:
        for step in (10, 20, 30, 40, 50):
            logger.log(train_row(step, epoch=step // 20))
        logger.log(eval_row(30, epoch=1))
    # The process was killed in the middle of writing a row.
    with (tmp_path / METRICS_FILE).open("a") as file:
        file.write('{"step": 60, "lo')
    inode_before = (tmp_path / METRICS_FILE).stat().st_ino

    with RunLogger(tmp_path, NONE_LOGGER, config=CONFIG, resume_step=30) as logger:
        # Replaced by a rename, not truncated in place: a crash here leaves the old file whole.
        assert (tmp_path / METRICS_FILE).stat().st_ino != inode_before
        assert temporary_files(tmp_path) == []
        assert read_metrics(tmp_path) == [train_row(10, 0), train_row(20, 1), train_row(30, 1), eval_row(30, 1)]
        logger.log(train_row(40, 2))
    assert [row["step"] for row in read_metrics(tmp_path)] == [10, 20, 30, 30, 40]


def test_fresh_run_in_an_existing_run_dir_starts_empty(tmp_path):
    with RunLogger(tmp_path, NONE_LOGGER, config=CONFIG) as logger:
        logger.log(train_row(10, 0))
    with RunLogger(tmp_path, NONE_LOGGER, config=CONFIG) as logger:
        logger.log(train_row(5, 0))
    assert read_metrics(tmp_path) == [train_row(5, 0)]


def test_summary_is_replaced_atomically(tmp_path):
    with RunLogger(tmp_path, NONE_LOGGER, config=CONFIG) as logger:
        logger.write_summary({"best_top1": 50.0})
        inode_before = (tmp_path / SUMMARY_FILE).stat().st_ino
        logger.write_summary({"best_top1": 60.0, "final_top1": 59.5})
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {"best_top1": 60.0, "final_top1": 59.5}
    assert (tmp_path / SUMMARY_FILE).stat().st_ino != inode_before
    assert temporary_files(tmp_path) == []


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, WANDB_LOGGER, config=CONFIG, resume_step=10, enabled=False) as logger:
        logger.log(train_row(10, 0))
        logger.write_summary({"best_top1": 1.0})
    assert not run_dir.exists()


def test_unknown_logger_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="logger=none, logger=wandb"):
        RunLogger(tmp_path, {"name": "tensorboard"}, config=CONFIG)


def test_logger_none_does_not_import_wandb(tmp_path):
    # In a fresh interpreter: timm imports wandb on its own, so this process may already have it.
    script = f"""
import sys
from pathlib import Path
from convnext_train.metrics import RunLogger
with RunLogger(Path({str(tmp_path)!r}), {{"name": "none"}}, config={{}}) as logger:
    logger.log({{"step": 1, "loss": 1.0}})
    logger.write_summary({{"best_top1": 1.0}})
assert "wandb" not in sys.modules, "logger=none imported wandb"
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


# --------------------------------------------------------------------------------------------------
# W&B (offline runs, read back from disk)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """Offline W&B whose settings, cache and data stay under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))


# A `.wandb` file is a 7-byte header (":W&B", magic 0xBEE1, version) followed by a LevelDB-style log:
# 32 KiB blocks of chunks, each with a header (crc32c: 4 bytes, length: 2, type: 1) and a piece of a
# serialized `Record` protobuf. wandb 0.31 writes it from Go (wandb-core) and no longer ships a Python
# reader (the old `wandb.sdk.internal.datastore`), so this is one. Getting the format wrong here cannot
# pass a test by accident: the rows would not be found.
WANDB_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
LOG_BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, LAST = 1, 2, 4  # chunk types; MIDDLE (3) chunks only extend the pending record


def read_wandb_records(path: Path) -> list:
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data.startswith(WANDB_FILE_HEADER), f"{path} does not start with a W&B header: {data[:7]!r}"
    records, pending, position = [], b"", len(WANDB_FILE_HEADER)
    while position + CHUNK_HEADER.size <= len(data):
        block_left = LOG_BLOCK_SIZE - position % LOG_BLOCK_SIZE
        if block_left < CHUNK_HEADER.size:  # too small for a chunk header: zero padding up to the next block
            position += block_left
            continue
        _crc, length, chunk_type = CHUNK_HEADER.unpack_from(data, position)
        if chunk_type == 0:  # zeroed space past the last chunk
            break
        payload = data[position + CHUNK_HEADER.size : position + CHUNK_HEADER.size + length]
        position += CHUNK_HEADER.size + length
        pending = payload if chunk_type in (FULL, FIRST) else pending + payload
        if chunk_type in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_history(records: list) -> list[dict]:
    """The logged rows, without W&B's own `_runtime`/`_timestamp` columns (`_step` is kept)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item_key(item): json.loads(item.value_json) for item in record.history.item}
            rows.append({key: value for key, value in row.items() if key not in ("_runtime", "_timestamp")})
    return rows


def wandb_summary(records: list) -> dict:
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({item_key(item): json.loads(item.value_json) for item in record.summary.update})
    return summary


def wandb_run_record(records: list):
    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    return run


def offline_runs(run_dir: Path, run_id: str) -> list[list]:
    """The records of each offline run of `run_id` under run_dir, oldest first.

    Directory names only resolve to the second (wandb appends `-1` and so on within one), so the
    order comes from the start time in each run record."""
    runs = [read_wandb_records(path) for path in run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")]
    return sorted(runs, key=lambda records: wandb_run_record(records).start_time.ToNanoseconds())


def test_wandb_offline_run_gets_the_rows_and_summary(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    rows = [train_row(10, 0), train_row(20, 0), eval_row(20, 0), train_row(30, 1)]
    with RunLogger(run_dir, WANDB_LOGGER, config=CONFIG) as logger:
        for row in rows:
            # float64 so that the value survives exactly; the conversion itself is tested above.
            logger.log({**row, "loss": torch.tensor(row["loss"], dtype=torch.float64)} if "loss" in row else row)
        logger.write_summary({"best_top1": torch.tensor(10.0), "best_epoch": 0})

    run_id = (run_dir / WANDB_RUN_ID_FILE).read_text().strip()
    (records,) = offline_runs(run_dir, run_id)

    # Train and eval rows of the same step are one W&B history row.
    expected = [
        {"_step": 10, **train_row(10, 0)},
        {"_step": 20, **train_row(20, 0), **eval_row(20, 0)},
        {"_step": 30, **train_row(30, 1)},
    ]
    for row in expected:
        del row["step"]  # W&B's own `_step` carries it
    assert wandb_history(records) == expected

    summary = wandb_summary(records)
    assert summary["best_top1"] == 10.0 and summary["best_epoch"] == 0
    run = wandb_run_record(records)
    assert run.run_id == run_id
    assert run.project == WANDB_LOGGER.project and run.display_name == "test-run" and list(run.tags) == ["unit"]
    config = {item_key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["optimizer"] == CONFIG["optimizer"]
    assert read_metrics(run_dir) == rows  # metrics.jsonl is written as well


def test_resumed_wandb_logger_rewinds_the_same_run_to_the_checkpoint(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, WANDB_LOGGER, config=CONFIG) as logger:
        logger.log(train_row(10, 0))
        logger.log(train_row(20, 0))
    run_id = (run_dir / WANDB_RUN_ID_FILE).read_text().strip()

    # Resumed from the checkpoint at step 10: step 20 was logged after it and is about to be again.
    with RunLogger(run_dir, WANDB_LOGGER, config=CONFIG, resume_step=10) as logger:
        logger.log(train_row(20, 0))
        logger.log(train_row(30, 1))
    assert (run_dir / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    first, resumed = offline_runs(run_dir, run_id)
    assert [row["_step"] for row in wandb_history(first)] == [10, 20]
    assert [row["_step"] for row in wandb_history(resumed)] == [20, 30]
    record = wandb_run_record(resumed)
    assert record.run_id == run_id
    # The run is rewound to the checkpoint's step when synced (resume_from="<id>?_step=10").
    assert (record.branch_point.run, record.branch_point.metric, record.branch_point.value) == (run_id, "_step", 10)
    assert [row["step"] for row in read_metrics(run_dir)] == [10, 20, 30]

    # Stopped right after a checkpoint (a preemption): nothing to rewind, the run simply goes on.
    with RunLogger(run_dir, WANDB_LOGGER, config=CONFIG, resume_step=30) as logger:
        logger.log(train_row(40, 2))
    *_, plain = offline_runs(run_dir, run_id)
    assert wandb_run_record(plain).run_id == run_id and not wandb_run_record(plain).branch_point.run
    assert [row["_step"] for row in wandb_history(plain)] == [40]


def test_fresh_wandb_logger_starts_a_new_run(tmp_path, wandb_offline):
    with RunLogger(tmp_path, WANDB_LOGGER, config=CONFIG):
        pass
    first_id = (tmp_path / WANDB_RUN_ID_FILE).read_text()
    with RunLogger(tmp_path, WANDB_LOGGER, config=CONFIG):
        pass
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text() != first_id


def test_wandb_without_login_is_a_user_error(tmp_path):
    # Online with no API key anywhere: wandb refuses before touching the network. In a fresh
    # interpreter, so that nothing wandb has already read in this process (mode, HOME) plays a part.
    home = tmp_path / "home"
    environment = {**os.environ, "HOME": str(home), "NETRC": str(home / ".netrc"), "WANDB_MODE": "online"}
    environment.pop("WANDB_API_KEY", None)
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        environment[variable] = str(tmp_path / variable.lower())
    script = f"""
from pathlib import Path
from convnext_train.errors import UserError
from convnext_train.metrics import RunLogger
try:
    RunLogger(Path({str(tmp_path / "run")!r}), {{"name": "wandb", "project": "p"}}, config={{}})
except UserError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert message.count("\n") == 1 and message.startswith("W&B could not start a run"), message
    assert "`wandb login`" in message and "WANDB_MODE=offline" in message and "logger=none" in message


def test_wandb_not_installed_is_a_user_error(tmp_path):
    # `python -S` skips site-packages, so wandb is really missing; metrics.py itself needs only the
    # standard library, found here through PYTHONPATH.
    script = f"""
from pathlib import Path
from convnext_train.errors import UserError
from convnext_train.metrics import RunLogger
try:
    RunLogger(Path({str(tmp_path)!r}), {{"name": "wandb", "project": "p"}}, config={{}})
except UserError as error:
    print(error)
"""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-S", "-c", script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("logger=wandb needs the wandb package") and "`pip install wandb`" in result.stdout
    assert not (tmp_path / METRICS_FILE).exists()


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
def logged_run(run_dir: Path, *, with_eval: bool) -> Path:
    with RunLogger(run_dir, NONE_LOGGER, config=CONFIG) as logger:
        for epoch in range(3):
            for step in range(epoch * 100 + 10, (epoch + 1) * 100 + 1, 10):
                logger.log(train_row(step, epoch))
            if with_eval:
                logger.log(eval_row((epoch + 1) * 100, epoch))
    return run_dir


@pytest.mark.parametrize("with_eval", [True, False], ids=["with-eval", "train-rows-only"])
def test_plot_writes_a_png_of_sane_size(tmp_path, with_eval, capsys):
    run_dir = logged_run(tmp_path / "run", with_eval=with_eval)
    plot_main([str(run_dir)])
    png = run_dir / "curves.png"
    assert capsys.readouterr().out.strip() == str(png)
    height, width, channels = imread(png).shape
    assert (width, height) == (1500, 400) and channels in (3, 4)


def test_plot_out_option(tmp_path):
    run_dir = logged_run(tmp_path / "run", with_eval=True)
    out = plot_run(run_dir, tmp_path / "plots" / "mine.png")
    assert out == tmp_path / "plots" / "mine.png" and out.stat().st_size > 0
    assert not (run_dir / "curves.png").exists()


@pytest.mark.parametrize("case", ["missing-dir", "no-metrics", "empty-metrics"])
def test_plot_refuses_a_run_dir_without_rows(tmp_path, case, capsys):
    run_dir = tmp_path / "run"
    if case != "missing-dir":
        run_dir.mkdir()
    if case == "empty-metrics":
        (run_dir / METRICS_FILE).touch()
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(run_dir)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1 and str(run_dir) in message
    assert not (run_dir / "curves.png").exists()


def test_plot_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "convnext_train.plot", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    metrics_path = tmp_path / METRICS_FILE
    expected = f"error: {metrics_path} does not exist; pass a training run directory (it holds {METRICS_FILE})\n"
    assert result.stderr == expected
