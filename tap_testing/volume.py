"""A state directory a test can fill up or make read-only: a real tmpfs when this process may mount one.

As root (and where mounting is allowed) the directory is a small tmpfs: "full"
writes a filler file until the kernel answers ENOSPC, "read-only" remounts it
``ro`` (EROFS) — the errors a real server meets. Elsewhere (CI without root)
the same errors are injected at ``tap_core.atomic_files.atomic_file`` for writes under
the directory (:func:`tap_testing.faults.disk_full`); ``real`` says which it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

from tap_testing.faults import disk_full

FILLER = ".filler"


def _run(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class StateVolume:
    def __init__(self, path: Path, size_bytes: int = 16 * 1024 * 1024, real: bool | None = None):
        """``real``: True requires a tmpfs, False never mounts, None mounts when possible."""
        self.path = Path(path)
        self.size_bytes = size_bytes
        self.want_real = real
        self.real = False

    def __enter__(self) -> "StateVolume":
        self.path.mkdir(parents=True, exist_ok=True)
        if self.want_real is not False and hasattr(os, "geteuid") and os.geteuid() == 0:
            self.real = _run("mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}", "tmpfs", str(self.path))
        if self.want_real and not self.real:
            raise RuntimeError(f"cannot mount a tmpfs at {self.path} (needs root and a system that allows it)")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.real:
            _run("umount", "-l", str(self.path))
            self.real = False

    @property
    def how(self) -> str:
        return "a real tmpfs" if self.real else "errors injected at tap_core.atomic_files.atomic_file"

    def _under(self, target: str) -> bool:
        return Path(target).resolve().is_relative_to(self.path.resolve())

    @contextlib.contextmanager
    def full(self) -> Iterator[None]:
        """No space left: every new write under the directory fails with ENOSPC until the block ends."""
        if not self.real:
            with disk_full(only=self._under, error=errno.ENOSPC):
                yield
            return
        filler = self.path / FILLER
        with open(filler, "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * (1 << 16))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        try:
            yield
        finally:
            filler.unlink()

    @contextlib.contextmanager
    def read_only(self) -> Iterator[None]:
        """The volume went read-only (EROFS) until the block ends."""
        if not self.real:
            with disk_full(only=self._under, error=errno.EROFS):
                yield
            return
        if not _run("mount", "-o", "remount,ro", str(self.path)):
            raise RuntimeError(f"cannot remount {self.path} read-only")
        try:
            yield
        finally:
            _run("mount", "-o", "remount,rw", str(self.path))
