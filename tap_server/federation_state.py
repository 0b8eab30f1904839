"""The federation's persisted state: one record, each field named once.

``state.json`` holds :meth:`FederationState.to_json`; the global component values
live in the safetensors file it points at (``tap_core.store.CheckpointStore``:
tensors first, then the JSON, atomically). A restarted server reads both back
with :meth:`FederationState.load`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tap_core.config import FederationConfig, to_mapping
from tap_core.errors import ConfigError, TapError
from tap_core.layout import Layout, layout_from_json, layout_to_json
from tap_core.messages import SiloDeclaration, SiloResult
from tap_core.model.tap_model import ComponentValues, ModelPlan
from tap_core.plan import plan_from_json, plan_to_json
from tap_core.store import NOT_IN_JSON, CheckpointStore, JsonRecord, json_codec, json_each
from tap_server.federation_api import WAITING
from tap_server.round_log import RoundLog

STATE_VERSION = 2
RESUMABLE_CHANGES = {"deadlines", "expected_silos", "limits"}  # everything else must match the state being resumed


@dataclass
class FederationState(JsonRecord):
    federation_id: str
    config: dict[str, Any]  # the federation config it runs, as a mapping (a resumed server must run the same)
    fingerprint: str  # the frozen base model's
    version: int = STATE_VERSION
    phase: str = WAITING
    round: int = 0
    attempt: int = 0  # retries of the current round (a deadline with too few updates)
    selected: list[str] = field(default_factory=list)
    declarations: dict[str, SiloDeclaration] = field(
        default_factory=dict, metadata=json_each(SiloDeclaration.to_json, SiloDeclaration.from_json)
    )
    # fixed at the start, never rebuilt from declarations
    plan: ModelPlan | None = field(
        default=None, metadata=json_codec(lambda p: p and plan_to_json(p), lambda p: p and plan_from_json(p))
    )
    silo_plans: dict[str, ModelPlan] = field(default_factory=dict, metadata=json_each(plan_to_json, plan_from_json))
    layout: Layout = field(default_factory=dict, metadata=json_codec(layout_to_json, layout_from_json))
    results: dict[str, SiloResult] = field(
        default_factory=dict, metadata=json_each(SiloResult.to_json, SiloResult.from_json)
    )
    log: RoundLog = field(default_factory=RoundLog, metadata=json_codec(RoundLog.to_json, RoundLog.from_json))
    global_values: ComponentValues = field(default_factory=dict, metadata=NOT_IN_JSON)  # the safetensors file

    @classmethod
    def new(cls, config: FederationConfig, fingerprint: str) -> "FederationState":
        return cls(federation_id=uuid.uuid4().hex, config=to_mapping(config), fingerprint=fingerprint)

    def save(self, store: CheckpointStore, with_values: bool) -> None:
        """Persist (the tensors only when they changed: a JSON-only checkpoint keeps pointing at the last ones)."""
        tag = f"r{self.round}-a{self.attempt}-{self.phase}"
        store.save(self.to_json(), self.global_values if with_values else None, tag=tag)

    @classmethod
    def load(cls, store: CheckpointStore, config: FederationConfig, fingerprint: str) -> "FederationState":
        """The state in ``store``, refused unless it was written for ``config`` and ``fingerprint``."""
        where = f"state {store.json_path}"
        data, values = store.load()
        if data.get("version") != STATE_VERSION:
            raise ConfigError(
                where,
                f"was written by another version of tap-server (state version {data.get('version')}, "
                f"this one reads {STATE_VERSION})",
                "use a new --state directory",
            )
        saved, current = data.get("config", {}), to_mapping(config)
        defaults = to_mapping(FederationConfig())
        for key in sorted(set(saved) | set(current)):
            # a section the saved config lacks was added since (an older server wrote it): it ran with the default
            if key not in RESUMABLE_CHANGES and saved.get(key, defaults.get(key)) != current.get(key):
                raise ConfigError(
                    where,
                    f"was written with a different {key} ({saved.get(key)!r}, now {current.get(key)!r})",
                    "use the original federation config (only deadlines, expected_silos and limits may change), "
                    "or a new --state directory",
                )
        if data.get("fingerprint") != fingerprint:
            raise ConfigError(
                where,
                "was written for another base model fingerprint",
                "use the same model weights, or a new --state directory",
            )
        state = cls.from_json(data, global_values=values or {})
        state.config = current
        if state.phase != WAITING and not state.global_values:
            raise TapError(f"{where} has no global tensors")
        return state
