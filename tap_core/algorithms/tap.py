"""TAP (TAP_SPEC §3-4): adaptive replacement in stage 1, distillation in stage 2."""

from __future__ import annotations

import logging
import math

from tap_core.algorithms.base import Algorithm, FinalModel
from tap_core.config import kd_weight_for, margin_for
from tap_core.messages import ClientUpdate, ReplacementEvent, RoundStats
from tap_core.model.tap_model import ComponentValues, TapModel
from tap_core.silo import SiloRuntime
from tap_core.training.trainer import Distillation

log = logging.getLogger(__name__)


class Tap(Algorithm):
    name = "tap"
    distil = True

    def local_round(self, silo: SiloRuntime, round_index: int, global_values: ComponentValues) -> ClientUpdate:
        cfg = self.config.train
        # 1. train the global copy
        global_copy = silo.global_model(global_values)
        trained = silo.train(global_copy, "global", round_index)
        by_validation = cfg.replacement == "validation"
        global_losses = silo.val_losses(global_copy, trained.losses) if by_validation else trained.losses
        # 2. adaptive replacement, task by task
        events = self.replace(silo, round_index, global_copy, global_losses)
        # 3. personal training (a different data order when something was just replaced)
        salt = "replaced:" + ",".join(e.task for e in events)
        personal = silo.train(silo.personal, "personal", round_index, salt=salt)
        personal_losses = silo.val_losses(silo.personal, personal.losses) if by_validation else personal.losses
        silo.state.personal_losses.update(personal_losses)
        stats = RoundStats(
            task_losses=trained.losses,
            personal_losses=personal_losses,
            replacements=events,
            train_seconds=trained.seconds + personal.seconds,
            samples_seen=trained.samples + personal.samples,
            scores=silo.round_scores(silo.personal),
            scores_round=round_index,
        )
        # 4. upload the trained global copy (never the personal model)
        return self.make_update(silo, round_index, global_copy, stats)

    def replace(
        self, silo: SiloRuntime, round_index: int, global_copy: TapModel, global_losses: dict[str, float]
    ) -> list[ReplacementEvent]:
        """Copy task t's components into the personal model where L_g[t] + margin_t < L_p[t]."""
        events = []
        for task in silo.plan.tasks:
            margin = margin_for(task, self.config.train)
            personal_loss = silo.state.personal_loss(task.name)
            if global_losses[task.name] + margin < personal_loss:
                event = ReplacementEvent(
                    round_index,
                    task.name,
                    global_losses[task.name],
                    personal_loss,
                    margin,
                    silo.plan.task_components(task.name),
                )
                events.append(event)
                silo.state.replacements[task.name] = silo.state.replacements.get(task.name, 0) + 1
                log.info(
                    "silo %s round %d: task %s adopts the global components (L_g %.4f + %.4f < L_p %.4f)",
                    silo.id,
                    round_index,
                    task.name,
                    event.global_loss,
                    margin,
                    personal_loss,
                )
        # one copy of every adopted component, however many winning tasks share it
        silo.personal.copy_from(global_copy, sorted({c for e in events for c in e.components}))
        silo.state.events.extend(events)
        return events

    def adopt_uncompared(self, silo: SiloRuntime, final_values: ComponentValues) -> None:
        """Tasks never compared (the silo was never selected) adopt the final global components.

        That is the replacement rule's answer for L_p = +inf; without it such a silo would
        end with its randomly initialised personal model.
        """
        tasks = [t.name for t in silo.plan.tasks if math.isinf(silo.state.personal_loss(t.name))]
        if tasks:
            components = sorted({c for t in tasks for c in silo.plan.task_components(t)})
            silo.personal.load_values({c: final_values[c] for c in components})
            log.info(
                "silo %s: tasks %s were never compared; they start stage 2 from the final global model",
                silo.id,
                ", ".join(tasks),
            )

    def final_model(self, silo: SiloRuntime, final_values: ComponentValues) -> FinalModel:
        """Stage 2: the personal model trained ``kd_steps`` more, distilling the fine-tuned global model."""
        self.adopt_uncompared(silo, final_values)
        student = silo.personal
        stage1 = {r.task: r.metrics for r in silo.evaluate(student)}
        distill = self.teacher(silo, final_values) if self.distil else None
        steps = self.config.train.kd_steps
        result = self.finetune(silo, student, steps, phase="stage2", distill=distill)
        return FinalModel(
            student, steps=silo.stage1_steps("personal") + steps, kd_losses=result.kd_losses, stage1_metrics=stage1
        )

    def teacher(self, silo: SiloRuntime, final_values: ComponentValues) -> Distillation:
        """The final global model fine-tuned locally for ``ft_steps``, with the KD weight of every task."""
        model, _ = self.finetuned_global(silo, final_values)
        weights = {task.name: kd_weight_for(task, self.config.train) for task in silo.plan.tasks}
        return Distillation(model, weights, self.config.train.kd_temperature)


class TapNoKD(Tap):
    """The paper's no-distillation ablation: stage 2 spends the same ``kd_steps`` on the task loss alone."""

    name = "tap-nokd"
    distil = False
