"""Local training, evaluation and distillation: the one trainer every algorithm shares."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from tap_core.config import TrainConfig
from tap_core.errors import ConfigError, TrainingDiverged
from tap_core.labels import mask_logits
from tap_core.model.tap_model import TapModel
from tap_core.seeding import derive_seed, torch_seed
from tap_core.training.batches import TaskTensors, ordered_batches, sample_indices
from tap_core.training.losses import kd_loss, task_loss
from tap_core.training.metrics import metrics_for
from tap_core.training.teacher import DEFAULT_BUDGET_BYTES, TeacherOutputs, windows

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} requested but no CUDA device is available", "use --device auto or cpu")
    return torch.device(name)


def cuda_bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this card (Ampere and later), not emulated."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation flag
            return torch.cuda.is_bf16_supported()


def autocast_dtype(
    device: torch.device, amp: bool, amp_dtype: str = "auto", bf16_supported: bool | None = None
) -> torch.dtype | None:
    """The mixed-precision dtype training uses on ``device``; None: plain fp32 (the CPU, or ``amp`` off).

    ``auto``: bf16 where the card supports it natively, else fp16 (with a gradient scaler).
    """
    if device.type != "cuda" or not amp:
        return None
    if amp_dtype == "fp16":
        return torch.float16
    supported = cuda_bf16_supported(device) if bf16_supported is None else bf16_supported
    if amp_dtype == "bf16" and not supported:
        raise ConfigError(
            "train.amp_dtype",
            f"bf16 was asked for, but {device} has no native bf16",
            "use amp_dtype: auto (fp16 with a gradient scaler) or amp: false",
        )
    return torch.bfloat16 if supported else torch.float16


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one kernel per step instead of a dozen ops per tensor."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


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
    """Trains, evaluates and distils :class:`TapModel` s on one device.

    ``precision`` overrides the mixed-precision dtype (tests use it to run the fp16 path on the CPU);
    ``compile_backend`` is torch.compile's backend when ``cfg.compile`` is on (tests use ``eager``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        precision: torch.dtype | None | str = "config",
        compile_backend: str = "inductor",
    ):
        self.cfg = cfg
        self.device = device
        self.amp_dtype = autocast_dtype(device, cfg.amp, cfg.amp_dtype) if precision == "config" else precision
        self.autocast_enabled = self.amp_dtype is not None
        self.compile_backend = compile_backend
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # compiled steps want static shapes: texts stay padded to max_text_len
        self.trim = cfg.compile == "off"

    def autocast(self):
        if self.autocast_enabled:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def forward_of(self, model: TapModel) -> Callable:
        """The model's forward: compiled (once per model) when ``cfg.compile`` asks for it."""
        if self.cfg.compile == "off":
            return model
        compiled = self._compiled.get(model)
        if compiled is None:
            # one graph per (task, train/eval, targets_only) and model: more than dynamo's default limit of 8
            import torch._dynamo.config as dynamo_config

            limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
            options = (
                {"mode": None if self.cfg.compile == "default" else self.cfg.compile}
                if self.compile_backend == "inductor"
                else {}
            )
            compiled = torch.compile(model, backend=self.compile_backend, **options)
            self._compiled[model] = compiled
        return compiled

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
        optimizer = make_optimizer(params, schedule(0), cfg.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        forward = self.forward_of(model)
        draws = {
            name: sample_indices(len(t.train), cfg.batch_size, derive_seed(seed, "batches", name))
            for name, t in tasks.items()
        }
        teachers: dict[str, TeacherOutputs] = {}
        planned: dict[str, list[torch.Tensor]] = {}  # distillation draws every micro-batch up front
        spans: dict[str, dict[int, int]] = {}  # task -> micro-step where a teacher window starts -> where it ends
        if distill is not None:
            for name, tensors in tasks.items():
                planned[name] = [next(draws[name]) for _ in range(steps * cfg.grad_accum)]
                draws[name] = iter(planned[name])
                teachers[name] = TeacherOutputs(
                    distill.teacher, tensors.task, tensors.train, self.device, cfg.eval_batch_size, self.autocast
                )
                cuts = windows(planned[name], teachers[name].example_bytes(), DEFAULT_BUDGET_BYTES)
                spans[name] = dict(cuts)
        # running sums stay on the device: no host sync per micro-step
        sums = {name: torch.zeros((), device=self.device) for name in tasks}
        kd_sums = {name: torch.zeros((), device=self.device) for name in tasks}
        samples = 0
        micro = 0
        model.train()
        with torch_seed(derive_seed(seed, "dropout")):
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = schedule(step)
                for _ in range(cfg.grad_accum):
                    for name, tensors in tasks.items():
                        index = next(draws[name])
                        if micro in spans.get(name, {}):
                            teachers[name].prepare(planned[name][micro : spans[name][micro]])
                        batch = tensors.train.batch(index, self.trim).to(self.device)
                        samples += len(batch)
                        with self.autocast():
                            output = forward(name, batch, targets_only=True)
                            loss = task_loss(tensors.task.kind, output, batch)
                            total = loss
                            if distill is not None:
                                kd = kd_loss(
                                    tensors.task.kind, teachers[name].take(index), output, batch, distill.temperature
                                )
                                total = loss + distill.weights[name] * kd
                                kd_sums[name] += kd.detach()
                        total = total / cfg.grad_accum
                        (scaler.scale(total) if scaler is not None else total).backward()
                        sums[name] += loss.detach()
                    micro += 1
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if progress is not None:
                    progress(step + 1, steps)
        model.eval()
        count = max(steps * cfg.grad_accum, 1)
        losses = {n: float(s) / count for n, s in sums.items()}
        bad = [n for n, v in losses.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(
                f"task {bad[0]}: the training loss became {losses[bad[0]]}; lower peak_lr or grad_clip"
            )
        return PhaseResult(
            losses=losses,
            steps=steps,
            samples=samples,
            seconds=time.perf_counter() - start,
            kd_losses={n: float(s) / count for n, s in kd_sums.items()} if distill is not None else {},
        )

    @torch.inference_mode()
    def eval_loss(self, model: TapModel, tensors: TaskTensors, split: str = "val") -> float:
        """Mean task loss on a split (at most ``max_val_examples`` examples of the val split)."""
        data = getattr(tensors, split)
        limit = self.cfg.max_val_examples if split == "val" else None
        if len(data) == 0:
            return math.inf
        model.eval()
        forward = self.forward_of(model)
        total, count = 0.0, 0
        for batch in ordered_batches(data, self.cfg.eval_batch_size, limit, self.trim):
            batch = batch.to(self.device)
            with self.autocast():
                output = forward(tensors.task.name, batch, targets_only=True)
            total += float(task_loss(tensors.task.kind, output, batch)) * len(batch)
            count += len(batch)
        return total / max(count, 1)

    @torch.inference_mode()
    def evaluate(
        self,
        model: TapModel,
        tensors: TaskTensors,
        end_id: int,
        split: str = "test",
        allowed: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Metrics on a split; ``allowed``: a mask of the head outputs classification chooses among."""
        model.eval()
        forward = self.forward_of(model)
        metric = metrics_for(tensors.task.kind, end_id)
        for batch in ordered_batches(getattr(tensors, split), self.cfg.eval_batch_size, trim=self.trim):
            batch = batch.to(self.device)
            with self.autocast():
                output = forward(tensors.task.name, batch)
            output = output.float()
            metric.update(output if allowed is None else mask_logits(output, allowed), batch)
        return metric.result()
