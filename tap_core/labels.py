"""Label spaces: a classification head serves the federation's labels, a silo predicts among its own.

A task name shared by several silos has one head whose outputs are the united
label list (tap_core.plan). A silo's own task may use only part of it: its
declared ``labels:`` list, else the labels present in its data. Evaluation (and
``predict``) choose among those labels only, for every algorithm alike, so a
model is never scored on a label the silo does not have.
"""

from __future__ import annotations

from typing import Sequence

import torch


def own_label_index(head_labels: Sequence[str], own_labels: Sequence[str]) -> torch.Tensor:
    """Positions (in head order) of the labels a silo's task can be right about."""
    own = set(own_labels)
    return torch.tensor([i for i, label in enumerate(head_labels) if label in own], dtype=torch.long)


def restrict_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Logits (..., num_labels) with every label outside ``allowed`` set to -inf (None: unchanged).

    argmax and softmax over the result pick and weigh only the allowed labels.
    """
    if allowed is None or allowed.numel() == logits.shape[-1]:
        return logits
    mask = torch.full((logits.shape[-1],), float("-inf"), dtype=logits.dtype, device=logits.device)
    mask[allowed.to(logits.device)] = 0.0
    return logits + mask
