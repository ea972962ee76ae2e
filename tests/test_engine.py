"""The engine's loss window across ranks: a non-finite loss on one rank stops every rank at the
same read, naming the rank and the step (real gloo processes)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from convnext_train.distributed import init_processes, shutdown
from convnext_train.engine import LossWindow, NonFiniteLoss

NAN, INF = float("nan"), float("inf")
# Each window's losses, one list per rank, a loss per step (steps are counted once taken: the loss
# of step 3 is step 4's in the messages). Under DDP a rank whose loss is still finite when another
# rank's is not gets the NaN gradients through the all-reduce and goes non-finite a step later:
# read at that step ("rank 1 alone"), or read after it too ("rank 1 first").
WINDOWS = {
    "finite": ([1.0, 2.0], [3.0, 4.0]),
    "rank 1 alone": ([1.0, 1.0], [1.0, INF]),
    "rank 1 first": ([1.0, NAN], [INF, NAN]),
    "both": ([NAN], [INF]),
}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    # Collectives time out after 2 minutes: a rank left waiting for its peer shows as a slow read.
    processes = init_processes("cpu", timeout_minutes=2)
    lines, step = [], 0
    for name, losses in WINDOWS.items():
        window = LossWindow(torch.device("cpu"), step, processes)
        for loss in losses[rank]:
            window.add(torch.tensor(loss), step)
            step += 1
        started = time.monotonic()
        try:
            outcome = f"read {window.read_and_reset(step)['loss']}"
        except NonFiniteLoss as error:
            outcome = str(error)
        lines.append(f"{name}: {time.monotonic() - started:.1f} s: {outcome}")
    Path(out, f"rank{rank}.txt").write_text("\n".join(lines))
    shutdown()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_once_naming_it(tmp_path):
    """Before, only the rank whose own loss was non-finite raised; the other carried on into the
    next step's collectives and waited there for trainer.dist_timeout_minutes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Forked, not spawned: the workers inherit the imported engine (spawning imports it again in
    # each, ~10 s of CPU). No process group exists in this process; theirs are their own.
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    seen = [(tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    for rank, lines in enumerate(seen):
        assert [line.split(":")[0] for line in lines] == list(WINDOWS), lines
        assert max(float(line.split(":")[1].split()[0]) for line in lines) < 5, lines
        assert lines[0].endswith(f"read {sum(WINDOWS['finite'][rank]) / 2}"), lines  # each rank's own mean
    # The same message on every rank: the first bad step, and the rank that saw it.
    alone, first, both = ([lines[window].split(" s: ", 1)[1] for lines in seen] for window in (1, 2, 3))
    for messages in (alone, first, both):
        assert messages[0] == messages[1], messages
        assert "; the run stopped" in messages[0] and "Lower optimizer.lr, set trainer.clip_grad" in messages[0]
    assert alone[0].startswith("the training loss became non-finite on rank 1 (pid ") and " at step 4;" in alone[0]
    assert first[0].startswith("the training loss became non-finite on rank 1 (pid ") and " at step 5;" in first[0]
    assert both[0].startswith("the training loss became non-finite on rank 0 (pid "), both
    assert ") and 1 other rank at step 7;" in both[0], both


def test_one_process_names_the_step_and_no_rank():
    window = LossWindow(torch.device("cpu"), 0)
    window.add(torch.tensor(1.0), 0)
    window.add(torch.tensor(NAN), 1)
    window.add(torch.tensor(INF), 2)
    with pytest.raises(NonFiniteLoss, match=r"^the training loss became non-finite at step 2; .*precision=bf16"):
        window.read_and_reset(3)
