"""Evaluation metrics per task kind (TAP_SPEC §6), accumulated over batches.

``primary`` is higher-is-better and dimensionless: accuracy (classification),
exact match (text generation), R^2 = 1 - MSE / Var(target) (image generation).
"""

from __future__ import annotations

import math

import torch

from tap_core.model.tap_model import Batch
from tap_core.training.batches import PAD_ID

PRIMARY = {"classification": "accuracy", "text_generation": "exact_match", "image_generation": "r2"}


class ClassificationMetrics:
    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, output: torch.Tensor, batch: Batch) -> None:
        self.correct += int((output.argmax(-1) == batch.labels).sum())
        self.total += int(batch.labels.numel())

    def result(self) -> dict[str, float]:
        return {"accuracy": self.correct / max(self.total, 1)}


def cut_at_end(ids: torch.Tensor, end_id: int) -> list[list[int]]:
    """Each row's tokens before the first ``end_id`` (or PAD)."""
    rows = []
    for row in ids.tolist():
        out = []
        for token in row:
            if token in (end_id, PAD_ID):
                break
            out.append(token)
        rows.append(out)
    return rows


class TextGenerationMetrics:
    """Exact match of the whole answer, and accuracy over non-padding target positions."""

    def __init__(self, end_id: int) -> None:
        self.end_id = end_id
        self.exact = 0
        self.sequences = 0
        self.tokens_correct = 0
        self.tokens = 0

    def update(self, output: torch.Tensor, batch: Batch) -> None:
        self.update_ids(output.argmax(-1), batch.target_ids)

    def update_ids(self, predicted: torch.Tensor, targets: torch.Tensor) -> None:
        """Score predicted token ids (B, T) against target ids (B, T)."""
        valid = targets != PAD_ID
        self.tokens_correct += int(((predicted == targets) & valid).sum())
        self.tokens += int(valid.sum())
        for p, t in zip(cut_at_end(predicted, self.end_id), cut_at_end(targets, self.end_id)):
            self.exact += int(p == t)
        self.sequences += targets.shape[0]

    def result(self) -> dict[str, float]:
        return {
            "exact_match": self.exact / max(self.sequences, 1),
            "token_accuracy": self.tokens_correct / max(self.tokens, 1),
        }


class ImageGenerationMetrics:
    """MSE and PSNR over all pixels ([0, 1] scale), and R^2 against the test set's pixel variance."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.count = 0
        self.sum = 0.0
        self.sum_sq = 0.0

    def update(self, output: torch.Tensor, batch: Batch) -> None:
        target = batch.images.double()
        self.sse += float(((output.double() - target) ** 2).sum())
        self.count += target.numel()
        self.sum += float(target.sum())
        self.sum_sq += float((target**2).sum())

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        mse = self.sse / n
        variance = max(self.sum_sq / n - (self.sum / n) ** 2, 1e-12)
        return {
            "mse": mse,
            "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "r2": 1.0 - mse / variance,
        }


def metrics_for(kind: str, end_id: int):
    if kind == "classification":
        return ClassificationMetrics()
    if kind == "text_generation":
        return TextGenerationMetrics(end_id)
    if kind == "image_generation":
        return ImageGenerationMetrics()
    raise ValueError(f"unknown task kind {kind!r}")
