"""Local-only training: the same step budget as fedavg-ft, no communication."""

from __future__ import annotations

from tap_core.algorithms.base import Algorithm, FinalModel
from tap_core.messages import ClientUpdate, RoundStats
from tap_core.model.tap_model import ComponentValues
from tap_core.silo import SiloRuntime


class LocalOnly(Algorithm):
    name = "local"
    federated = False

    def local_round(self, silo: SiloRuntime, round_index: int, global_values: ComponentValues) -> ClientUpdate:
        result = silo.train(silo.personal, "personal", round_index)
        silo.state.personal_losses.update(result.losses)
        stats = RoundStats(
            task_losses=result.losses,
            personal_losses=result.losses,
            train_seconds=result.seconds,
            samples_seen=result.samples,
            scores=silo.round_scores(silo.personal),
            scores_round=round_index,
        )
        return self.make_update(silo, round_index, silo.personal, stats)

    def final_model(self, silo: SiloRuntime, final_values: ComponentValues) -> FinalModel:
        # the ft_steps that fedavg-ft spends fine-tuning, spent on more local training
        self.finetune(silo, silo.personal, self.config.train.ft_steps)
        return FinalModel(silo.personal, steps=silo.stage1_steps("personal") + self.config.train.ft_steps)
