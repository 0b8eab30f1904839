"""Errors that reach a person: each says what is wrong, where, and how to fix it.

Every refusal of a request, wherever it is decided (the wire codec, validation,
the federation, identity checks), is a :class:`Rejected` with a short
machine-readable ``reason``. :data:`REASON_STATUS` maps each reason to the gRPC
status it travels as (by name: this package does not import gRPC). The servicer
answers with that status and sends the reason along in the trailing metadata
(:data:`REASON_METADATA_KEY`); the agent turns the answer back into the same
``Rejected``.
"""

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


# Every refusal reason and the gRPC status (its name) it travels as. For a status gRPC reports without a
# reason of ours (its own failures: a dead connection, a message over the limit), the agent assumes the
# first reason listed with that status.
REASON_STATUS: dict[str, str] = {
    # the caller's turn: the round moved on, or the server already has it
    "stale_round": "FAILED_PRECONDITION",
    "future_round": "FAILED_PRECONDITION",
    "not_selected": "FAILED_PRECONDITION",
    "duplicate": "ALREADY_EXISTS",
    # joins
    "bad_declaration": "FAILED_PRECONDITION",
    "fingerprint_mismatch": "FAILED_PRECONDITION",
    "federation_started": "FAILED_PRECONDITION",
    "declaration_changed": "FAILED_PRECONDITION",
    "tasks_conflict": "FAILED_PRECONDITION",
    # identity (from the client certificate)
    "no_certificate": "UNAUTHENTICATED",
    "bad_certificate": "UNAUTHENTICATED",
    "not_provisioned": "PERMISSION_DENIED",
    "unknown_certificate": "PERMISSION_DENIED",
    "retired_certificate": "PERMISSION_DENIED",
    "revoked": "PERMISSION_DENIED",
    # content: malformed messages, tensors and numbers
    "malformed": "INVALID_ARGUMENT",
    "unknown_component": "INVALID_ARGUMENT",
    "unexpected_component": "INVALID_ARGUMENT",
    "missing_component": "INVALID_ARGUMENT",
    "unknown_tensor": "INVALID_ARGUMENT",
    "missing_tensor": "INVALID_ARGUMENT",
    "wrong_shape": "INVALID_ARGUMENT",
    "wrong_dtype": "INVALID_ARGUMENT",
    "bad_checksum": "INVALID_ARGUMENT",
    "non_finite": "INVALID_ARGUMENT",
    "bad_weight": "INVALID_ARGUMENT",
    "bad_stats": "INVALID_ARGUMENT",
    "bad_result": "INVALID_ARGUMENT",
    "update_norm": "INVALID_ARGUMENT",  # an update that moves a component further than aggregation.max_update_norm_ratio
    "foreign_component": "PERMISSION_DENIED",
    # size and load
    "oversize": "RESOURCE_EXHAUSTED",
    "busy": "RESOURCE_EXHAUSTED",
    "too_many_calls": "RESOURCE_EXHAUSTED",  # the silo's own limit of calls in progress (limits.*_per_silo)
    # the server failed (not the request)
    "internal": "INTERNAL",
    # gRPC's own failures, as the agent names them
    "unavailable": "UNAVAILABLE",
    "deadline_exceeded": "DEADLINE_EXCEEDED",
    "cancelled": "CANCELLED",
    "aborted": "ABORTED",
    "unknown": "UNKNOWN",
    "unimplemented": "UNIMPLEMENTED",
    # streams the server cut (limits.stream_idle_s, stream_max_s): the peer sees DEADLINE_EXCEEDED
    "stream_idle": "DEADLINE_EXCEEDED",
    "stream_too_long": "DEADLINE_EXCEEDED",
}

#: The server moved on or already has it: nothing is wrong with what was sent (the agent waits for its next turn).
MOVED_ON = frozenset({"stale_round", "future_round", "not_selected", "duplicate"})
#: The caller's identity was refused: retrying with the same certificate will not help.
IDENTITY = frozenset(
    {"no_certificate", "bad_certificate", "not_provisioned", "unknown_certificate", "retired_certificate", "revoked"}
)
#: Retrying later may succeed.
TRANSIENT = frozenset(
    {
        "busy",
        "too_many_calls",
        "internal",
        "unavailable",
        "deadline_exceeded",
        "cancelled",
        "aborted",
        "unknown",
        "stream_idle",
        "stream_too_long",
    }
)

REASON_METADATA_KEY = "tap-reason"  # trailing metadata of a refused call: the reason


def status_name(reason: str) -> str:
    """The gRPC status (its name) that refusals with ``reason`` travel as."""
    return REASON_STATUS[reason]


def reason_for_status(status: str) -> str:
    """The reason assumed for a gRPC status that came without one: the first listed with that status."""
    return next((r for r, s in REASON_STATUS.items() if s == status), "unknown")


class Rejected(TapError):
    """A request refused, for ``reason`` (a key of :data:`REASON_STATUS`, also the Prometheus ``reason`` label)."""

    def __init__(self, reason: str, message: str):
        if reason not in REASON_STATUS:
            raise ValueError(f"unknown refusal reason {reason!r}: add it to tap_core.errors.REASON_STATUS")
        self.reason = reason
        super().__init__(message)

    @property
    def status(self) -> str:
        return REASON_STATUS[self.reason]


class WireError(Rejected):
    """A message or tensor stream breaks the wire contract."""


class TrainingDiverged(TapError):
    """A loss became NaN or infinite during local training."""
