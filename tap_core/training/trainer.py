"""Local training, evaluation and distillation: the one trainer every algorithm shares."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from tap_core.config import TrainConfig
from tap_core.errors import ConfigError, TrainingDiverged
from tap_core.labels import mask_logits
from tap_core.model.tap_model import TapModel
from tap_core.seeding import derive_seed, torch_seed
from tap_core.training.batches import TaskTensors, ordered_batches, sample_batches
from tap_core.training.losses import kd_loss, task_loss
from tap_core.training.metrics import metrics_for

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} requested but no CUDA device is available", "use --device auto or cpu")
    return torch.device(name)


@dataclass
class PhaseResult:
    """What one training phase did: mean loss per task over its steps, and its cost."""

    losses: dict[str, float]
    steps: int
    samples: int
    seconds: float
    kd_losses: dict[str, float] = field(default_factory=dict)


@dataclass
class Distillation:
    """Stage 2: a frozen teacher and the KD weight per task."""

    teacher: TapModel
    weights: Mapping[str, float]
    temperature: float


LrSchedule = Callable[[int], float]


def warmup_schedule(cfg: TrainConfig, first_step: int) -> LrSchedule:
    """Linear warm-up from min_lr to peak_lr over the first ``warmup_rounds`` rounds of steps.

    ``first_step`` is how many local steps this model took in earlier rounds.
    """
    warmup_steps = cfg.warmup_rounds * cfg.local_steps

    def lr(step: int) -> float:
        done = first_step + step + 1
        if warmup_steps == 0 or done >= warmup_steps:
            return cfg.peak_lr
        return cfg.min_lr + (cfg.peak_lr - cfg.min_lr) * done / warmup_steps

    return lr


def constant_schedule(value: float) -> LrSchedule:
    return lambda step: value


class Trainer:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.autocast_enabled = device.type == "cuda" and cfg.amp

    def autocast(self):
        if self.autocast_enabled:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(
        self,
        model: TapModel,
        tasks: Mapping[str, TaskTensors],
        steps: int,
        seed: int,
        schedule: LrSchedule,
        distill: Distillation | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> PhaseResult:
        """``steps`` optimiser steps; each step sees ``grad_accum`` batches of every task."""
        cfg = self.cfg
        start = time.perf_counter()
        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=schedule(0), weight_decay=cfg.weight_decay)
        streams = {
            name: sample_batches(t.train, cfg.batch_size, derive_seed(seed, "batches", name)) for name, t in tasks.items()
        }
        # running sums stay on the device: no host sync per micro-step
        sums = {name: torch.zeros((), device=self.device) for name in tasks}
        kd_sums = {name: torch.zeros((), device=self.device) for name in tasks}
        samples = 0
        model.train()
        if distill is not None:
            distill.teacher.eval()
        with torch_seed(derive_seed(seed, "dropout")):
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = schedule(step)
                for _ in range(cfg.grad_accum):
                    for name, tensors in tasks.items():
                        batch = next(streams[name]).to(self.device)
                        samples += len(batch)
                        with self.autocast():
                            output = model(name, batch, targets_only=True)
                            loss = task_loss(tensors.task.kind, output, batch)
                            total = loss
                            if distill is not None:
                                with torch.no_grad():
                                    teacher_out = distill.teacher(name, batch, targets_only=True)
                                kd = kd_loss(tensors.task.kind, teacher_out, output, batch, distill.temperature)
                                total = loss + distill.weights[name] * kd
                                kd_sums[name] += kd.detach()
                        (total / cfg.grad_accum).backward()
                        sums[name] += loss.detach()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if progress is not None:
                    progress(step + 1, steps)
        model.eval()
        count = max(steps * cfg.grad_accum, 1)
        losses = {n: float(s) / count for n, s in sums.items()}
        bad = [n for n, v in losses.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"task {bad[0]}: the training loss became {losses[bad[0]]}; lower peak_lr or grad_clip")
        return PhaseResult(
            losses=losses,
            steps=steps,
            samples=samples,
            seconds=time.perf_counter() - start,
            kd_losses={n: float(s) / count for n, s in kd_sums.items()} if distill is not None else {},
        )

    @torch.no_grad()
    def eval_loss(self, model: TapModel, tensors: TaskTensors, split: str = "val") -> float:
        """Mean task loss on a split (at most ``max_val_examples`` examples of the val split)."""
        data = getattr(tensors, split)
        limit = self.cfg.max_val_examples if split == "val" else None
        if len(data) == 0:
            return math.inf
        model.eval()
        total, count = 0.0, 0
        for batch in ordered_batches(data, self.cfg.eval_batch_size, limit):
            batch = batch.to(self.device)
            with self.autocast():
                output = model(tensors.task.name, batch, targets_only=True)
            total += float(task_loss(tensors.task.kind, output, batch)) * len(batch)
            count += len(batch)
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, model: TapModel, tensors: TaskTensors, end_id: int, split: str = "test",
                 allowed: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics on a split; ``allowed``: a mask of the head outputs classification chooses among."""
        model.eval()
        metric = metrics_for(tensors.task.kind, end_id)
        for batch in ordered_batches(getattr(tensors, split), self.cfg.eval_batch_size):
            batch = batch.to(self.device)
            with self.autocast():
                output = model(tensors.task.name, batch)
            output = output.float()
            metric.update(output if allowed is None else mask_logits(output, allowed), batch)
        return metric.result()
