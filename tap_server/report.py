"""The federation report (same schema for ``tap simulate``, ``tap demo`` and ``tap-server``).

Everything except the ``timing`` section is a pure function of config, data and
seed: the same seed gives the same report.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

from tap_core.config import FederationConfig, to_mapping
from tap_core.messages import SiloResult

REPORT_VERSION = 1


def mean_over_silos(results: list[SiloResult]) -> float | None:
    """Mean over silos of each silo's mean primary score (TAP_SPEC §6: the mean over clients); None without results."""
    per_silo = [mean(t.primary for t in r.tasks) for r in results if r.tasks]
    return mean(per_silo) if per_silo else None


def _task_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean primary score of one task over the silos that hold it, beside its mean trivial baseline."""
    baselines = [r["baseline"] for r in rows if r["baseline"] is not None]
    return {
        "mean_primary": mean(r["primary"] for r in rows),
        "silos": len(rows),
        "mean_baseline": mean(baselines) if baselines else None,
    }


def transport_summary(transport: list[dict[str, Any]], trainable_bytes: dict[str, int]) -> dict[str, Any]:
    """Wire bytes per client-round (both directions) against 2x the trainable bytes of its components."""
    if not transport:
        return {}
    per: dict[tuple[str, int], dict[str, int]] = {}
    for t in transport:
        if t["direction"] not in ("down", "up"):
            continue
        entry = per.setdefault((t["silo"], t["round"]), {"payload_bytes": 0, "wire_bytes": 0})
        entry["payload_bytes"] += t["payload_bytes"]
        entry["wire_bytes"] += t["wire_bytes"]
    rows = []
    for (silo, round_index), entry in sorted(per.items()):
        budget = 2 * trainable_bytes.get(silo, 0)
        rows.append(
            {
                "silo": silo,
                "round": round_index,
                **entry,
                "trainable_bytes_x2": budget,
                "ratio": entry["wire_bytes"] / budget if budget else None,
            }
        )
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    total_payload = sum(t["payload_bytes"] for t in transport)
    total_wire = sum(t["wire_bytes"] for t in transport)
    return {
        "payload_bytes": total_payload,
        "wire_bytes": total_wire,
        "framing_overhead": (total_wire / total_payload - 1.0) if total_payload else 0.0,
        "max_ratio_per_client_round": max(ratios) if ratios else None,
        "per_client_round": rows,
    }


def build_report(
    *,
    config: FederationConfig,
    results: list[SiloResult],
    replacements: dict[str, dict[str, int]],
    wire: dict[str, int],
    history: list[dict[str, Any]],
    transport: list[dict[str, Any]],
    trainable_bytes: dict[str, int],
    dropped: list[dict[str, Any]],
    fingerprint: str,
    timing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    tasks = [
        {
            "silo": t.silo,
            "task": t.task,
            "kind": t.kind,
            "metrics": t.metrics,
            "primary": t.primary,
            "steps": t.steps,
            "baseline": t.baseline,
            "test_examples": t.test_examples,
        }
        for r in results
        for t in r.tasks
    ]
    per_task: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        per_task.setdefault(t["task"], []).append(t)
    report = {
        "version": REPORT_VERSION,
        "algorithm": config.algorithm,
        "scenario": config.name,
        "seed": config.seed,
        "rounds": config.rounds,
        "tasks": tasks,
        "replacements": {s: dict(sorted(c.items())) for s, c in sorted(replacements.items())},
        "wire": {"bytes_down": int(wire["bytes_down"]), "bytes_up": int(wire["bytes_up"]), "dtype": config.wire.dtype},
        "mean_primary": mean_over_silos(results),
        "per_task": {name: _task_summary(rows) for name, rows in sorted(per_task.items())},
        "kd_losses": {r.silo: r.kd_losses for r in results if r.kd_losses},
        "stage1_metrics": {r.silo: r.stage1_metrics for r in results if r.stage1_metrics},
        "history": history,
        "dropped": dropped,
        "trainable_bytes": trainable_bytes,
        "model": {"spec": to_mapping(config.model), "fingerprint": fingerprint},
        "config": to_mapping(config),
    }
    summary = transport_summary(transport, trainable_bytes)
    if summary:
        report["transport"] = summary
    report["timing"] = timing or {}
    return report
