"""train.py, eval.py and predict.py started as processes of their own, without paying their imports
each time: a fork server (a "zygote").

Starting `python train.py` costs about 12 s of CPU on this project's CI machine, nearly all of it
importing torch, timm, torchvision, Hydra and the package; the tiny runs the tests train take a few
seconds after that. The zygote is a Python process that has imported those once (and run nothing:
no torch operation, no thread) and forks a child per command. The child is a process of its own, as
`python <script> <args>` would be: its own pid (signals and SIGKILL reach it alone, or its session),
the command's environment, working directory and argv, `<script>` run as `__main__` by runpy, its
stdout and stderr in files, and a normal interpreter exit (atexit handlers, flushed streams) with the
script's exit code. Only what the imports did is shared, as a fresh process would have done it too.

Tests whose subject is start-up itself (a signal during the imports) start a real `python` instead.
multiprocessing's forkserver does not fit here: it runs callables, not scripts with their own argv,
environment, streams and exit code, and it gives no process handle to signal.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The zygote: imports, then serves one JSON request per line on stdin ({argv, env, cwd, stdout, stderr,
# new_session, hide}) with one line on its protocol channel ({"pid"}), and reports each child's end
# ({"pid", "exit"}, the exit code as subprocess gives it: -N for signal N). Single-threaded: SIGCHLD
# wakes the select loop through a pipe.
ZYGOTE = r"""
import atexit, gc, json, os, runpy, select, signal, sys, threading, traceback
channel = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # whatever the imports print goes to stderr, not into the protocol
import torch, torchvision, timm, hydra, omegaconf  # noqa: E401
import convnext_train.cli, convnext_train.trainer, convnext_train.evaluate, convnext_train.predict  # noqa: E401
gc.freeze()  # the imported objects stay out of the children's collections: no copy of every page they touch

wake_read, wake_write = os.pipe()
os.set_blocking(wake_write, False)
signal.set_wakeup_fd(wake_write)
signal.signal(signal.SIGCHLD, lambda *_: None)
channel.write("ready\n")
requests = os.fdopen(0, "r", buffering=1)


def child(request):
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.close(wake_read)
    os.close(wake_write)
    channel.close()
    if request["new_session"]:
        os.setsid()
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # read by OpenMP at load time, in the zygote
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for package in request["hide"]:  # importing it fails for real, as a package that is not installed
        sys.modules[package] = None
    sys.argv = list(request["argv"])
    script = sys.argv[0]
    code = 0
    try:
        if script.endswith(".py"):
            sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python <script>` puts it
            runpy.run_path(script, run_name="__main__")
        else:  # `python -m <module>`
            sys.path[0] = os.getcwd()
            runpy.run_module(script, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        if not isinstance(exit.code, (int, type(None))):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    # The interpreter's own exit, less the teardown of every module (seconds of freeing the imports'
    # objects, which a fresh process would not have to share): non-daemon threads joined (an async
    # checkpoint save), atexit handlers (W&B, multiprocessing, weakref finalizers), streams flushed.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


while True:
    readable, _, _ = select.select([requests, wake_read], [], [])
    if wake_read in readable:
        os.read(wake_read, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            channel.write(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}) + "\n")
    if requests in readable:
        line = requests.readline()
        if not line:
            break
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        channel.write(json.dumps({"pid": pid}) + "\n")
"""


class _Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the test fork server did not start (exit code {self.process.wait()})")
        self.lock = threading.Lock()  # one request at a time: its answer is the next "pid" line
        self.started: list[int] = []
        self.exits: dict[int, int] = {}
        self.changed = threading.Condition()
        threading.Thread(target=self._read, name="fork server", daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self.changed:
                if "exit" in message:
                    self.exits[message["pid"]] = message["exit"]
                else:
                    self.started.append(message["pid"])
                self.changed.notify_all()

    def start(self, request: dict) -> int:
        with self.lock, self.changed:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            if not self.changed.wait_for(lambda: self.started, timeout=60):
                raise RuntimeError("the test fork server did not answer")
            return self.started.pop(0)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.exits, timeout=timeout)
            return self.exits.get(pid)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


_zygote: _Zygote | None = None


def _server() -> _Zygote:
    global _zygote
    if _zygote is None or _zygote.process.poll() is not None:
        _zygote = _Zygote()
        atexit.register(_zygote.close)
    return _zygote


class ForkedProcess:
    """What the tests use of subprocess.Popen, for a child of the fork server: its streams are
    files, read once it has ended (text)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, new_session: bool, hide: list[str]):
        self._files = tempfile.TemporaryDirectory(prefix="forked-")
        self._stdout, self._stderr = Path(self._files.name, "stdout"), Path(self._files.name, "stderr")
        self.args = argv
        self.returncode: int | None = None
        self.pid = _server().start(
            {
                "argv": [str(a) for a in argv],
                "env": env,
                "cwd": str(cwd),
                "stdout": str(self._stdout),
                "stderr": str(self._stderr),
                "new_session": new_session,
                "hide": hide,
            }
        )

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = _server().wait(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = _server().wait(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._stdout.read_text(errors="replace"), self._stderr.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_script(
    script: str, *args: str, env: dict | None = None, new_session: bool = False, hide: tuple[str, ...] = ()
) -> ForkedProcess:
    """`python <script> <args>` (a script of the repository), or `python -m <script> <args>` (a module),
    from the repository root, forked from the fork server. `hide`: packages the command must find
    missing (None in sys.modules)."""
    argv = [str(REPO / script) if script.endswith(".py") else script, *args]
    return ForkedProcess(argv, script_env(env), REPO, new_session, list(hide))


def script_env(env: dict | None = None) -> dict[str, str]:
    """A command's environment, forked or fresh: this one, unbuffered (a killed run's output is not
    lost), Hydra's errors short (as users see them), and `env` on top."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}


def run_forked(
    script: str, *args: str, timeout: float = 600, env: dict | None = None, hide: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    process = start_script(script, *args, env=env, hide=hide)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
