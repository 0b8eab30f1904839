"""``tap-client export``: a silo's final model as a self-contained directory (tap_core/model_card.py).

Both ends of the agent's final-model metadata live here: :func:`final_model_metadata`
is what the agent stores beside the final model when the federation ends
(``final_model.safetensors``'s "tap" metadata), :func:`export_model` reads it back,
with ``results.json`` and ``federation.json``, and writes the export. The export
is checked by loading it before it replaces anything at ``--out``.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tap_core.config import FederationConfig, ModelSpec, TaskSpec, from_mapping, to_mapping
from tap_core.data.inputs import trained_columns
from tap_core.errors import ConfigError
from tap_core.labels import silo_label_subsets
from tap_core.model.backbone import minilm_path
from tap_core.model.tap_model import ModelPlan
from tap_core.model_card import (
    FORMAT,
    MODEL_JSON,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    WEIGHTS,
    ExportedTask,
    ExportError,
    ModelCard,
)
from tap_core.silo import SiloRuntime
from tap_core.atomic_files import atomic_write_json
from tap_core.store import atomic_save_tensors
from tap_client.store import FINAL_MODEL, ClientStore

# metadata keys export needs beyond those every final model has had (silo, algorithm, federation, plan, fingerprint)
EXPORT_KEYS = ("model", "fusion_layers", "rounds", "seed", "silo_labels", "inputs", "evaluation")


def final_model_metadata(runtime: SiloRuntime, config: FederationConfig) -> dict[str, Any]:
    """What the agent stores with its final model: enough to export and use it without the federation."""
    plan = runtime.plan
    assert plan is not None, "the federation's plan arrives before its end"
    subsets = silo_label_subsets(runtime.silo.tasks, runtime.data, plan.tasks)
    return {
        "silo": runtime.id,
        "algorithm": config.algorithm,
        "federation": config.name,
        "plan": json.loads(json.dumps(to_mapping(plan.tasks))),
        "fingerprint": runtime.backbone.fingerprint,
        "fusion_layers": plan.fusion_layers,
        "rounds": config.rounds,
        "seed": config.seed,
        "model": to_mapping(config.model),
        "silo_labels": {task: list(labels) for task, labels in subsets.items()},
        "inputs": {task.name: trained_columns(task) for task in runtime.silo.tasks},
        "evaluation": {
            "batch_size": config.train.eval_batch_size,
            "threads": config.train.threads,
            "amp": config.train.amp,
        },
    }


def export_model(state_dir: Path, out_dir: Path, version: str = "") -> ModelCard:
    """Write the final model of the agent state at ``state_dir`` to ``out_dir``; returns its card."""
    state_dir, out_dir = Path(state_dir), Path(out_dir)
    _check_destination(out_dir)
    card, values = read_state(state_dir, version)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".export"))
    try:
        atomic_save_tensors(staging / WEIGHTS, values, metadata={"format": FORMAT})
        _copy_tokenizer(card.model, staging / TOKENIZER_DIR)
        atomic_write_json(staging / MODEL_JSON, card.to_json())
        from tap_core.inference import load_model

        load_model(staging, "cpu")  # the export must load: fingerprint, plan and tensors agree
        previous = staging.with_suffix(".previous")
        if out_dir.exists():
            os.replace(out_dir, previous)  # the earlier export (or an empty folder) stays until the new one is in
        os.replace(staging, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def read_state(state_dir: Path, version: str = "") -> tuple[ModelCard, dict]:
    """The card and trainable values of the final model in an agent's state directory."""
    if not state_dir.is_dir():
        raise ExportError(f"--state {state_dir}: no such directory (fix: give the --state of tap-client run)")
    store = ClientStore(state_dir)
    owner, final, results = store.owner(), store.load_final_model(), store.load_results()
    if owner is None or final is None or results is None:
        missing = [
            name
            for name, thing in (("federation.json", owner), (FINAL_MODEL, final), ("results.json", results))
            if thing is None
        ]
        raise ExportError(
            f"--state {state_dir} has no {' or '.join(missing)}: this silo has not finished a federation "
            "there (fix: export after tap-client run exits 0; it writes them at the end)"
        )
    values, meta = final
    absent = [key for key in EXPORT_KEYS if key not in meta]
    if absent:
        raise ExportError(
            f"{state_dir / FINAL_MODEL} was written by an older tap-client: its metadata lacks "
            f"{', '.join(absent)} (fix: run the federation again with this version to export it)"
        )
    where = str(state_dir / FINAL_MODEL)
    try:
        spec = from_mapping(ModelSpec, meta["model"], f"{where} model")
        tasks = tuple(from_mapping(TaskSpec, t, f"{where} plan[{i}]") for i, t in enumerate(meta["plan"]))
    except ConfigError as exc:
        raise ExportError(f"cannot read the model description in {where}: {exc}") from exc
    metrics = {t.task: t.metrics for t in results.tasks}
    exported = {}
    for task in tasks:
        labels = meta["silo_labels"].get(task.name)
        exported[task.name] = ExportedTask(
            name=task.name,
            kind=task.kind,
            modalities=task.modalities,
            labels=task.labels if task.kind == "classification" else None,
            silo_labels=tuple(labels) if labels is not None else None,
            inputs=dict(meta["inputs"].get(task.name, {})),
            metrics=dict(metrics.get(task.name, {})),
        )
    evaluation = meta["evaluation"]
    card = ModelCard(
        silo=str(meta["silo"]),
        federation=str(meta["federation"]),
        federation_id=str(owner.get("federation_id", "")),
        algorithm=str(meta["algorithm"]),
        rounds=int(meta["rounds"]),
        seed=int(meta["seed"]),
        model=spec,
        fingerprint=str(meta["fingerprint"]),
        plan=ModelPlan(tasks, int(meta["fusion_layers"])),
        tasks=exported,
        batch_size=int(evaluation["batch_size"]),
        threads=int(evaluation["threads"]),
        amp=bool(evaluation["amp"]),
        exported={
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "by": f"tap-client export {version}".strip(),
            "from": str(state_dir.resolve()),
        },
    )
    return card, values


def _check_destination(out_dir: Path) -> None:
    """``--out`` may be new, empty, or an earlier export (replaced); anything else is refused untouched."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file (fix: choose a directory path)")
    if any(out_dir.iterdir()) and not _is_export(out_dir):
        raise ExportError(
            f"--out {out_dir} is not empty and holds no earlier export; nothing was written "
            "(fix: choose a new or empty directory)"
        )


def _is_export(directory: Path) -> bool:
    try:
        return json.loads((directory / MODEL_JSON).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _copy_tokenizer(spec: ModelSpec, target: Path) -> None:
    """The tokenizer files the model's token ids refer to (MiniLM's unless ``model.tokenizer`` names another)."""
    source = Path(spec.tokenizer) if spec.tokenizer else minilm_path()
    if not (source / "vocab.txt").is_file():
        raise ExportError(
            f"the model's tokenizer {source} has no vocab.txt (fix: install the base model it was "
            "trained with on this machine)"
        )
    target.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
