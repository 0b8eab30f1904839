"""The algorithm interface: what a silo does in a round and what model it ends with.

An algorithm is a small class over the shared :class:`SiloRuntime` primitives
(train, evaluate, copy components). Adding a method (Ditto, FedPer ...) is one
new file with one class, registered in ``tap_core.algorithms``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from tap_core.config import FederationConfig
from tap_core.messages import ClientUpdate, RoundStats, SiloResult
from tap_core.model.tap_model import ComponentValues, ModelPlan, TapModel
from tap_core.silo import SiloRuntime
from tap_core.training.trainer import Distillation, LrSchedule, PhaseResult, constant_schedule


@dataclass
class FinalModel:
    """The model a silo ends with, and the optimizer steps it received on the silo (stage 1 + stage 2)."""

    model: TapModel
    steps: int
    kd_losses: dict[str, float] = field(default_factory=dict)
    stage1_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


class Algorithm(ABC):
    name: ClassVar[str]
    #: False: the server runs rounds for orchestration but no component travels.
    federated: ClassVar[bool] = True

    def __init__(self, config: FederationConfig):
        self.config = config

    @classmethod
    def shared_components(cls, plan: ModelPlan) -> list[str]:
        """Components that travel between a silo holding ``plan`` and the server."""
        return plan.components if cls.federated else []

    @abstractmethod
    def local_round(self, silo: SiloRuntime, round_index: int, global_values: ComponentValues) -> ClientUpdate:
        """Train for one round given the server's values of the silo's shared components."""

    @abstractmethod
    def final_model(self, silo: SiloRuntime, final_values: ComponentValues) -> FinalModel:
        """Stage 2: the model the silo ends with, from the final global values."""

    def finish(self, silo: SiloRuntime, final_values: ComponentValues) -> tuple[SiloResult, TapModel]:
        """Stage 2 and evaluation: the silo's numbers (for the server) and its final model (kept locally)."""
        final = self.final_model(silo, final_values)
        result = SiloResult(
            silo=silo.id,
            tasks=silo.evaluate(final.model, steps=final.steps),
            kd_losses=final.kd_losses,
            stage1_metrics=final.stage1_metrics,
        )
        return result, final.model

    # helpers shared by the implementations

    def make_update(self, silo: SiloRuntime, round_index: int, model: TapModel, stats: RoundStats) -> ClientUpdate:
        """The update of ``model``'s shared components (the caller sends it and records the round as done)."""
        assert silo.plan is not None, "set_plan first"
        shared = self.shared_components(silo.plan)
        return ClientUpdate(silo.id, round_index, model.values(shared), silo.component_weights(shared), stats)

    def finetuned_global(self, silo: SiloRuntime, final_values: ComponentValues) -> tuple[TapModel, PhaseResult]:
        """The final global model fine-tuned locally for ``ft_steps`` (fedavg-ft's model, TAP's teacher)."""
        model = silo.fresh_copy(final_values)
        result = self.finetune(silo, model, self.config.train.ft_steps)
        return model, result

    def finetune(
        self,
        silo: SiloRuntime,
        model: TapModel,
        steps: int,
        phase: str = "finetune",
        distill: Distillation | None = None,
    ) -> PhaseResult:
        """Stage 2 training of ``model`` on the task loss (plus the KD term when ``distill`` is given)."""
        return silo.train(
            model, phase, self.config.rounds + 1, steps=steps, schedule=stage2_schedule(self.config), distill=distill
        )


def stage2_schedule(config: FederationConfig) -> LrSchedule:
    """Stage 2 (fine-tuning, distillation) runs at a constant peak_lr."""
    return constant_schedule(config.train.peak_lr)
