"""Checks on a client update before anything touches the aggregate.

Every rule raises :class:`~tap_core.errors.Rejected` with a short ``reason``
(the Prometheus label, mapped to a gRPC status by ``tap_core.errors.REASON_STATUS``)
and a message that says what was wrong and what was expected.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from tap_core.config import LimitsConfig, validate_task
from tap_core.errors import ConfigError, Rejected
from tap_core.finite import all_finite
from tap_core.layout import Layout
from tap_core.messages import ClientUpdate, RoundStats, SiloDeclaration, SiloResult
from tap_core.model.tap_model import ComponentValues
from tap_server.aggregation import squared_distance


def check_update(
    update: ClientUpdate, expected: Layout, owned: set[str], expected_weights: Mapping[str, float]
) -> None:
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
                raise Rejected(
                    "wrong_shape", f"{component}/{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}"
                )
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


MAX_STEPS = 1_000_000_000
MAX_FINGERPRINT_CHARS = 128
UPDATE_NORM_FLOOR_RMS = 0.01  # the norm bound's reference for a component whose global values are (near) zero


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounded_names(names: Iterable[str], limit: int, what: str, reason: str) -> None:
    for name in names:
        if not name or len(name) > limit:
            raise Rejected(
                reason,
                f"{what} {name[:40]!r}{'…' if len(name) > 40 else ''}: "
                f"names are 1 to {limit} characters (limits.max_name_chars)",
            )


def _check_labels(task: str, labels: list[str] | tuple[str, ...], limits: LimitsConfig, what: str) -> None:
    if len(labels) > limits.max_labels_per_task:
        raise Rejected(
            "bad_declaration",
            f"task {task}: {len(labels)} {what}, at most {limits.max_labels_per_task} "
            f"labels of at most {limits.max_label_chars} characters "
            "(limits.max_labels_per_task)",
        )
    longest = max((len(label) for label in labels), default=0)
    if longest > limits.max_label_chars:
        raise Rejected(
            "bad_declaration",
            f"task {task}: a label of {longest} characters among its {what}, at most "
            f"{limits.max_labels_per_task} labels of at most {limits.max_label_chars} "
            "characters (limits.max_label_chars)",
        )


def check_declaration(decl: SiloDeclaration, limits: LimitsConfig | None = None) -> None:
    """A silo's declaration must be a valid set of tasks with plausible sample counts and bounded label lists.

    Everything here concerns the declaration alone; how it fits the other silos' is checked at the join
    (``tap_core.plan.check_joinable``).
    """
    limits = limits or LimitsConfig()
    if not decl.tasks or len(decl.tasks) > limits.max_tasks:
        raise Rejected(
            "bad_declaration",
            f"a silo declares 1 to {limits.max_tasks} tasks, not {len(decl.tasks)} (limits.max_tasks)",
        )
    names = [t.name for t in decl.tasks]
    if len(set(names)) != len(names):
        raise Rejected("bad_declaration", "a task is declared twice")
    for i, task in enumerate(decl.tasks):
        _bounded_names(
            [task.name, task.family, task.domain],
            limits.max_name_chars,
            f"tasks[{i}]: name/family/domain",
            "bad_declaration",
        )
        try:
            validate_task(task, f"tasks[{i}] (name={task.name})")
        except ConfigError as exc:
            raise Rejected("bad_declaration", str(exc)) from exc
        if task.data:
            raise Rejected(
                "bad_declaration",
                f"task {task.name}: a declaration carries no data settings (the silo's data stays with the silo)",
            )
        if task.labels is not None:
            _check_labels(task.name, task.labels, limits, "declared labels")
    if len(decl.device) > limits.max_name_chars:
        raise Rejected("bad_declaration", f"device: {len(decl.device)} characters, at most {limits.max_name_chars}")
    if len(decl.fingerprint) > MAX_FINGERPRINT_CHARS:
        raise Rejected("bad_declaration", f"fingerprint: {len(decl.fingerprint)} characters, a SHA-256 in hex has 64")
    if set(decl.train_samples) != set(names):
        raise Rejected("bad_declaration", f"train_samples must name exactly the tasks {sorted(names)}")
    for name, count in decl.train_samples.items():
        if not 1 <= count <= limits.max_train_samples:
            raise Rejected(
                "bad_declaration",
                f"task {name}: {count} training samples (1 to {limits.max_train_samples}, limits.max_train_samples)",
            )
    classification = {t.name: t for t in decl.tasks if t.kind == "classification"}
    total = 0
    for name, labels in decl.labels_seen.items():
        if name not in classification:
            raise Rejected(
                "bad_declaration", f"labels_seen names {name[:40]!r}, not a classification task of this silo"
            )
        _check_labels(name, labels, limits, "labels seen")
        declared = classification[name].labels
        if declared is not None:
            unknown = set(labels) - set(declared)
            if unknown:
                raise Rejected(
                    "bad_declaration",
                    f"task {name}: label {sorted(unknown)[0][:40]!r} occurs in the silo's "
                    "data but not in its declared labels: list",
                )
    for name, task in classification.items():
        total += len(set(task.labels or ()) | set(decl.labels_seen.get(name, ())))
    if total > limits.max_labels_per_silo:
        raise Rejected(
            "bad_declaration",
            f"{total} labels over the silo's tasks, at most {limits.max_labels_per_silo} (limits.max_labels_per_silo)",
        )


def check_update_norm(
    values: ComponentValues, current: ComponentValues, ratio: float | None, reference_sq: dict[str, float] | None = None
) -> None:
    """Refuse an update that moves a component further than ``ratio`` times the component's global norm.

    The reference is at least ``UPDATE_NORM_FLOOR_RMS`` per element, so components whose global values
    are still zero can move. Honest local rounds stay far below the default bound (docs/operations.md).
    ``reference_sq``: a cache of the global norms (squared) per component, valid while ``current`` is, so the
    global values are read once per round rather than once per upload (this runs under the federation lock).
    """
    if ratio is None:
        return
    cache = {} if reference_sq is None else reference_sq
    for component, tensors in values.items():
        reference = current[component]
        if component not in cache:
            cache[component] = sum(squared_distance(t) for t in reference.values())
        delta_sq = sum(squared_distance(tensor, reference[name]) for name, tensor in tensors.items())
        elements = sum(tensor.numel() for tensor in tensors.values())
        bound = ratio * max(math.sqrt(cache[component]), UPDATE_NORM_FLOOR_RMS * math.sqrt(elements))
        change = math.sqrt(delta_sq)
        if not change <= bound:  # also refuses NaN
            raise Rejected(
                "update_norm",
                f"component {component}: the update moves it by {change:.4g} (L2), more than "
                f"{ratio:g} x its global norm ({bound:.4g}, aggregation.max_update_norm_ratio)",
            )


def check_stats(stats: RoundStats, tasks: set[str], components: set[str] | None = None) -> None:
    """Reported losses end up in the history, metrics and report: finite numbers of the silo's own tasks.

    ``components``: the silo's components (what a replacement event may name).
    """
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
    if len(stats.replacements) > len(tasks):
        raise Rejected("bad_stats", f"{len(stats.replacements)} replacement events for {len(tasks)} tasks")
    for event in stats.replacements:
        if event.task not in tasks:
            raise Rejected("bad_stats", f"replacement event for task {event.task[:40]!r}, not one of this silo's tasks")
        if not (
            _finite(event.global_loss)
            and _finite(event.margin)
            and event.round >= 0
            and (_finite(event.personal_loss) or event.personal_loss == math.inf)
        ):
            raise Rejected("non_finite", f"replacement event of task {event.task}: losses and margin must be finite")
        if components is not None and not set(event.components) <= components:
            raise Rejected(
                "bad_stats", f"replacement event of task {event.task} names components the silo does not hold"
            )
    if not 0 <= stats.samples_seen <= MAX_STEPS * 1000:
        raise Rejected("bad_stats", f"stats: samples_seen is {stats.samples_seen}")
    if not _finite(stats.train_seconds) or stats.train_seconds < 0:
        raise Rejected("non_finite", f"stats: train_seconds is {stats.train_seconds}")


def check_result(result: SiloResult, tasks: Mapping[str, str], limits: LimitsConfig | None = None) -> None:
    """Stage-2 results: each of the silo's tasks (name -> kind) exactly once, every number finite, names bounded."""
    limits = limits or LimitsConfig()
    reported = [t.task for t in result.tasks]
    if sorted(reported) != sorted(tasks):
        shown = sorted(reported)[:8] if len(reported) <= 64 else f"{len(reported)} tasks"
        raise Rejected("bad_result", f"results for tasks {shown}, expected each of {sorted(tasks)} once")
    for table in (*(t.metrics for t in result.tasks), *result.stage1_metrics.values()):
        if len(table) > limits.max_metrics_per_task:
            raise Rejected(
                "bad_result",
                f"{len(table)} metrics for one task, at most {limits.max_metrics_per_task} "
                "(limits.max_metrics_per_task)",
            )
        _bounded_names(table, limits.max_name_chars, "metric", "bad_result")
    for task in result.tasks:
        if task.kind != tasks[task.task]:
            raise Rejected("bad_result", f"task {task.task}: kind {task.kind[:40]!r}, the plan says {tasks[task.task]}")
        if not all(_finite(v) for v in [*task.metrics.values(), task.primary]):
            raise Rejected("non_finite", f"task {task.task}: metrics must be finite numbers")
        if task.baseline is not None and not _finite(task.baseline):
            raise Rejected("non_finite", f"task {task.task}: baseline must be a finite number")
        if not 0 <= task.test_examples <= limits.max_train_samples:
            raise Rejected("bad_result", f"task {task.task}: {task.test_examples} test examples")
        if not 0 <= task.steps <= MAX_STEPS:
            raise Rejected("bad_result", f"task {task.task}: {task.steps} optimizer steps (0 to {MAX_STEPS})")
    for table in (result.kd_losses, *result.stage1_metrics.values()):
        if not all(_finite(v) for v in table.values()):
            raise Rejected("non_finite", "kd_losses and stage1_metrics must be finite numbers")
    if not set(result.kd_losses) <= set(tasks) or not set(result.stage1_metrics) <= set(tasks):
        raise Rejected("bad_result", "kd_losses and stage1_metrics may only name the silo's tasks")
    if not _finite(result.seconds) or result.seconds < 0:
        raise Rejected("non_finite", f"seconds is {result.seconds}")
