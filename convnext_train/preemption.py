"""Stopping a job that will be killed soon: save, requeue, exit cleanly.

SLURM sends SIGUSR1 ahead of the time limit when the job asks for it (`--signal=USR1@<seconds>`,
see slurm/train.sbatch) and SIGTERM on preemption. The handler only records the request; the
training loop acts on it at its next log step, where all ranks agree (rank 0's request counts):
a checkpoint is written, rank 0 runs `scontrol requeue $SLURM_JOB_ID` when running under SLURM,
and the process exits with code 0. The requeued job runs the same command in the same run
directory and resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from convnext_train.distributed import Processes

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        for signum in SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum: int, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def requeue(self, processes: Processes, step: int) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if not processes.is_main:
            return
        why = self.signal_name or "a stop request on rank 0"
        if job is None:
            print(f"stopping after {why}: checkpoint saved at step {step}; run the same command to resume", flush=True)
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            print(
                f"scontrol requeue {job} failed: {result.stderr.strip()}; resubmit the job to resume",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"stopping after {why}: checkpoint saved at step {step}; requeued SLURM job {job}", flush=True)
