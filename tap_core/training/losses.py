"""Task losses and the stage-2 distillation losses (TAP_SPEC §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tap_core.model.tap_model import Batch
from tap_core.training.batches import PAD_ID


def task_loss(kind: str, output: torch.Tensor, batch: Batch) -> torch.Tensor:
    output = output.float()
    if kind == "classification":
        return F.cross_entropy(output, batch.labels)
    if kind == "text_generation":
        if output.dim() == 2:  # logits at the target positions only (TapModel(..., targets_only=True))
            return F.cross_entropy(output, batch.target_ids[batch.target_ids != PAD_ID])
        return F.cross_entropy(output.flatten(0, 1), batch.target_ids.flatten(), ignore_index=PAD_ID)
    if kind == "image_generation":
        return F.mse_loss(output, batch.images)
    raise ValueError(f"unknown task kind {kind!r}")


def kd_logits(
    teacher: torch.Tensor, student: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over (unmasked) positions.

    ``teacher``/``student``: (..., V) logits; ``mask``: (...) True where the position counts
    (text generation: not padding).
    """
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(-1)
    if mask is None:
        return per_position.mean() * temperature**2
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0) * temperature**2


def kd_loss(kind: str, teacher: torch.Tensor, student: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
    if kind == "image_generation":  # regression output: match the teacher's image
        return F.mse_loss(student.float(), teacher.float())
    mask = batch.target_ids != PAD_ID if kind == "text_generation" and student.dim() == 3 else None
    return kd_logits(teacher, student, temperature, mask)
