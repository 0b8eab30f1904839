"""The exported model's directory: ``model.json`` (the card), ``model.safetensors``, ``tokenizer/``.

Written by ``tap-client export`` (tap_client/export.py), read by
:func:`tap_core.inference.load_model`. JSON and safetensors only, no pickle.
The card says what the model is (a silo's tasks, label spaces, inputs), how it
was made (federation, algorithm, rounds, test metrics) and what it needs to load
(the model spec and the fingerprint of its frozen backbone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tap_core.config import ModelSpec, from_mapping, to_mapping, validate_model
from tap_core.errors import ConfigError, TapError
from tap_core.model.tap_model import ModelPlan
from tap_core.plan import plan_from_json, plan_to_json

FORMAT = "tap-model/1"
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# what BertTokenizerFast.from_pretrained reads; vocab.txt is required (the fingerprint hashes it)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
KIND_WORDS = {
    "classification": "classification",
    "text_generation": "text generation",
    "image_generation": "image generation",
}


class ExportError(TapError):
    """A model directory that cannot be written or read as an export."""


@dataclass(frozen=True)
class ExportedTask:
    """One task of the exported model, as a person using it needs to know it."""

    name: str
    kind: str
    modalities: tuple[str, ...]
    labels: tuple[str, ...] | None = None  # classification: the head's outputs, in order (the federation's labels)
    silo_labels: tuple[str, ...] | None = None  # classification: the ones this silo predicts among
    inputs: dict[str, str] = field(default_factory=dict)  # role (texts / images) -> column it was trained from
    metrics: dict[str, float] = field(default_factory=dict)  # on the silo's test split, from results.json

    def describe(self) -> str:
        what = f"{self.name}: {KIND_WORDS.get(self.kind, self.kind)} from {' + '.join(self.modalities)}"
        if self.silo_labels is not None:
            what += f" among {len(self.silo_labels)} labels"
        return what


@dataclass(frozen=True)
class ModelCard:
    silo: str
    federation: str
    federation_id: str
    algorithm: str
    rounds: int
    seed: int
    model: ModelSpec  # the frozen backbone and trainable pieces; ``tokenizer`` is rewritten on load
    fingerprint: str  # of the frozen backbone the values were trained on
    plan: ModelPlan
    tasks: dict[str, ExportedTask]
    batch_size: int = 64  # evaluation's batch size: predictions in the same batches reproduce its numbers
    threads: int = 1
    amp: bool = True
    exported: dict[str, Any] = field(default_factory=dict)  # when, by what, from where

    def task(self, name: str) -> ExportedTask:
        if name not in self.tasks:
            raise ExportError(
                f"this model has no task {name!r}; it has {', '.join(sorted(self.tasks))} "
                "(fix: pass one of them as the task)"
            )
        return self.tasks[name]

    def describe(self) -> str:
        return (
            f"The {self.algorithm} model of silo {self.silo} after {self.rounds} rounds of federation "
            f"{self.federation}: " + "; ".join(t.describe() for t in self.tasks.values()) + "."
        )

    def to_json(self) -> dict[str, Any]:
        example = next(iter(self.tasks))
        return {
            "format": FORMAT,
            "description": self.describe(),
            "silo": self.silo,
            "federation": {
                "name": self.federation,
                "id": self.federation_id,
                "algorithm": self.algorithm,
                "rounds": self.rounds,
                "seed": self.seed,
            },
            "exported": self.exported,
            "base_model": {"spec": to_mapping(self.model), "fingerprint": self.fingerprint},
            "plan": plan_to_json(self.plan),
            "tasks": {
                name: {
                    "kind": t.kind,
                    "modalities": list(t.modalities),
                    "labels": None if t.labels is None else list(t.labels),
                    "silo_labels": None if t.silo_labels is None else list(t.silo_labels),
                    "inputs": t.inputs,
                    "test_metrics": t.metrics,
                }
                for name, t in self.tasks.items()
            },
            "evaluation": {"batch_size": self.batch_size, "threads": self.threads, "amp": self.amp},
            "files": {"weights": WEIGHTS, "tokenizer": TOKENIZER_DIR + "/"},
            "usage": [
                f"tap-client predict --model MODEL_DIR --task {example} --input FILE --output predictions.jsonl",
                f"from tap_core import load_model; load_model('MODEL_DIR').predict(task='{example}', ...)",
                "needs the tap-federation package and the same frozen backbone (checked against the fingerprint)",
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "ModelCard":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ExportError(
                f"{where} is not a TAP model export (format {found!r}, expected {FORMAT!r}) "
                "(fix: make one with tap-client export --state DIR --out MODEL_DIR)"
            )
        try:
            federation, base, evaluation = data["federation"], data["base_model"], data["evaluation"]
            model = from_mapping(ModelSpec, base["spec"], f"{where} base_model.spec")
            validate_model(model, f"{where} base_model.spec")
            tasks = {
                str(name): ExportedTask(
                    name=str(name),
                    kind=str(t["kind"]),
                    modalities=tuple(t["modalities"]),
                    labels=None if t.get("labels") is None else tuple(t["labels"]),
                    silo_labels=None if t.get("silo_labels") is None else tuple(t["silo_labels"]),
                    inputs={str(k): str(v) for k, v in (t.get("inputs") or {}).items()},
                    metrics={str(k): float(v) for k, v in (t.get("test_metrics") or {}).items()},
                )
                for name, t in data["tasks"].items()
            }
            return cls(
                silo=str(data["silo"]),
                federation=str(federation["name"]),
                federation_id=str(federation["id"]),
                algorithm=str(federation["algorithm"]),
                rounds=int(federation["rounds"]),
                seed=int(federation["seed"]),
                model=model,
                fingerprint=str(base["fingerprint"]),
                plan=plan_from_json(data["plan"]),
                tasks=tasks,
                batch_size=int(evaluation["batch_size"]),
                threads=int(evaluation["threads"]),
                amp=bool(evaluation["amp"]),
                exported=dict(data.get("exported") or {}),
            )
        except ConfigError as exc:
            raise ExportError(f"{where}: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExportError(
                f"{where} is damaged or incomplete ({type(exc).__name__}: {exc}) "
                "(fix: export the model again with tap-client export)"
            ) from exc


def read_card(model_dir: Path) -> ModelCard:
    """The card of an exported model directory, validated."""
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise ExportError(
            f"{model_dir} has no {MODEL_JSON}: it is not an exported TAP model "
            "(fix: make one with tap-client export --state DIR --out MODEL_DIR)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    card = ModelCard.from_json(data, str(path))
    if set(card.tasks) != {t.name for t in card.plan.tasks}:
        raise ExportError(
            f"{path}: its tasks {sorted(card.tasks)} differ from its plan's "
            f"{sorted(t.name for t in card.plan.tasks)} (fix: export the model again)"
        )
    return card
