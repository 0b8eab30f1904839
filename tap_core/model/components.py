"""Component names: the stable wire contract of which parameters move together.

A component is a named group of trainable parameters. The names follow
TAP_SPEC §2; per-domain adapter experts are components of their own
(``adapter.mote.<side>.<domain>``, ``adapter.mome.<side>.<domain>``) so that a
silo only ever sends or receives the adapters of its own domains.
"""

from __future__ import annotations

from tap_core.config import SHARED, TaskSpec


def encoder(modality: str) -> str:
    return f"encoder.{modality}"


PROJ_SHARED = "proj.shared"


def mote(side: str) -> str:
    return f"mote.{side}"


def mome(side: str) -> str:
    return f"mome.{side}"


def mote_expert(modality_side: str, family_side: str, layer: int) -> str:
    return f"expert.mote.{modality_side}.{family_side}.{layer}"


def mome_expert(family_side: str, modality_side: str, layer: int) -> str:
    return f"expert.mome.{family_side}.{modality_side}.{layer}"


def mote_adapter(modality_side: str, domain: str) -> str:
    return f"adapter.mote.{modality_side}.{domain}"


def mome_adapter(family_side: str, domain: str) -> str:
    return f"adapter.mome.{family_side}.{domain}"


def head(task: str) -> str:
    return f"head.{task}"


def routing_paths(task: TaskSpec) -> list[tuple[str, str, tuple[str, ...]]]:
    """The four routes of TAP_SPEC §2 as (modality side, family side, modalities it reads).

    The two routes through the shared modality side read the tokens of every
    modality of the input at once (one joint sequence), so image and question
    tokens of a VQA example attend to each other; the modality-specific routes
    read one modality each. With a single modality this is exactly the spec's
    four paths per modality.
    """
    paths: list[tuple[str, str, tuple[str, ...]]] = [
        (SHARED, SHARED, task.modalities),
        (SHARED, task.family, task.modalities),
    ]
    for modality in task.modalities:
        paths.append((modality, task.family, (modality,)))
        paths.append((modality, SHARED, (modality,)))
    return paths


def task_components(task: TaskSpec, fusion_layers: int) -> list[str]:
    """Every component task ``task``'s forward pass uses (what replacement copies)."""
    names: set[str] = {PROJ_SHARED, head(task.name)}
    for modality in task.modalities:
        names.add(encoder(modality))
    for modality_side, family_side, _ in routing_paths(task):
        names.update({mote(modality_side), mome(family_side)})
        names.add(mote_adapter(modality_side, task.domain))
        names.add(mome_adapter(family_side, task.domain))
        for layer in range(fusion_layers):
            names.add(mote_expert(modality_side, family_side, layer))
            names.add(mome_expert(family_side, modality_side, layer))
    return sorted(names)


def components_for_tasks(tasks: list[TaskSpec] | tuple[TaskSpec, ...], fusion_layers: int) -> list[str]:
    names: set[str] = set()
    for task in tasks:
        names.update(task_components(task, fusion_layers))
    return sorted(names)


def component_kind(name: str) -> str:
    """The first segment (encoder, proj, mote, mome, expert, adapter, head): a metrics label."""
    return name.split(".", 1)[0]
