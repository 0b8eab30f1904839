"""Start the demo's server and agents from one interpreter that has already imported the model stack.

``tap demo`` runs seven processes on one machine (a server and one agent per silo), and each of
them would otherwise spend ~7 CPU-s importing torch, transformers and peft before doing anything:
on 2 cores that is ~25 s of the demo's wall time. Here the processes are forked from a
multiprocessing *forkserver* that imported those modules once (``PRELOAD``); every one is still
its own process running the very command line that RERUN.md shows (``tap-server serve ...``,
``tap-client run ...``), with its own log file, exit status and signals.

The forkserver imports modules but never starts a thread pool, a gRPC channel or a CUDA context,
so forking from it is safe (torch's thread pools start in the child, at its first parallel op).
``fresh=True`` (``tap demo --fresh-processes``) starts each process with its own interpreter instead.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

# what every forked process would otherwise import itself (server and agent share most of it)
PRELOAD = ["tap_client.agent", "tap_client.cli", "tap_server.daemon", "tap_server.cli"]


class ForkedProcess:
    """The part of :class:`subprocess.Popen`'s interface the demo uses, over a forked process."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self._process = process

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode  # negative: killed by that signal, as with Popen

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self._process.name), timeout or 0.0)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None and self._process.pid is not None:
            try:
                os.kill(self._process.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Process = subprocess.Popen | ForkedProcess


def _run_command(module: str, args: list[str], log_path: str, env: dict[str, str]) -> None:
    """In the forked child: the given environment, output to the log file (line-buffered, as
    PYTHONUNBUFFERED), then the CLI. (Variables read at import time, such as OMP_NUM_THREADS, were read
    by the forkserver already.)"""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    name = module.split(".", 1)[0].replace("_", "-")  # tap_client.cli -> tap-client
    try:  # the name top and ps -o comm show (Linux); ps -f still shows the forkserver's command line
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError:
        pass
    main = importlib.import_module(module).main
    main(args=args, prog_name=name)  # exits: SystemExit sets the exit code


class Launcher:
    """Starts ``python -m MODULE ARGS`` processes whose output goes to a log file."""

    def __init__(self, fresh: bool = False):
        self._context = None
        if not fresh and "forkserver" in multiprocessing.get_all_start_methods():
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(PRELOAD)

    def start(self, command: list[str], log_path: Path, env: dict[str, str]) -> Process:
        """``command`` is ``[python, "-m", module, *args]``, as the demo writes it into RERUN.md."""
        if self._context is None:
            with open(log_path, "wb") as log:
                return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if command[1:2] != ["-m"]:
            raise ValueError(f"not a python -m command: {command}")
        process = self._context.Process(
            target=_run_command, args=(command[2], command[3:], str(log_path), env), name=command[2], daemon=False
        )
        process.start()
        return ForkedProcess(process)
