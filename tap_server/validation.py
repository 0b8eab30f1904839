"""Checks on a client update before anything touches the aggregate.

Every rule raises :class:`~tap_core.errors.Rejected` with a short ``reason``
(the Prometheus label, mapped to a gRPC status by ``tap_core.errors.REASON_STATUS``)
and a message that says what was wrong and what was expected.
"""

from __future__ import annotations

import math
from typing import Mapping

from tap_core.config import validate_task
from tap_core.errors import ConfigError, Rejected
from tap_core.finite import all_finite
from tap_core.layout import Layout
from tap_core.messages import ClientUpdate, RoundStats, SiloDeclaration, SiloResult


def check_update(update: ClientUpdate, expected: Layout, owned: set[str], expected_weights: Mapping[str, float]) -> None:
    """Raise Rejected unless ``update`` holds exactly the expected, finite tensors.

    ``expected``: the components this silo must upload this round and their layout;
    ``owned``: every component of the silo (to tell 'foreign' from 'unknown');
    ``expected_weights``: the sample weights the silo's declaration implies.
    """
    for component in update.values:
        if component not in expected:
            if component in owned:
                raise Rejected("unexpected_component", f"component {component} is not shared by this algorithm")
            raise Rejected("foreign_component", f"component {component} is not one of this silo's components")
    missing = [c for c in expected if c not in update.values]
    if missing:
        raise Rejected("missing_component", f"update lacks component {missing[0]} ({len(missing)} missing)")
    for component, layout in expected.items():
        tensors = update.values[component]
        names = dict(layout)
        for name in tensors:
            if name not in names:
                raise Rejected("unknown_tensor", f"component {component} has no trainable tensor {name!r}")
        for name, shape in layout:
            if name not in tensors:
                raise Rejected("missing_tensor", f"component {component} lacks tensor {name}")
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(shape):
                raise Rejected("wrong_shape", f"{component}/{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            if not tensor.is_floating_point():
                raise Rejected("wrong_dtype", f"{component}/{name}: dtype {tensor.dtype} is not floating point")
            if not all_finite(tensor):
                raise Rejected("non_finite", f"{component}/{name} contains NaN or infinite values")
    for component in expected:
        claimed = update.weights.get(component)
        if claimed is None or not math.isfinite(claimed) or abs(claimed - expected_weights.get(component, 0.0)) > 1e-6:
            raise Rejected(
                "bad_weight",
                f"component {component}: sample weight {claimed} does not match the {expected_weights.get(component)} "
                f"training samples the silo declared at join",
            )


MAX_TASKS = 64
MAX_LABELS = 10_000
MAX_SAMPLES = 1_000_000_000
MAX_STEPS = 1_000_000_000


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_declaration(decl: SiloDeclaration) -> None:
    """A silo's declaration must be a valid set of tasks with plausible sample counts and label lists."""
    if not decl.tasks or len(decl.tasks) > MAX_TASKS:
        raise Rejected("bad_declaration", f"a silo declares 1 to {MAX_TASKS} tasks, not {len(decl.tasks)}")
    names = [t.name for t in decl.tasks]
    if len(set(names)) != len(names):
        raise Rejected("bad_declaration", "a task is declared twice")
    for i, task in enumerate(decl.tasks):
        try:
            validate_task(task, f"tasks[{i}] (name={task.name})")
        except ConfigError as exc:
            raise Rejected("bad_declaration", str(exc)) from exc
    if set(decl.train_samples) != set(names):
        raise Rejected("bad_declaration", f"train_samples must name exactly the tasks {sorted(names)}")
    for name, count in decl.train_samples.items():
        if not 1 <= count <= MAX_SAMPLES:
            raise Rejected("bad_declaration", f"task {name}: {count} training samples (1 to {MAX_SAMPLES})")
    classification = {t.name for t in decl.tasks if t.kind == "classification"}
    for name, labels in decl.labels_seen.items():
        if name not in classification:
            raise Rejected("bad_declaration", f"labels_seen names {name!r}, not a classification task of this silo")
        if len(labels) > MAX_LABELS or any(len(label) > 200 for label in labels):
            raise Rejected("bad_declaration", f"task {name}: at most {MAX_LABELS} labels of at most 200 characters")


def check_stats(stats: RoundStats, tasks: set[str]) -> None:
    """Reported losses end up in the history, metrics and report: finite numbers of the silo's own tasks."""
    for table in (stats.task_losses, stats.personal_losses):
        for task, loss in table.items():
            if task not in tasks:
                raise Rejected("bad_stats", f"stats name task {task!r}, which is not one of this silo's tasks")
            if not _finite(loss):
                raise Rejected("non_finite", f"stats: loss of task {task} is {loss}")
    if not set(stats.scores) <= tasks or not all(_finite(v) for v in stats.scores.values()):
        raise Rejected("bad_stats", "stats: scores must be finite numbers of the silo's own tasks")
    if not 0 <= stats.scores_round <= MAX_STEPS:
        raise Rejected("bad_stats", f"stats: scores_round is {stats.scores_round}")
    for event in stats.replacements:
        if event.task not in tasks:
            raise Rejected("bad_stats", f"replacement event for task {event.task!r}, not one of this silo's tasks")
    if not _finite(stats.train_seconds) or stats.train_seconds < 0:
        raise Rejected("non_finite", f"stats: train_seconds is {stats.train_seconds}")


def check_result(result: SiloResult, tasks: set[str]) -> None:
    """Stage-2 results: each of the silo's tasks exactly once, every number finite."""
    reported = [t.task for t in result.tasks]
    if sorted(reported) != sorted(tasks):
        raise Rejected("bad_result", f"results for tasks {sorted(reported)}, expected each of {sorted(tasks)} once")
    for task in result.tasks:
        if not all(_finite(v) for v in [*task.metrics.values(), task.primary]):
            raise Rejected("non_finite", f"task {task.task}: metrics must be finite numbers")
        if task.baseline is not None and not _finite(task.baseline):
            raise Rejected("non_finite", f"task {task.task}: baseline must be a finite number")
        if not 0 <= task.test_examples <= MAX_SAMPLES:
            raise Rejected("bad_result", f"task {task.task}: {task.test_examples} test examples")
        if not 0 <= task.steps <= MAX_STEPS:
            raise Rejected("bad_result", f"task {task.task}: {task.steps} optimizer steps (0 to {MAX_STEPS})")
    for table in (result.kd_losses, *result.stage1_metrics.values()):
        if not all(_finite(v) for v in table.values()):
            raise Rejected("non_finite", "kd_losses and stage1_metrics must be finite numbers")
    if not set(result.kd_losses) <= tasks or not set(result.stage1_metrics) <= tasks:
        raise Rejected("bad_result", "kd_losses and stage1_metrics may only name the silo's tasks")
    if not _finite(result.seconds) or result.seconds < 0:
        raise Rejected("non_finite", f"seconds is {result.seconds}")
