"""Errors that reach a person: each says what is wrong, where, and how to fix it."""

from __future__ import annotations


class TapError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(TapError):
    """A scenario, federation or silo configuration is invalid.

    ``where`` is a human-readable location such as
    ``"mini.yaml: silos[1] (id=clinic-a) tasks[0] (name=notes) data.path"``.
    """

    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where = where
        self.problem = problem
        self.fix = fix
        message = f"{where}: {problem}" if where else problem
        if fix:
            message += f" (fix: {fix})"
        super().__init__(message)


class DataError(ConfigError):
    """A task's data cannot be loaded: missing file, wrong column, empty split."""


class ModelMismatchError(TapError):
    """Two parties do not run the same frozen base model or component layout."""


class WireError(TapError):
    """A message or tensor stream breaks the wire contract.

    ``reason`` is a short machine-readable label (used as the Prometheus
    ``reason`` label and mapped to a gRPC status by the servicer).
    """

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class TrainingDiverged(TapError):
    """A loss became NaN or infinite during local training."""
