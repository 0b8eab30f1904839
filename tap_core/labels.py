"""A silo's own labels inside a federation-wide classification head.

A classification head has one output per label of the *federation's* label
list (plan order: the same index on every silo). A silo, however, predicts
among the labels its own task has: its declared ``labels:`` list, else the
labels present in its own training data. The other outputs are masked, so a
silo is never answered (or scored) on a label it never has, for every algorithm
alike. Evaluation (``SiloRuntime.evaluate``), export and prediction all go
through :func:`mask_logits` with the subset from :func:`silo_label_subset`.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from tap_core.config import TaskSpec
from tap_core.data.types import TaskData


def silo_label_subset(
    head_labels: Sequence[str], declared: Sequence[str] | None, training_labels: Iterable[str]
) -> tuple[str, ...]:
    """The labels one silo's task predicts among, in head order.

    ``declared``: the silo's own ``labels:`` list (None when it declares none);
    ``training_labels``: the labels of its training rows (train and validation, never test).
    """
    own = set(declared) if declared is not None else set(training_labels)
    return tuple(label for label in head_labels if label in own)


def silo_label_subsets(
    own_tasks: Iterable[TaskSpec], data: Mapping[str, TaskData], head_tasks: Iterable[TaskSpec]
) -> dict[str, tuple[str, ...]]:
    """:func:`silo_label_subset` of every classification task of one silo.

    ``own_tasks``: the silo's tasks as its config declares them; ``head_tasks``: the same tasks in the
    federation's plan (their full label lists).
    """
    declared = {task.name: task.labels for task in own_tasks}
    subsets = {}
    for task in head_tasks:
        if task.kind != "classification":
            continue
        task_data = data[task.name]
        seen = [label for split in (task_data.train, task_data.val) for label in split.labels or ()]
        subsets[task.name] = silo_label_subset(task.labels or (), declared.get(task.name), seen)
    return subsets


def allowed_outputs(head_labels: Sequence[str], subset: Iterable[str]) -> torch.Tensor:
    """Boolean (num_labels,): True for the head outputs the silo predicts among."""
    keep = set(subset)
    return torch.tensor([label in keep for label in head_labels], dtype=torch.bool)


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits (..., num_labels) with the outputs outside ``allowed`` set to -inf.

    ``argmax`` then picks among the silo's labels only and ``softmax`` gives the others probability 0.
    An all-True mask returns ``logits`` unchanged.
    """
    if bool(allowed.all()):
        return logits
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
