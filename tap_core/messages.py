"""Plain messages between the federation logic and the silos (no gRPC in here).

The deployed system converts these to and from protobuf + tensor streams
(tap_core.wire); ``tap simulate`` passes them directly. Everything JSON-able
has ``to_json``/``from_json`` so it can also be persisted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tap_core.config import TaskSpec, from_mapping, to_mapping
from tap_core.model.tap_model import ComponentValues

NOT_JOINED = "not joined"  # the 'wait' message for a silo the server does not know (it must join again)


@dataclass
class SiloDeclaration:
    """What a silo states when it joins: its tasks (without data), sample counts, base fingerprint."""

    silo: str
    tasks: tuple[TaskSpec, ...]
    train_samples: dict[str, int]  # task -> training examples
    labels_seen: dict[str, list[str]]  # classification task -> labels present in the silo's data
    fingerprint: str
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return {
            "silo": self.silo,
            "tasks": [to_mapping(t) for t in self.tasks],
            "train_samples": dict(self.train_samples),
            "labels_seen": {k: list(v) for k, v in self.labels_seen.items()},
            "fingerprint": self.fingerprint,
            "device": self.device,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SiloDeclaration":
        tasks = tuple(from_mapping(TaskSpec, t, f"tasks[{i}]") for i, t in enumerate(data["tasks"]))
        return cls(
            silo=str(data["silo"]),
            tasks=tasks,
            train_samples={str(k): int(v) for k, v in data["train_samples"].items()},
            labels_seen={str(k): [str(x) for x in v] for k, v in data.get("labels_seen", {}).items()},
            fingerprint=str(data["fingerprint"]),
            device=str(data.get("device", "cpu")),
        )


@dataclass
class ReplacementEvent:
    """Task ``task`` of a silo adopted the global components in ``round`` (TAP_SPEC §3.3)."""

    round: int
    task: str
    global_loss: float
    personal_loss: float  # inf on first participation
    margin: float
    components: list[str]

    def to_json(self) -> dict[str, Any]:
        """JSON has no infinity: the first participation's +inf personal loss is written as null."""
        data = asdict(self)
        data["personal_loss"] = None if not math.isfinite(self.personal_loss) else self.personal_loss
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ReplacementEvent":
        loss = data.get("personal_loss")
        return cls(
            round=int(data["round"]),
            task=str(data["task"]),
            global_loss=float(data["global_loss"]),
            personal_loss=math.inf if loss is None else float(loss),
            margin=float(data["margin"]),
            components=[str(c) for c in data["components"]],
        )


@dataclass
class RoundStats:
    """Numbers a silo reports with its update: the global copy's losses and what it cost."""

    task_losses: dict[str, float] = field(default_factory=dict)  # L_g[t]
    personal_losses: dict[str, float] = field(default_factory=dict)  # L_p[t] after personal training
    replacements: list[ReplacementEvent] = field(default_factory=list)
    train_seconds: float = 0.0
    samples_seen: int = 0
    # train.eval_every_round: test primary score per task of the model the algorithm would end with if the
    # federation stopped now (personal model; for fedavg the global model it downloaded), after ``scores_round``
    scores: dict[str, float] = field(default_factory=dict)
    scores_round: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["replacements"] = [e.to_json() for e in self.replacements]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RoundStats":
        return cls(
            task_losses={str(k): float(v) for k, v in data.get("task_losses", {}).items()},
            personal_losses={str(k): float(v) for k, v in data.get("personal_losses", {}).items()},
            replacements=[ReplacementEvent.from_json(e) for e in data.get("replacements", [])],
            train_seconds=float(data.get("train_seconds", 0.0)),
            samples_seen=int(data.get("samples_seen", 0)),
            scores={str(k): float(v) for k, v in data.get("scores", {}).items()},
            scores_round=int(data.get("scores_round", 0)),
        )


@dataclass
class ClientUpdate:
    """A silo's upload for one round: trained global-copy components, never the personal model."""

    silo: str
    round: int
    values: ComponentValues
    weights: dict[str, float]  # component -> local training samples of the tasks that use it
    stats: RoundStats


@dataclass
class TaskResult:
    """One task's final score on the silo's test split, beside what it cost and what it must beat."""

    silo: str
    task: str
    kind: str
    metrics: dict[str, float]
    primary: float
    steps: int = 0  # optimizer steps the task's final model received on this silo (stage 1 + stage 2)
    baseline: float | None = None  # primary score of the task's trivial predictor on the same test split
    test_examples: int = 0  # size of the test split the scores were measured on

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TaskResult":
        baseline = data.get("baseline")
        return cls(
            silo=str(data["silo"]),
            task=str(data["task"]),
            kind=str(data["kind"]),
            metrics={str(k): float(v) for k, v in data["metrics"].items()},
            primary=float(data["primary"]),
            steps=int(data.get("steps", 0)),
            baseline=None if baseline is None else float(baseline),
            test_examples=int(data.get("test_examples", 0)),
        )


@dataclass
class SiloResult:
    """Stage 2 outcome of one silo: numbers only."""

    silo: str
    tasks: list[TaskResult]
    kd_losses: dict[str, float] = field(default_factory=dict)
    stage1_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # tap: personal model before KD
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SiloResult":
        return cls(
            silo=str(data["silo"]),
            tasks=[TaskResult.from_json(t) for t in data["tasks"]],
            kd_losses={str(k): float(v) for k, v in data.get("kd_losses", {}).items()},
            stage1_metrics={
                str(k): {str(m): float(x) for m, x in v.items()} for k, v in data.get("stage1_metrics", {}).items()
            },
            seconds=float(data.get("seconds", 0.0)),
        )
