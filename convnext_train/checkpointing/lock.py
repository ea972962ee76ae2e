"""One run per run directory: an exclusive POSIX record lock (`lockf`) on `<run_dir>/run.lock`, held
for the run's life.

The kernel drops the lock when the process dies, however it dies (SIGKILL, OOM, a node reboot on
NFS once the lease expires), so a killed job never leaves a stale lock behind, and no timestamp or
pid file needs guessing about. A record lock belongs to the process, not to the open file: the
processes the run forks (data-loader workers, which may outlive a SIGKILLed parent by seconds until
they notice) do not hold it, so a run restarted at once is not refused by its own dead predecessor,
as it would be with `flock`. The price: closing any descriptor of the file in the holding process
drops the lock, so only this module opens it. The file's contents only describe the holder (host,
pid, SLURM job, start time) for the message a second job gets. Record locks are NFS's own locks
(NLM, NFSv4) and work on Lustre mounted with `-o flock`; where the file system cannot lock at all,
the run warns once and goes on unlocked rather than refusing to train.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from convnext_train.errors import UserError

LOCK_FILE = "run.lock"


class RunDirectoryInUse(UserError):
    pass


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock now or raise RunDirectoryInUse naming the holder; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, by platform
            os.close(descriptor)
            raise RunDirectoryInUse(self._in_use_message()) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            warnings.warn(
                f"cannot lock {self.path} ({error.strerror}): this file system does not support locks, so a second "
                "job started in the same run directory would not be stopped (Lustre: mount with -o flock)",
                stacklevel=2,
            )
            return
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing it drops the lock
            self._descriptor = None

    def _in_use_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
            who = f"pid {holder['pid']} on {holder['host']}{job}, running since {holder['since']}"
            stop = (
                f"scancel {holder['slurm_job']}"
                if holder.get("slurm_job")
                else f"kill {holder['pid']} on {holder['host']}"
            )
        except (OSError, ValueError, KeyError):
            who, stop = "another process (it has not written its name yet)", "stop it"
        return (
            f"the run directory {self.path.parent} is in use by another run ({who}); two runs in one directory "
            f"would overwrite each other's checkpoints and metrics. Wait for it to finish, stop it ({stop}) and run "
            "this command again to resume, or give this run another hydra.run.dir"
        )
