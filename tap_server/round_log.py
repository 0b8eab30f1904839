"""The federation's round log: what the report is made of besides the silos' results.

History (per closed round: selection, losses, replacements), replacement counts,
the wire counters (payload bytes at the wire dtype, the report's ``wire``), the
transport records (what each tensor stream really took, the report's
``transport``), timing events and dropped silos. Persisted with the federation's
state, so a restarted server reports the whole federation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from tap_core.config import FederationConfig
from tap_core.layout import payload_bytes
from tap_core.messages import RoundStats, SiloResult
from tap_core.model.tap_model import ComponentValues
from tap_core.store import JsonRecord, json_codec
from tap_server.federation_api import Transfer
from tap_server.report import build_report

Record = dict[str, Any]


@dataclass
class RoundLog(JsonRecord):
    history: list[Record] = field(default_factory=list)
    replacements: dict[str, dict[str, int]] = field(default_factory=dict)  # silo -> task -> adoptions
    wire: dict[str, int] = field(default_factory=lambda: {"bytes_down": 0, "bytes_up": 0})
    transport: list[Record] = field(default_factory=list)
    timing: list[Record] = field(default_factory=list)
    dropped: list[Record] = field(default_factory=list)
    # (silo, round, direction) already in ``wire``: a repeated download or a re-sent upload counts once
    counted: set[tuple[str, int, str]] = field(
        default_factory=set, metadata=json_codec(lambda c: sorted(list(k) for k in c), lambda c: {tuple(k) for k in c})
    )

    def count_payload(self, silo: str, round_index: int, direction: str, values: ComponentValues, dtype: str) -> None:
        """Add a payload to the wire counters, once per silo, round and direction."""
        key = (silo, round_index, direction)
        if key in self.counted:
            return
        self.counted.add(key)
        self.wire["bytes_up" if direction == "up" else "bytes_down"] += payload_bytes(values, dtype)

    def forget_uploads(self, round_index: int) -> None:
        """The uploads of a round in progress were lost (a restart): they will be counted when sent again."""
        self.counted = {k for k in self.counted if not (k[1] == round_index and k[2] == "up")}

    def record_transfer(self, transfer: Transfer) -> None:
        self.transport.append(
            {
                "silo": transfer.silo,
                "round": transfer.round,
                "direction": transfer.direction,
                "payload_bytes": transfer.payload_bytes,
                "wire_bytes": transfer.wire_bytes,
            }
        )
        self.timing.append(
            {
                "silo": transfer.silo,
                "round": transfer.round,
                "direction": transfer.direction,
                "stream_seconds": transfer.seconds,
            }
        )

    def close_round(
        self,
        round_index: int,
        selected: list[str],
        received: dict[str, RoundStats],
        seconds: float,
        aggregation_seconds: float,
        refused: Mapping[str, str] | None = None,
    ) -> Record:
        """Log an aggregated round; returns its history record (``refused``: silo -> why its update was refused)."""
        task_losses: dict[str, list[float]] = {}
        for stats in received.values():
            for task, loss in stats.task_losses.items():
                task_losses.setdefault(task, []).append(loss)
        ordered = sorted(received.items())
        record: Record = {
            "round": round_index,
            "selected": list(selected),
            "received": sorted(received),
            "dropped": sorted(set(selected) - set(received)),
            "task_losses": {t: sum(v) / len(v) for t, v in sorted(task_losses.items())},
            "silo_losses": {s: dict(st.task_losses) for s, st in ordered},
            "personal_losses": {s: dict(st.personal_losses) for s, st in ordered if st.personal_losses},
            "replacements": {s: [e.task for e in st.replacements] for s, st in ordered if st.replacements},
            "scores": {s: {"round": st.scores_round, "primary": dict(st.scores)} for s, st in ordered if st.scores},
        }
        if refused:  # only when it happened: records of ordinary rounds stay as they were
            record["refused"] = dict(sorted(refused.items()))
        self.history.append(record)
        for silo, tasks in record["replacements"].items():
            counts = self.replacements.setdefault(silo, {})
            for task in tasks:
                counts[task] = counts.get(task, 0) + 1
        self.timing.append({"round": round_index, "seconds": seconds, "aggregation_seconds": aggregation_seconds})
        return record

    def drop_at_finish(self, missing: list[str]) -> None:
        self.dropped.append({"phase": "finish", "silos": missing})

    def report(
        self, config: FederationConfig, results: list[SiloResult], trainable_bytes: dict[str, int], fingerprint: str
    ) -> dict[str, Any]:
        return build_report(
            config=config,
            results=results,
            replacements=self.replacements,
            wire=self.wire,
            history=self.history,
            transport=self.transport,
            trainable_bytes=trainable_bytes,
            dropped=self.dropped,
            fingerprint=fingerprint,
            timing={"events": self.timing},
        )
