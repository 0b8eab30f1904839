"""The plain objects that cross the seam between :class:`~tap_server.federation.Federation` and its callers.

The servicer, the daemon and ``tap simulate`` hand these in and get these back;
none of them reads an attribute of the federation. Each is built under the
federation's lock and is a snapshot: changing the federation later does not
change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tap_core.layout import Layout
from tap_core.model.tap_model import ComponentValues, ModelPlan

WAITING, TRAINING, FINISHING, DONE = "waiting_for_silos", "training", "finishing", "done"  # the phases, in order


@dataclass(frozen=True)
class Assignment:
    """What a silo should do now, with what it needs to do it."""

    action: str  # wait | train | finish | done
    round: int = 0
    retry_after_s: float = 1.0
    message: str = ""
    plan: ModelPlan | None = None  # the silo's part of the model, once the federation's plan is fixed
    layout: Layout = field(default_factory=dict)  # its travelling components (TRAIN and FINISH only)


@dataclass(frozen=True)
class Registration:
    """The answer to a join."""

    silo: str
    registered: int  # silos registered so far
    started: bool  # the federation's plan is fixed (this join may have started it)


@dataclass(frozen=True)
class UploadSlot:
    """An upload the federation will take: round ``round`` carrying exactly ``layout``."""

    round: int
    layout: Layout
    known: frozenset[str]  # every component of the federation: tells a foreign component from an unknown name


@dataclass(frozen=True)
class Payload:
    """Global values a silo downloads: for a round (``down``) or the final model (``final``)."""

    round: int
    direction: str  # "down" | "final"
    values: ComponentValues
    layout: Layout


@dataclass(frozen=True)
class Transfer:
    """One tensor stream as it went over the wire (what the report's transport section and the metrics count)."""

    silo: str
    round: int
    direction: str  # "down" | "final" | "up"
    payload_bytes: int  # tensor bytes
    wire_bytes: int  # the frames as gRPC messages: tensors + framing
    seconds: float
    layout: Layout  # the components it carried


@dataclass(frozen=True)
class Status:
    """Where the federation stands."""

    federation_id: str
    phase: str
    round: int
    rounds: int
    joined: tuple[str, ...]
    selected: tuple[str, ...]  # the current round's silos (empty outside training)
    received: tuple[str, ...]  # silos whose update of the current round was accepted
    results: tuple[str, ...]  # silos that reported their stage-2 results
    told_done: frozenset[str]  # silos that were told the federation is done
    connected: int  # joined silos heard from within three heartbeat intervals

    @property
    def everyone_told_done(self) -> bool:
        return self.phase == DONE and self.told_done >= set(self.joined)
