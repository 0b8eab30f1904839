"""FedAvg and FedAvg + local fine-tuning: the silo ends with the (fine-tuned) global model."""

from __future__ import annotations

from tap_core.algorithms.base import Algorithm, FinalModel
from tap_core.messages import ClientUpdate, RoundStats
from tap_core.model.tap_model import ComponentValues
from tap_core.silo import SiloRuntime


class FedAvg(Algorithm):
    name = "fedavg"

    def local_round(self, silo: SiloRuntime, round_index: int, global_values: ComponentValues) -> ClientUpdate:
        model = silo.global_model(global_values)
        scores = silo.round_scores(model)  # the global model after round_index - 1 rounds
        result = silo.train(model, "global", round_index)
        stats = RoundStats(
            task_losses=result.losses,
            train_seconds=result.seconds,
            samples_seen=result.samples,
            scores=scores,
            scores_round=round_index - 1,
        )
        return self.make_update(silo, round_index, model, stats)

    def final_model(self, silo: SiloRuntime, final_values: ComponentValues) -> FinalModel:
        # no stage 2 by definition: rounds x E local steps on the global copy
        return FinalModel(silo.fresh_copy(final_values), steps=silo.stage1_steps("global"))


class FedAvgFineTune(FedAvg):
    name = "fedavg-ft"

    def final_model(self, silo: SiloRuntime, final_values: ComponentValues) -> FinalModel:
        model, _ = self.finetuned_global(silo, final_values)
        return FinalModel(model, steps=silo.stage1_steps("global") + self.config.train.ft_steps)
