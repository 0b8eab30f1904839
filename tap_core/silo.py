"""One silo's learning side: its data, models and algorithm state (no network, no disk).

The deployed agent (tap_client) wraps a :class:`SiloRuntime` with a gRPC
connection and an on-disk store; ``tap simulate`` drives several directly.
Both therefore run the very same training code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tap_core.config import FederationConfig, SiloSpec
from tap_core.data.types import TaskData
from tap_core.labels import allowed_outputs, silo_label_subsets
from tap_core.messages import ReplacementEvent, SiloDeclaration, TaskResult
from tap_core.model.backbone import backbone_on
from tap_core.model.tap_model import ComponentValues, ModelPlan, TapModel
from tap_core.plan import component_weights
from tap_core.seeding import derive_seed
from tap_core.training.baselines import trivial_score
from tap_core.training.batches import TaskTensors, load_tokenizer, to_tensors
from tap_core.training.metrics import PRIMARY
from tap_core.training.trainer import Distillation, LrSchedule, PhaseResult, Trainer, autocast_dtype, warmup_schedule

log = logging.getLogger(__name__)

STAGE1_PHASES = ("global", "personal")  # training phases of the federated rounds (counted in SiloState.steps)


@dataclass
class SiloState:
    """What a silo must remember between rounds (persisted by the agent as JSON)."""

    personal_losses: dict[str, float] = field(default_factory=dict)  # L_p[t]; missing = +inf
    replacements: dict[str, int] = field(default_factory=dict)
    events: list[ReplacementEvent] = field(default_factory=list)
    rounds_done: list[int] = field(default_factory=list)
    steps: dict[str, int] = field(default_factory=dict)  # stage-1 optimizer steps per model: "global", "personal"

    def personal_loss(self, task: str) -> float:
        return self.personal_losses.get(task, math.inf)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["events"] = [e.to_json() for e in self.events]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SiloState":
        return cls(
            personal_losses={k: float(v) for k, v in data.get("personal_losses", {}).items()},
            replacements={k: int(v) for k, v in data.get("replacements", {}).items()},
            events=[ReplacementEvent.from_json(e) for e in data.get("events", [])],
            rounds_done=[int(r) for r in data.get("rounds_done", [])],
            steps={k: int(v) for k, v in data.get("steps", {}).items()},
        )


def frozen_dtype(device: torch.device, amp: bool, amp_dtype: str = "auto") -> torch.dtype | None:
    """Frozen weights in the autocast dtype under CUDA mixed precision; unchanged (fp32) elsewhere."""
    return autocast_dtype(device, amp, amp_dtype)


class SiloRuntime:
    def __init__(self, silo: SiloSpec, data: dict[str, TaskData], config: FederationConfig, device: torch.device):
        self.silo = silo
        self.data = data
        self.config = config
        self.device = device
        self.backbone = backbone_on(
            config.model, device, frozen_dtype(device, config.train.amp, config.train.amp_dtype)
        )
        self.trainer = Trainer(config.train, device)
        self.state = SiloState()
        self.plan: ModelPlan | None = None
        self.tensors: dict[str, TaskTensors] = {}
        self.own_labels: dict[str, tuple[str, ...]] = {}  # classification task -> the labels this silo predicts among
        self.allowed_labels: dict[str, torch.Tensor] = {}  # ... as a mask over the federation's head
        self._baselines: dict[str, float] = {}
        self._global: TapModel | None = None
        self._personal: TapModel | None = None
        self.end_id = load_tokenizer(config.model.tokenizer).sep_token_id

    @property
    def id(self) -> str:
        return self.silo.id

    # -- joining --------------------------------------------------------------

    def declaration(self) -> SiloDeclaration:
        return SiloDeclaration(
            silo=self.id,
            tasks=tuple(dataclasses.replace(t, data={}) for t in self.silo.tasks),
            train_samples={t.name: len(self.data[t.name].train) for t in self.silo.tasks},
            labels_seen={t.name: self.data[t.name].label_set for t in self.silo.tasks if t.kind == "classification"},
            fingerprint=self.backbone.fingerprint,
            device=str(self.device),
        )

    def set_plan(self, plan: ModelPlan) -> None:
        """Adopt the federation's plan (label spaces) and tokenise the data accordingly."""
        if self.plan == plan:
            return
        self.plan = plan
        self.tensors = {
            task.name: to_tensors(task, self.data[task.name], self.config.model, f"silo {self.id} task {task.name}")
            for task in plan.tasks
        }
        self.own_labels = silo_label_subsets(self.silo.tasks, self.data, plan.tasks)
        self.allowed_labels = {
            task.name: allowed_outputs(task.labels or (), self.own_labels[task.name])
            for task in plan.tasks
            if task.kind == "classification"
        }
        self._baselines = {}
        self._global = self._personal = None

    # -- models ---------------------------------------------------------------

    def new_model(self) -> TapModel:
        assert self.plan is not None, "set_plan first"
        return TapModel(self.plan, self.backbone, self.config.seed)

    def global_model(self, values: ComponentValues) -> TapModel:
        """The silo's global copy, loaded with the server's values (one instance, reused)."""
        if self._global is None:
            self._global = self.new_model()
        self._global.load_values(values)
        return self._global

    @property
    def has_personal(self) -> bool:
        return self._personal is not None

    @property
    def personal(self) -> TapModel:
        if self._personal is None:
            self._personal = self.new_model()
        return self._personal

    def fresh_copy(self, values: ComponentValues) -> TapModel:
        """A new model (not the cached global copy) holding ``values``: KD teacher, fine-tuning."""
        model = self.new_model()
        model.load_values(values)
        return model

    # -- training primitives ----------------------------------------------------

    def schedule(self, round_index: int) -> LrSchedule:
        return warmup_schedule(self.config.train, (round_index - 1) * self.config.train.local_steps)

    def train(
        self,
        model: TapModel,
        phase: str,
        round_index: int,
        steps: int | None = None,
        schedule: LrSchedule | None = None,
        distill: Distillation | None = None,
        salt: str = "",
    ) -> PhaseResult:
        steps = self.config.train.local_steps if steps is None else steps
        seed = derive_seed(self.config.seed, "train", self.id, round_index, phase, salt)
        result = self.trainer.train(model, self.tensors, steps, seed, schedule or self.schedule(round_index), distill)
        if phase in STAGE1_PHASES:
            self.state.steps[phase] = self.state.steps.get(phase, 0) + steps
        when = f"round {round_index}" if round_index <= self.config.rounds else "stage 2"
        log.info(
            "silo %s %s %s: %d steps in %.1fs, loss %s",
            self.id,
            when,
            phase,
            steps,
            result.seconds,
            {k: round(v, 4) for k, v in result.losses.items()},
        )
        return result

    def val_losses(self, model: TapModel, fallback: dict[str, float]) -> dict[str, float]:
        """Loss per task on its validation slice; ``fallback`` (the training loss) where a task has none."""
        return {
            name: self.trainer.eval_loss(model, tensors, "val") if len(tensors.val) else fallback[name]
            for name, tensors in self.tensors.items()
        }

    def evaluate(self, model: TapModel, steps: int = 0) -> list[TaskResult]:
        """Every task's test metrics (classification among the silo's own labels), its trivial baseline,
        and ``steps``: the optimizer steps the evaluated model received (reported beside the score)."""
        results = []
        for name, tensors in self.tensors.items():
            metrics = self.trainer.evaluate(model, tensors, self.end_id, allowed=self.allowed_labels.get(name))
            kind = tensors.task.kind
            results.append(
                TaskResult(
                    self.id,
                    name,
                    kind,
                    metrics,
                    metrics[PRIMARY[kind]],
                    steps=steps,
                    baseline=self.baseline(name),
                    test_examples=len(tensors.test),
                )
            )
        return results

    def round_scores(self, model: TapModel) -> dict[str, float]:
        """Test primary score per task when ``train.eval_every_round`` is on (learning curves), else nothing."""
        if not self.config.train.eval_every_round:
            return {}
        return {result.task: result.primary for result in self.evaluate(model)}

    def baseline(self, task_name: str) -> float:
        """The primary score of the task's trivial predictor on the test split (computed once)."""
        if task_name not in self._baselines:
            self._baselines[task_name] = trivial_score(self.tensors[task_name], self.end_id)
        return self._baselines[task_name]

    def stage1_steps(self, model_role: str) -> int:
        """Optimizer steps the ``"global"`` copy or the ``"personal"`` model took in the rounds so far."""
        return self.state.steps.get(model_role, 0)

    def component_weights(self, components: list[str]) -> dict[str, float]:
        """Per component: the training samples of this silo's tasks that use it (aggregation weight)."""
        assert self.plan is not None
        return component_weights(self.plan, {name: len(t.train) for name, t in self.tensors.items()}, components)
