"""Deterministic faults inside a server or agent process: for tests and ``bench/faults.py`` only.

Run ``tap-server`` or ``tap-client`` through this module and name a point::

    TAP_FAULT_POINT=upload:3 python -m tap_testing.faults tap-server serve --kit ... --state ...
    TAP_FAULT_POINT=train:1  python -m tap_testing.faults tap-client run --kit ... --state ...

The process SIGKILLs itself (no clean-up, no flush: a power cut) the N-th time it
reaches the named point. Nothing in ``tap_server`` or ``tap_client`` imports this
module: the points are installed by wrapping their functions, only here, only
when ``TAP_FAULT_POINT`` is set (without it this is exactly the normal command).
Each point says where it sits in :data:`POINTS`; ``tests/test_faults.py`` checks
that every one fires, so a refactoring that moves a function cannot silently
disable a kill.

Other knobs (environment):

- ``TAP_FAULT_TRAIN_SLEEP_S=S``: every local training pass takes S seconds longer
  (long, silent local work without burning CPU: keepalive, deadlines).
- ``TAP_FAULT_DISK_FULL=N``: the N-th atomic file write and every one after it
  fail with ENOSPC, as on a full disk (:func:`disk_full` does the same in process).
- ``TAP_FAULT_MAX_RETRY_DELAY_S=S``: an agent waits at most S seconds between two
  tries of a call (instead of 30 s): a test that restarts the server does not
  wait out a long backoff. Retrying itself is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

ENV_POINT = "TAP_FAULT_POINT"
ENV_TRAIN_SLEEP = "TAP_FAULT_TRAIN_SLEEP_S"
ENV_DISK_FULL = "TAP_FAULT_DISK_FULL"
ENV_MAX_RETRY_DELAY = "TAP_FAULT_MAX_RETRY_DELAY_S"
KILLED_MARK = "tap_testing.faults: SIGKILL at"  # printed to stderr just before the kill (tests look for it)

#: point -> (process, where it sits)
POINTS: dict[str, tuple[str, str]] = {
    "join": ("server", "after the N-th join was recorded and persisted (waiting for silos)"),
    "download": ("server", "after the N-th frame of a Download was handed to gRPC (streaming out)"),
    "upload": ("server", "after the N-th frame of an Upload was read (mid-upload: the update is incomplete)"),
    "update": ("server", "after the N-th update was folded into the running sums (a partial aggregate in memory)"),
    "aggregate": ("server", "inside the N-th round close, before the new global values exist (mid-aggregation)"),
    "state_write": ("server", "after the N-th global-tensor file was written, before the state.json pointing at it"),
    "result": ("server", "after the N-th stage-2 result was recorded and persisted"),
    "train": ("agent", "after the N-th local training pass (mid-round: the update does not exist yet)"),
    "upload_frame": ("agent", "after the N-th upload frame was handed to gRPC (mid-upload)"),
}


def parse_point(spec: str) -> tuple[str, int]:
    """``"name:N"`` (N >= 1; ``"name"`` means 1) -> (name, N); an unknown name is an error, not a no-op."""
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV_POINT}={spec!r}: unknown point {name!r}; known: {', '.join(POINTS)}")
    n = int(count or 1)
    if n < 1:
        raise ValueError(f"{ENV_POINT}={spec!r}: the count must be >= 1")
    return name, n


def die(point: str, n: int) -> None:
    print(f"{KILLED_MARK} {point} #{n} (pid {os.getpid()})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class _Trigger:
    """Counts arrivals at one point; the N-th kills the process."""

    def __init__(self, point: str, n: int):
        self.point, self.n, self.count = point, n, 0

    def reached(self) -> None:
        self.count += 1
        if self.count == self.n:
            die(self.point, self.n)


def _after(owner: Any, attribute: str, trigger: _Trigger, when: Callable[..., bool] = lambda *a, **k: True) -> None:
    """Wrap ``owner.attribute``: once it returned (and ``when(*args)`` holds), count an arrival."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            trigger.reached()
        return result

    setattr(owner, attribute, wrapper)


def _before(owner: Any, attribute: str, trigger: _Trigger) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        trigger.reached()
        return original(*args, **kwargs)

    setattr(owner, attribute, wrapper)


def _counting(frames: Iterator[Any], trigger: _Trigger) -> Iterator[Any]:
    for frame in frames:
        yield frame
        trigger.reached()


def install_point(spec: str) -> None:
    """Arm one kill point (see :data:`POINTS`) in this process."""
    point, n = parse_point(spec)
    trigger = _Trigger(point, n)
    if point in ("join", "update", "result"):
        from tap_server.federation import Federation

        method = {"join": "register", "update": "submit_update", "result": "submit_result"}[point]
        _after(Federation, method, trigger)
    elif point == "aggregate":
        from tap_server.aggregation import StreamingAggregator

        _before(StreamingAggregator, "result", trigger)
    elif point == "state_write":
        import tap_core.store as store

        _after(
            store,
            "atomic_save_tensors",
            trigger,
            when=lambda path, *a, **k: os.path.basename(path).startswith("state-"),
        )
    elif point == "download":
        from tap_server.servicer import FederationServicer

        download = FederationServicer.Download

        def Download(self, request, context):  # noqa: N802 - the RPC's name
            return _counting(download(self, request, context), trigger)

        FederationServicer.Download = Download  # type: ignore[method-assign]
    elif point == "upload":
        from tap_server.servicer import FederationServicer

        upload = FederationServicer.Upload

        def Upload(self, request_iterator, context):  # noqa: N802
            return upload(self, _counting(request_iterator, trigger), context)

        FederationServicer.Upload = Upload  # type: ignore[method-assign]
    elif point == "train":
        from tap_core.silo import SiloRuntime

        _after(SiloRuntime, "train", trigger)
    elif point == "upload_frame":
        import tap_client.agent as agent

        encode = agent.encode_frames
        agent.encode_frames = lambda *a, **k: _counting(encode(*a, **k), trigger)


def slow_training(seconds: float) -> None:
    """Every local training pass first sleeps ``seconds`` (long local work that costs no CPU)."""
    from tap_core.silo import SiloRuntime

    train = SiloRuntime.train

    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return train(*args, **kwargs)

    SiloRuntime.train = wrapper  # type: ignore[method-assign]


@contextlib.contextmanager
def disk_full(
    after: int = 1, only: Callable[[str], bool] = lambda path: True, error: int = errno.ENOSPC
) -> Iterator[dict[str, int]]:
    """Within the block, the ``after``-th atomic write (``tap_core.atomic_files.atomic_file``) whose target passes
    ``only`` and every later one fail with ``error`` (ENOSPC: a disk that filled up; EROFS: a volume gone
    read-only) once their bytes are written.

    Yields counters ({"writes", "failed"}). The real ``atomic_file`` sees the error inside its block, so
    its clean-up (removing the temp file) is what runs.
    """
    import tap_core.atomic_files as files

    original = files.atomic_file
    counts = {"writes": 0, "failed": 0}

    @contextlib.contextmanager
    def full(path):
        with original(path) as tmp:
            yield tmp
            if only(str(path)):
                counts["writes"] += 1
                if counts["writes"] >= after:
                    counts["failed"] += 1
                    raise OSError(error, f"{os.strerror(error)} (injected by tap_testing.faults)", str(path))

    files.atomic_file = full
    try:
        yield counts
    finally:
        files.atomic_file = original


_FOR_LIFE: list[contextlib.AbstractContextManager] = []


def install_from_environment() -> None:
    spec = os.environ.get(ENV_POINT)
    if spec:
        install_point(spec)
    sleep = os.environ.get(ENV_TRAIN_SLEEP)
    if sleep:
        slow_training(float(sleep))
    full = os.environ.get(ENV_DISK_FULL)
    if full:
        # for the life of the process: keep the context manager, or collecting it would undo the patch at once
        _FOR_LIFE.append(disk_full(int(full)))
        _FOR_LIFE[-1].__enter__()
    retry_delay = os.environ.get(ENV_MAX_RETRY_DELAY)
    if retry_delay:
        import tap_client.connection as connection

        connection.MAX_RETRY_DELAY_S = float(retry_delay)


COMMANDS = {"tap-server": "tap_server.cli", "tap-client": "tap_client.cli"}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(
            f"usage: python -m tap_testing.faults {{{'|'.join(COMMANDS)}}} ARGS...  "
            f"(with {ENV_POINT}=point:N; points: {', '.join(POINTS)})"
        )
    import importlib

    cli = importlib.import_module(COMMANDS[argv[0]])
    install_from_environment()
    cli.main(args=argv[1:], prog_name=argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
