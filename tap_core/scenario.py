"""Scenario and silo YAML files: parse, resolve paths, validate across silos.

A scenario names the federation's silos and their tasks (see docs/scenarios.md).
Errors name the file, the silo, the task and the field, and say how to fix it.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from tap_core.config import (
    ModelSpec,
    Scenario,
    SiloSpec,
    StudyBudget,
    TaskSpec,
    TrainConfig,
    from_mapping,
    validate_model,
    validate_task,
    validate_train,
)
from tap_core.errors import ConfigError

BUILTIN_SCENARIOS = ("tap-bench", "tap-bench-mini")


def builtin_scenario_path(name: str) -> Path:
    resource = importlib.resources.files("tap_core") / "scenarios" / f"{name}.yaml"
    return Path(str(resource))


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(
            str(path), "file not found", "check the path (relative paths resolve against the current directory)"
        )
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"is not valid YAML: {exc}") from exc


def resolve_scenario_path(name_or_path: str) -> Path:
    if name_or_path in BUILTIN_SCENARIOS:
        return builtin_scenario_path(name_or_path)
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        raise ConfigError(
            name_or_path,
            "is neither a built-in scenario nor a file",
            f"use one of {', '.join(BUILTIN_SCENARIOS)} or a path to a .yaml file",
        )
    return path


def _resolve_data_paths(data: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """Relative ``path`` entries of a data block resolve against the YAML file's folder."""
    resolved = dict(data)
    for key in ("path", "test_path", "images_path"):
        value = resolved.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            resolved[key] = str((base_dir / value).resolve())
    return resolved


def first_duplicate(names: list[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def parse_task(raw: Any, where: str, base_dir: Path) -> TaskSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"a task must be a mapping, got {raw!r}")
    name = raw.get("name", "?")
    here = f"{where} (name={name})"
    data = raw.get("data") or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{here}.data", f"must be a mapping, got {data!r}")
    fields = dict(raw)
    fields["data"] = _resolve_data_paths(data, base_dir)
    if isinstance(fields.get("modalities"), str):
        fields["modalities"] = [fields["modalities"]]
    if "labels" in fields and fields["labels"] is not None:
        fields["labels"] = [str(v) for v in fields["labels"]]
    task = from_mapping(TaskSpec, fields, here)
    validate_task(task, here)
    if not task.data:
        raise ConfigError(f"{here}.data", "is missing", "add data: {format: ..., ...} (see docs/scenarios.md)")
    return task


def parse_silo(raw: Any, where: str, base_dir: Path, silo_id: str | None = None) -> SiloSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"a silo must be a mapping, got {raw!r}")
    sid = str(raw.get("id", silo_id or ""))
    here = f"{where} (id={sid})" if "id" in raw else where
    unknown = set(raw) - {"id", "tasks"}
    if unknown:
        raise ConfigError(f"{here}.{sorted(unknown)[0]}", "unknown key", "a silo has 'id' and 'tasks'")
    if not sid:
        raise ConfigError(f"{here}.id", "is required")
    if "." in sid or "/" in sid or sid != sid.strip():
        raise ConfigError(f"{here}.id", f"silo id {sid!r} must not contain '.', '/' or spaces at the ends")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise ConfigError(f"{here}.tasks", "needs a non-empty list of tasks")
    tasks = tuple(parse_task(t, f"{here}.tasks[{i}]", base_dir) for i, t in enumerate(tasks_raw))
    twice = first_duplicate([t.name for t in tasks])
    if twice is not None:
        raise ConfigError(f"{here}.tasks", f"task {twice!r} appears twice in one silo")
    return SiloSpec(id=sid, tasks=tasks)


def check_shared_tasks(silos: tuple[SiloSpec, ...], where: str) -> None:
    """Tasks with one name on several silos share a head: they must agree on what it is."""
    first: dict[str, tuple[str, TaskSpec]] = {}
    for silo in silos:
        for task in silo.tasks:
            if task.name not in first:
                first[task.name] = (silo.id, task)
                continue
            other_silo, other = first[task.name]
            for attr in ("kind", "modalities", "family", "shared_labels"):
                if getattr(task, attr) != getattr(other, attr):
                    raise ConfigError(
                        f"{where}: silo {silo.id} task {task.name}.{attr}",
                        f"is {getattr(task, attr)!r} but silo {other_silo} declares the same task with {getattr(other, attr)!r}",
                        "tasks that share a name share one head: make them agree, or rename one",
                    )
            if task.labels is not None and other.labels is not None and task.labels != other.labels:
                raise ConfigError(
                    f"{where}: silo {silo.id} task {task.name}.labels",
                    f"differ from silo {other_silo}'s declared labels",
                    "declare the same ordered label list everywhere, or declare it on one silo only",
                )


def parse_scenario(raw: Any, source: str, base_dir: Path) -> Scenario:
    if not isinstance(raw, Mapping):
        raise ConfigError(source, "a scenario must be a YAML mapping with name, model and silos")
    unknown = set(raw) - {"name", "description", "model", "train", "rounds", "study", "silos"}
    if unknown:
        raise ConfigError(
            f"{source}: {sorted(unknown)[0]}",
            "unknown key",
            "a scenario has name, description, model, train, rounds, study and silos",
        )
    rounds = raw.get("rounds", 3)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"{source}: rounds", f"must be a whole number >= 1, got {rounds!r}")
    model = from_mapping(ModelSpec, raw.get("model") or {}, f"{source}: model")
    validate_model(model, f"{source}: model")
    train = from_mapping(TrainConfig, raw.get("train") or {}, f"{source}: train")
    validate_train(train, f"{source}: train")
    study = None
    if raw.get("study") is not None:
        study = from_mapping(StudyBudget, raw["study"], f"{source}: study")
        for key in ("rounds", "local_steps", "batch_size", "stage2_steps"):
            value = getattr(study, key)
            if value < (0 if key == "stage2_steps" else 1):
                raise ConfigError(
                    f"{source}: study.{key}",
                    f"must be a whole number >= {0 if key == 'stage2_steps' else 1}, got {value!r}",
                )
    silos_raw = raw.get("silos")
    if not isinstance(silos_raw, list) or not silos_raw:
        raise ConfigError(f"{source}: silos", "needs a non-empty list of silos")
    silos = tuple(parse_silo(s, f"{source}: silos[{i}]", base_dir) for i, s in enumerate(silos_raw))
    twice = first_duplicate([s.id for s in silos])
    if twice is not None:
        raise ConfigError(f"{source}: silos", f"silo id {twice!r} appears twice", "give every silo its own id")
    check_shared_tasks(silos, source)
    return Scenario(
        name=str(raw.get("name") or Path(source).stem),
        description=str(raw.get("description") or ""),
        silos=silos,
        model=model,
        train=train,
        source=source,
        rounds=rounds,
        study=study,
    )


def load_scenario(name_or_path: str) -> Scenario:
    path = resolve_scenario_path(name_or_path)
    raw = read_yaml(path)
    return parse_scenario(
        raw, str(path) if name_or_path not in BUILTIN_SCENARIOS else f"{name_or_path}.yaml", path.parent
    )


def load_silo_config(path: Path) -> tuple[SiloSpec, dict[str, Any]]:
    """A client's silo.yaml: ``tasks`` (as in a scenario) plus agent settings.

    Returns the silo spec (id from the file, or "" — the server's certificate decides)
    and the remaining agent settings (``state_dir``, ``device``, ``threads``).
    """
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError(str(path), "a silo config must be a YAML mapping with tasks")
    agent_keys = {"state_dir", "device", "threads", "metrics_port"}
    settings = {k: raw[k] for k in agent_keys if k in raw}
    silo_raw = {k: v for k, v in raw.items() if k not in agent_keys}
    silo_raw.setdefault("id", "silo")
    silo = parse_silo(silo_raw, str(path), path.parent)
    return silo, settings


def load_federation_config(path: Path):
    """The server's federation.yaml as a validated FederationConfig."""
    from tap_core.config import FederationConfig, validate_federation

    raw = read_yaml(Path(path))
    config = from_mapping(FederationConfig, raw or {}, str(path))
    validate_federation(config, str(path))
    return config
