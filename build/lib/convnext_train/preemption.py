"""Stopping a job that will be killed soon: save, requeue, exit cleanly, within seconds.

SLURM sends SIGUSR1 ahead of the time limit when the job asks for it (`--signal=USR1@<seconds>`,
see slurm/train.sbatch) and SIGTERM on preemption, then SIGKILL after its KillWait (30 s by
default). The handler only records the request. The training loop looks at it after every optimizer
step, and the ranks agree on it without waiting (`distributed.Agreement`): one step later every rank
writes the checkpoint, rank 0 runs `scontrol requeue $SLURM_JOB_ID` when running under SLURM, and
the processes exit with code 0. The requeued job runs the same command in the same run directory and
resumes from that checkpoint.

`install()` is the first thing train.py does, before importing torch or Hydra: a signal that
arrives during the start-up (imports, the dataset scan, building the model) is recorded, and the run
stops before its first step instead of being killed by the default handler. This module imports
nothing heavy for that reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """The stop requests this process received (one per process: signal handlers are global)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _record(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name


_signals: StopSignals | None = None


def install() -> StopSignals:
    """Record SIGUSR1 and SIGTERM from now on; the process's StopSignals (the same object on every
    call). Called again by the trainer: a launcher that ran in between (submitit installs its own
    USR1 handler) must not take the stop request away from the training loop."""
    global _signals
    if _signals is None:
        _signals = StopSignals()
    for signum in SIGNALS:
        signal.signal(signum, _signals._record)
    return _signals


def requeue(is_main: bool, why: str, what: str) -> None:
    """Put the SLURM job back in the queue (rank 0 only) and say so; `what` says what was saved."""
    if not is_main:
        return
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        print(f"stopping after {why}: {what}; run the same command to resume", flush=True)
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        print(
            f"scontrol requeue {job} failed: {result.stderr.strip()}; resubmit the job to resume",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(f"stopping after {why}: {what}; requeued SLURM job {job}", flush=True)
