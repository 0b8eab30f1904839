"""The federation plan: which tasks exist, their united label spaces, and each silo's part.

Label spaces are united when silos register: a label means the same head
index on every silo (never a per-silo index mapping). Declared ``labels:`` lists
win; otherwise the union of the labels silos saw, in natural sort order, so the
result does not depend on the order in which silos joined.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterable

from tap_core.config import SiloSpec, TaskSpec
from tap_core.errors import ConfigError
from tap_core.messages import SiloDeclaration
from tap_core.model.tap_model import ModelPlan
from tap_core.scenario import check_shared_tasks


def natural_key(label: str) -> tuple:
    """'2' < '10' < 'a': numbers compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", label) if part)


def _shown(labels: Iterable[str], limit: int = 12) -> str:
    ordered = sorted(labels, key=natural_key)
    more = f", … ({len(ordered)} in all)" if len(ordered) > limit else ""
    return "[" + ", ".join(repr(label) for label in ordered[:limit]) + more + "]"


def check_label_spaces(declarations: Iterable[SiloDeclaration]) -> None:
    """Silos sharing a classification task must share labels, unless they declare one label space.

    Two silos whose data has disjoint label sets under one task name would be merged
    silently into one head; they are refused unless the task declares its ``labels:``
    list or ``shared_labels: true``. Raises ConfigError naming both silos, the task
    and both label sets. (Checked at every join, so the silo that introduces the
    conflict is the one refused.)
    """
    seen: dict[str, list[tuple[str, set[str]]]] = {}
    explicit: set[str] = set()
    for decl in sorted(declarations, key=lambda d: d.silo):
        for task in decl.tasks:
            if task.kind != "classification":
                continue
            if task.labels is not None or task.shared_labels:
                explicit.add(task.name)
            labels = set(decl.labels_seen.get(task.name, []))
            if labels:
                seen.setdefault(task.name, []).append((decl.silo, labels))
    for name, holders in sorted(seen.items()):
        if name in explicit:
            continue
        for i, (silo_a, labels_a) in enumerate(holders):
            for silo_b, labels_b in holders[i + 1 :]:
                if not labels_a & labels_b:
                    raise ConfigError(
                        f"task {name}",
                        f"silo {silo_a} has labels {_shown(labels_a)} and silo {silo_b} has labels {_shown(labels_b)}: "
                        "no label in common, so one head would serve two different label sets",
                        "if these are different tasks, rename one; if they share one label space, declare it on the "
                        "task in every silo's config: the full list as labels: [...], or shared_labels: true",
                    )


def united_tasks(declarations: Iterable[SiloDeclaration], complete: bool = True) -> dict[str, TaskSpec]:
    """Every task of the federation once, classification tasks with their full label list.

    Raises ConfigError on conflicts between the declarations; with ``complete`` also when a classification
    task has fewer than two labels (which a silo joining later may still bring: checked at the start only).
    """
    declarations = sorted(declarations, key=lambda d: d.silo)
    check_shared_tasks(tuple(SiloSpec(d.silo, d.tasks) for d in declarations), "federation")
    check_label_spaces(declarations)
    tasks: dict[str, TaskSpec] = {}
    seen: dict[str, set[str]] = {}
    for decl in declarations:
        for task in decl.tasks:
            tasks.setdefault(task.name, task)
            if task.labels is not None:
                tasks[task.name] = task
            seen.setdefault(task.name, set()).update(decl.labels_seen.get(task.name, []))
    result = {}
    for name, task in sorted(tasks.items()):
        if task.kind == "classification":
            labels = task.labels or tuple(sorted(seen[name], key=natural_key))
            unknown = seen[name] - set(labels)
            if unknown:
                raise ConfigError(
                    f"task {name}.labels",
                    f"label {sorted(unknown)[0]!r} occurs in a silo's data but not in the declared list",
                    "add it to labels: or remove those examples",
                )
            if complete and len(labels) < 2:
                raise ConfigError(
                    f"task {name}",
                    f"classification needs at least 2 labels across the federation, found {list(labels)}",
                )
            task = dataclasses.replace(task, labels=tuple(labels))
        result[name] = dataclasses.replace(task, data={})
    return result


def incomplete_tasks(declarations: Iterable[SiloDeclaration]) -> dict[str, list[str]]:
    """Classification tasks with fewer than two labels across ``declarations`` -> the silos holding them.

    (``declarations`` must be free of conflicts: ``united_tasks(declarations, complete=False)`` passes.)
    """
    declarations = list(declarations)
    tasks = united_tasks(declarations, complete=False)
    short = {name for name, task in tasks.items() if task.kind == "classification" and len(task.labels or ()) < 2}
    return {
        name: sorted(d.silo for d in declarations if any(t.name == name for t in d.tasks)) for name in sorted(short)
    }


def plan_json_bytes(plan: ModelPlan) -> int:
    """Bytes of the plan as it travels in an assignment (``plan_json``)."""
    return len(json.dumps(plan_to_json(plan)).encode())


def silo_plan(declaration: SiloDeclaration, tasks: dict[str, TaskSpec], fusion_layers: int) -> ModelPlan:
    """The part of the federation's model one silo holds (its own tasks, federation labels)."""
    own = []
    for task in declaration.tasks:
        if task.name not in tasks:
            raise ConfigError(
                f"silo {declaration.silo} task {task.name}",
                "is not part of this federation's plan",
                "the plan is fixed once the first round starts; restart the federation to add tasks",
            )
        united = tasks[task.name]
        # the silo keeps its own domain tag (same head, its own domain adapters) and its own overrides
        own.append(dataclasses.replace(united, domain=task.domain, margin=task.margin, kd_weight=task.kd_weight))
    return ModelPlan(tuple(own), fusion_layers)


def union_plan(declarations: Iterable[SiloDeclaration], fusion_layers: int) -> ModelPlan:
    """The server's model: every silo's components (each task once per domain that uses it)."""
    declarations = list(declarations)
    tasks = united_tasks(declarations)
    parts: list[TaskSpec] = []
    seen_domains: set[tuple[str, str]] = set()
    for decl in sorted(declarations, key=lambda d: d.silo):
        for task in decl.tasks:
            if (task.name, task.domain) not in seen_domains:
                seen_domains.add((task.name, task.domain))
                parts.append(dataclasses.replace(tasks[task.name], domain=task.domain))
    return ModelPlan(tuple(parts), fusion_layers)


def plan_to_json(plan: ModelPlan) -> dict:
    from tap_core.config import to_mapping

    return {"fusion_layers": plan.fusion_layers, "tasks": [to_mapping(t) for t in plan.tasks]}


def plan_from_json(data: dict) -> ModelPlan:
    from tap_core.config import from_mapping

    tasks = tuple(from_mapping(TaskSpec, t, f"plan.tasks[{i}]") for i, t in enumerate(data["tasks"]))
    return ModelPlan(tasks, int(data["fusion_layers"]))


def component_weights(plan: ModelPlan, train_samples: dict[str, int], components: list[str]) -> dict[str, float]:
    """Aggregation weight per component: the training samples of the plan's tasks that use it."""
    weights = {c: 0.0 for c in components}
    for task in plan.tasks:
        for component in plan.task_components(task.name):
            if component in weights:
                weights[component] += float(train_samples.get(task.name, 0))
    return weights
