"""The folders of a federation that a test or bench runs under one root directory."""

from __future__ import annotations

from pathlib import Path


class FederationDirs:
    """``kits``, ``data``, ``state`` and ``logs`` under ``root`` (a mixin for dataclasses with a ``root`` field)."""

    root: Path

    @property
    def kits(self) -> Path:
        return self.root / "kits"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
