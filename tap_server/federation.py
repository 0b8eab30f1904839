"""The federation state machine: joins, rounds, aggregation, stage 2, the report.

No gRPC here: the servicer and ``tap simulate`` call the same methods with plain
objects. One lock owns all state. Joins, the start of every round (with the
global values and the selection), every result and the end are persisted
atomically when a state directory is given, so a restarted server resumes from
the last completed round with identical weights; uploads of a round in progress
are asked for again (agents keep them until the round closes).

Phases: waiting_for_silos -> training (round 1..R) -> finishing -> done.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tap_core.algorithms import get_algorithm
from tap_core.config import FederationConfig, to_mapping
from tap_core.errors import ConfigError, TapError
from tap_core.messages import NOT_JOINED, ClientUpdate, RoundStats, SiloDeclaration, SiloResult
from tap_core.model import build_backbone
from tap_core.model.tap_model import ComponentValues, ModelPlan, TapModel
from tap_core.plan import check_label_spaces, component_weights, plan_from_json, plan_to_json, silo_plan, union_plan, united_tasks
from tap_core.scenario import check_shared_tasks
from tap_core.config import SiloSpec
from tap_core.seeding import derive_seed
from tap_core.store import CheckpointStore, atomic_write_json
from tap_core.wire_size import layout_bytes, payload_bytes
from tap_server.aggregation import StreamingAggregator
from tap_server.metrics import ServerMetrics
from tap_server.report import build_report
from tap_server.validation import (
    UpdateRejected,
    check_declaration,
    check_result,
    check_stats,
    check_update,
)

log = logging.getLogger(__name__)

WAITING, TRAINING, FINISHING, DONE = "waiting_for_silos", "training", "finishing", "done"


class JoinRefused(TapError):
    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class Assignment:
    """What a silo should do now."""

    action: str  # wait | train | finish | done
    round: int = 0
    components: list[str] = field(default_factory=list)
    retry_after_s: float = 1.0
    message: str = ""


class Federation:
    def __init__(
        self,
        config: FederationConfig,
        *,
        state_dir: Path | None = None,
        metrics: ServerMetrics | None = None,
        expected_silos: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.algorithm = get_algorithm(config)
        self.metrics = metrics
        self.clock = clock
        self.expected_silos = config.expected_silos or expected_silos
        self.fingerprint = build_backbone(config.model).fingerprint
        self.store = CheckpointStore(Path(state_dir), "state") if state_dir else None
        self.state_dir = Path(state_dir) if state_dir else None
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)

        self.federation_id = uuid.uuid4().hex  # replaced by the stored one on resume
        self.phase = WAITING
        self.round = 0
        self.attempt = 0
        self.declarations: dict[str, SiloDeclaration] = {}
        self.plan: ModelPlan | None = None
        self.silo_plans: dict[str, ModelPlan] = {}
        self.manifest: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        self.global_values: ComponentValues = {}
        self.selected: list[str] = []
        self.received: dict[str, RoundStats] = {}
        self.aggregator = StreamingAggregator()
        self.history: list[dict[str, Any]] = []
        self.replacements: dict[str, dict[str, int]] = {}
        self.results: dict[str, SiloResult] = {}
        self.wire = {"bytes_down": 0, "bytes_up": 0}
        self.transport: list[dict[str, Any]] = []
        self.timing: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.last_seen: dict[str, float] = {}
        self.told_done: set[str] = set()
        self.deadline: float = self.clock() + config.deadlines.join_s
        self.round_started = self.clock()
        self._counted: set[tuple[str, int, str]] = set()
        if self.store is not None and self.store.exists():
            self._resume()
        self._publish_metrics()

    # ------------------------------------------------------------------ joins

    def register(self, decl: SiloDeclaration) -> None:
        """Admit a silo (or a returning one). Raises JoinRefused saying what differs."""
        with self._lock:
            try:
                check_declaration(decl)
            except UpdateRejected as exc:
                raise JoinRefused(exc.reason, str(exc)) from exc
            if decl.fingerprint != self.fingerprint:
                raise JoinRefused(
                    "fingerprint_mismatch",
                    f"silo {decl.silo} runs base model {decl.fingerprint[:16]}…, the federation runs {self.fingerprint[:16]}…: "
                    f"the frozen backbone weights, the tokenizer or the model spec differ "
                    f"(model: {to_mapping(self.config.model)}); use the federation's model spec and the same local files",
                )
            known = self.declarations.get(decl.silo)
            if self.plan is not None:
                if known is None:
                    raise JoinRefused("federation_started",
                                      f"silo {decl.silo} joins after the federation started; its plan is fixed. "
                                      "Raise expected_silos (or join before the join deadline) and restart the federation")
                if _comparable(known) != _comparable(decl):
                    raise JoinRefused("declaration_changed",
                                      f"silo {decl.silo} declares other tasks, sample counts or labels than when it joined; "
                                      "the federation's plan is fixed: restore the silo's data and config")
            else:
                others = [d for s, d in sorted(self.declarations.items()) if s != decl.silo]
                try:  # conflicts only; completeness (e.g. two labels per task) is checked at the start
                    check_shared_tasks(tuple(SiloSpec(d.silo, d.tasks) for d in [*others, decl]), "federation")
                    check_label_spaces([*others, decl])
                except ConfigError as exc:
                    raise JoinRefused("tasks_conflict", str(exc)) from exc
                self.declarations[decl.silo] = decl
                self._persist(with_values=False)
            self._touch(decl.silo)
            log.info("silo %s joined (%d tasks, %d registered)", decl.silo, len(decl.tasks), len(self.declarations))
            if self.phase == WAITING and self.expected_silos and len(self.declarations) >= self.expected_silos:
                try:
                    self._start()
                except ConfigError as exc:
                    del self.declarations[decl.silo]
                    self._persist(with_values=False)
                    raise JoinRefused("tasks_conflict", f"the federation cannot start with silo {decl.silo}: {exc}") from exc
            self._publish_metrics()
            self.changed.notify_all()

    def touch(self, silo: str) -> None:
        with self._lock:
            self._touch(silo)

    def _touch(self, silo: str) -> None:
        self.last_seen[silo] = self.clock()

    def silo_plan(self, silo: str) -> ModelPlan:
        with self._lock:
            if self.plan is None:
                raise TapError("the federation has not started yet: no plan")
            return self.silo_plans[silo]

    def shared_components(self, silo: str) -> list[str]:
        return self.algorithm.shared_components(self.silo_plan(silo))

    # ----------------------------------------------------------------- rounds

    def _start(self) -> None:
        """Fix the plan (united label spaces), initialise the global model, begin round 1."""
        decls = [self.declarations[s] for s in sorted(self.declarations)]
        tasks = united_tasks(decls)
        fusion = self.config.model.fusion_layers
        self.plan = union_plan(decls, fusion)
        self.silo_plans = {d.silo: silo_plan(d, tasks, fusion) for d in decls}
        model = TapModel(self.plan, build_backbone(self.config.model), self.config.seed)
        self.global_values = model.values()
        self.manifest = model.manifest()
        log.info("federation starts: %d silos, %d tasks, %d components", len(decls), len(tasks), len(self.plan.components))
        self._begin_round()

    def _select(self, round_index: int, attempt: int) -> list[str]:
        silos = sorted(self.declarations)
        k = self.config.clients_per_round
        if k is None or k >= len(silos):
            return silos
        rng = random.Random(derive_seed(self.config.seed, "select", round_index, attempt))
        return sorted(rng.sample(silos, k))

    def _begin_round(self) -> None:
        self.round += 1
        self.selected = self._select(self.round, self.attempt)
        self.received = {}
        self.aggregator = StreamingAggregator()
        self.phase = TRAINING
        self.round_started = self.clock()
        self.deadline = self.round_started + self.config.deadlines.round_s
        log.info("round %d/%d: selected %s", self.round, self.config.rounds, ", ".join(self.selected))
        self._persist(with_values=self.attempt == 0)

    def assignment(self, silo: str) -> Assignment:
        with self._lock:
            self._touch(silo)
            if silo not in self.declarations:
                return Assignment("wait", message=NOT_JOINED)
            if self.phase == TRAINING and silo in self.selected and silo not in self.received:
                return Assignment("train", self.round, self.shared_components(silo))
            if self.phase == FINISHING and silo not in self.results:
                return Assignment("finish", self.round, self.shared_components(silo))
            if self.phase == DONE:
                self.told_done.add(silo)
                return Assignment("done", self.round)
            return Assignment("wait", self.round, message=self.phase)

    def wait_for_assignment(self, silo: str, timeout: float) -> Assignment:
        """Long poll: the silo's assignment as soon as it is something other than 'wait' (or at ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                current = self.assignment(silo)
                remaining = deadline - time.monotonic()
                if current.action != "wait" or current.message == NOT_JOINED or remaining <= 0:
                    return current
                self.changed.wait(remaining)

    def payload(self, silo: str, round_index: int) -> ComponentValues:
        """Current global values of the silo's shared components, for ``round_index`` (or the final model)."""
        with self._lock:
            current = self.assignment(silo)
            if current.action not in ("train", "finish") or current.round != round_index:
                raise UpdateRejected("stale_round",
                                     f"silo {silo} asked for round {round_index}; its assignment is {current.action} {current.round}")
            values = {c: self.global_values[c] for c in current.components}
            self._count_bytes(silo, round_index, "down" if current.action == "train" else "final", values)
            return values

    def submit_update(self, update: ClientUpdate) -> None:
        """Validate and fold in one silo's upload; closes the round when the last one arrives."""
        with self._lock:
            self._touch(update.silo)
            if self.phase != TRAINING or update.round != self.round:
                reason = "stale_round" if update.round <= self.round else "future_round"
                raise UpdateRejected(reason, f"update for round {update.round}, but the federation is in {self.phase} "
                                             f"round {self.round}")
            if update.silo not in self.selected:
                raise UpdateRejected("not_selected", f"silo {update.silo} is not selected in round {self.round}")
            if update.silo in self.received:
                raise UpdateRejected("duplicate", f"silo {update.silo} already uploaded round {self.round}")
            plan = self.silo_plans[update.silo]
            shared = self.algorithm.shared_components(plan)
            expected_weights = component_weights(plan, self.declarations[update.silo].train_samples, shared)
            check_update(update, {c: self.manifest[c] for c in shared}, set(plan.components), expected_weights)
            check_stats(update.stats, {t.name for t in plan.tasks})
            self.aggregator.add(update.values, update.weights)
            self.received[update.silo] = update.stats
            self._count_bytes(update.silo, update.round, "up", update.values)
            if self.metrics:
                self.metrics.updates_received.inc()
            log.info("round %d: update from %s (%d/%d)", self.round, update.silo, len(self.received), len(self.selected))
            if len(self.received) == len(self.selected):
                self._close_round()
            self.changed.notify_all()

    def _close_round(self) -> None:
        if self.metrics:
            self.metrics.set_phase("aggregating")
        started = time.perf_counter()
        self.global_values = self.aggregator.result(self.global_values)
        seconds = time.perf_counter() - started
        dropped = sorted(set(self.selected) - set(self.received))
        task_losses: dict[str, list[float]] = {}
        for stats in self.received.values():
            for task, loss in stats.task_losses.items():
                task_losses.setdefault(task, []).append(loss)
        record = {
            "round": self.round,
            "selected": list(self.selected),
            "received": sorted(self.received),
            "dropped": dropped,
            "task_losses": {t: sum(v) / len(v) for t, v in sorted(task_losses.items())},
            "silo_losses": {s: dict(st.task_losses) for s, st in sorted(self.received.items())},
            "personal_losses": {s: dict(st.personal_losses) for s, st in sorted(self.received.items()) if st.personal_losses},
            "replacements": {s: [e.task for e in st.replacements] for s, st in sorted(self.received.items()) if st.replacements},
            "scores": {s: {"round": st.scores_round, "primary": dict(st.scores)}
                       for s, st in sorted(self.received.items()) if st.scores},
        }
        self.history.append(record)
        for silo, stats in sorted(self.received.items()):
            for event in stats.replacements:
                counts = self.replacements.setdefault(silo, {})
                counts[event.task] = counts.get(event.task, 0) + 1
                if self.metrics:
                    self.metrics.replacements.labels(task=event.task).inc()
        self.timing.append({"round": self.round, "seconds": self.clock() - self.round_started,
                            "aggregation_seconds": seconds})
        self.attempt = 0
        if self.metrics:
            self.metrics.aggregation_seconds.observe(seconds)
            self.metrics.rounds_completed.inc()
            self.metrics.clients_dropped.inc(len(dropped))
            for task, loss in record["task_losses"].items():
                self.metrics.task_loss.labels(task=task).set(loss)
        log.info("round %d aggregated in %.3fs (losses %s)", self.round, seconds,
                 {t: round(v, 4) for t, v in record["task_losses"].items()})
        if self.round >= self.config.rounds:
            self.phase = FINISHING
            self.deadline = self.clock() + self.config.deadlines.finish_s
            self._persist(with_values=True)
        else:
            self._begin_round()  # persists the new global values with the next round's selection
        self._publish_metrics()

    def submit_result(self, result: SiloResult) -> None:
        with self._lock:
            self._touch(result.silo)
            if self.phase != FINISHING:
                raise UpdateRejected("stale_round", f"results are accepted in the finishing phase, not in {self.phase}")
            if result.silo not in self.silo_plans:
                raise UpdateRejected("not_selected", f"silo {result.silo} is not part of this federation's plan")
            if result.silo in self.results:
                raise UpdateRejected("duplicate", f"silo {result.silo} already reported its results")
            check_result(result, {t.name for t in self.silo_plans[result.silo].tasks})
            self.results[result.silo] = result
            if self.metrics:
                for task, loss in result.kd_losses.items():
                    self.metrics.kd_loss.labels(task=task).set(loss)
            log.info("silo %s reported results (%d/%d)", result.silo, len(self.results), len(self.declarations))
            if len(self.results) == len(self.declarations):
                self._finish()
            else:
                self._persist(with_values=False)
            self._publish_metrics()
            self.changed.notify_all()

    def _finish(self) -> None:
        self.phase = DONE
        self._persist(with_values=False)
        report = self.report()
        if self.state_dir is not None:
            atomic_write_json(self.state_dir / "report.json", report)
        log.info("federation done: mean primary %s", report["mean_primary"])
        self._publish_metrics()

    # ------------------------------------------------------------ deadlines

    def tick(self) -> None:
        """Apply deadlines (called periodically by the daemon; simulate never needs it)."""
        with self._lock:
            now = self.clock()
            if now < self.deadline:
                return
            if self.phase == WAITING and len(self.declarations) >= self.config.min_clients:
                log.warning("join deadline passed with %d silos: starting without the others", len(self.declarations))
                self._start()
            elif self.phase == TRAINING:
                if len(self.received) >= self.config.min_clients:
                    log.warning("round %d deadline: closing with %d of %d updates", self.round, len(self.received),
                                len(self.selected))
                    self._close_round()
                else:
                    log.warning("round %d deadline: only %d updates (< min_clients %d); retrying the round",
                                self.round, len(self.received), self.config.min_clients)
                    if self.metrics:
                        self.metrics.clients_dropped.inc(len(set(self.selected) - set(self.received)))
                    self.round -= 1
                    self.attempt += 1
                    self._begin_round()
            elif self.phase == FINISHING:
                missing = sorted(set(self.declarations) - set(self.results))
                log.warning("finish deadline: no results from %s", ", ".join(missing))
                if self.metrics:
                    self.metrics.clients_dropped.inc(len(missing))
                self.dropped.append({"phase": "finish", "silos": missing})
                self._finish()
            else:
                return
            self._publish_metrics()
            self.changed.notify_all()

    # ------------------------------------------------------------ accounting

    def _count_bytes(self, silo: str, round_index: int, direction: str, values: ComponentValues) -> None:
        key = (silo, round_index, direction)
        if key in self._counted:
            return
        self._counted.add(key)
        size = payload_bytes(values, self.config.wire.dtype)
        self.wire["bytes_up" if direction == "up" else "bytes_down"] += size

    def record_transport(self, silo: str, round_index: int, direction: str, payload: int, wire: int, seconds: float) -> None:
        """Bytes a transfer really took on the wire (payload + framing), for the report's transport section."""
        with self._lock:
            self.transport.append({"silo": silo, "round": round_index, "direction": direction, "payload_bytes": payload,
                                   "wire_bytes": wire})
            self.timing.append({"silo": silo, "round": round_index, "direction": direction, "stream_seconds": seconds})

    def connected(self) -> int:
        """Joined silos heard from within three heartbeat intervals."""
        with self._lock:
            horizon = self.clock() - 3 * self.config.deadlines.heartbeat_s
            return sum(1 for s, t in self.last_seen.items() if t >= horizon and s in self.declarations)

    def _publish_metrics(self) -> None:
        if not self.metrics:
            return
        m = self.metrics
        m.round.set(self.round)
        m.rounds_total.set(self.config.rounds)
        m.set_phase(self.phase)
        m.clients_joined.set(len(self.declarations))
        m.clients_selected.set(len(self.selected) if self.phase == TRAINING else 0)
        m.clients_connected.set(self.connected())
        m.results_received.set(len(self.results))

    # ---------------------------------------------------------------- report

    def report(self) -> dict[str, Any]:
        with self._lock:
            return build_report(
                config=self.config,
                results=[self.results[s] for s in sorted(self.results)],
                replacements=self.replacements,
                wire=self.wire,
                history=self.history,
                transport=self.transport,
                trainable_bytes={s: layout_bytes({c: self.manifest[c] for c in self.shared_components(s)},
                                                 self.config.wire.dtype) for s in sorted(self.silo_plans)},
                dropped=self.dropped,
                fingerprint=self.fingerprint,
                timing={"events": self.timing},
            )

    # ----------------------------------------------------------- persistence

    def _snapshot(self) -> dict[str, Any]:
        return {
            "version": 1,
            "federation_id": self.federation_id,
            "config": to_mapping(self.config),
            "fingerprint": self.fingerprint,
            "phase": self.phase,
            "round": self.round,
            "attempt": self.attempt,
            "selected": self.selected,
            "declarations": {s: d.to_json() for s, d in sorted(self.declarations.items())},
            "plan": plan_to_json(self.plan) if self.plan else None,
            "silo_plans": {s: plan_to_json(p) for s, p in sorted(self.silo_plans.items())},
            "manifest": {c: [[n, list(shape)] for n, shape in t] for c, t in self.manifest.items()},
            "history": self.history,
            "replacements": self.replacements,
            "results": {s: r.to_json() for s, r in sorted(self.results.items())},
            "wire": self.wire,
            "transport": self.transport,
            "timing": self.timing,
            "dropped": self.dropped,
            "counted": sorted(list(k) for k in self._counted),
        }

    def _persist(self, with_values: bool) -> None:
        if self.store is None:
            return
        started = time.perf_counter()
        try:
            values = self.global_values if with_values else None
            self.store.save(self._snapshot(), values, tag=f"r{self.round}-a{self.attempt}-{self.phase}")
        except OSError as exc:
            if self.metrics:
                self.metrics.state_write_failures.inc()
            log.error("state write failed: %s", exc)
            raise
        if self.metrics:
            self.metrics.state_writes.inc()
            self.metrics.state_write_seconds.observe(time.perf_counter() - started)

    def _resume(self) -> None:
        state, values = self.store.load()
        saved, current = state.get("config", {}), to_mapping(self.config)
        for key in sorted(set(saved) | set(current)):
            if key in RESUMABLE_CHANGES or saved.get(key) == current.get(key):
                continue
            raise ConfigError(f"state {self.store.json_path}", f"was written with a different {key} "
                              f"({saved.get(key)!r}, now {current.get(key)!r})",
                              "use the original federation config (only deadlines and expected_silos may change), "
                              "or a new --state directory")
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"state {self.store.json_path}", "was written for another base model fingerprint",
                              "use the same model weights, or a new --state directory")
        self.federation_id = state["federation_id"]
        self.declarations = {s: SiloDeclaration.from_json(d) for s, d in state["declarations"].items()}
        self.phase = state["phase"]
        self.round = int(state["round"])
        self.attempt = int(state.get("attempt", 0))
        self.history = state["history"]
        self.replacements = state["replacements"]
        self.results = {s: SiloResult.from_json(r) for s, r in state["results"].items()}
        self.wire = state["wire"]
        self.transport = state.get("transport", [])
        self.timing = state.get("timing", [])
        self.dropped = state.get("dropped", [])
        self._counted = {tuple(k) for k in state.get("counted", [])}
        if self.phase != WAITING:
            # the plan as it was fixed at the start, never rebuilt from declarations
            self.plan = plan_from_json(state["plan"])
            self.silo_plans = {s: plan_from_json(p) for s, p in state["silo_plans"].items()}
            self.manifest = {c: [(n, tuple(shape)) for n, shape in t] for c, t in state["manifest"].items()}
            if values is None:
                raise TapError(f"state {self.store.json_path} has no global tensors")
            self.global_values = values
        if self.phase == TRAINING:
            # the round in progress restarts: the same selection, uploads are asked for again
            self.selected = list(state["selected"])
            self.received = {}
            self.aggregator = StreamingAggregator()
            self._counted = {k for k in self._counted if not (k[1] == self.round and k[2] == "up")}
            self.round_started = self.clock()
            self.deadline = self.round_started + self.config.deadlines.round_s
        elif self.phase == FINISHING:
            self.deadline = self.clock() + self.config.deadlines.finish_s
        log.info("resumed from %s: phase %s, round %d", self.store.json_path, self.phase, self.round)


RESUMABLE_CHANGES = {"deadlines", "expected_silos"}  # everything else must match the state being resumed


def _comparable(decl: SiloDeclaration) -> dict[str, Any]:
    """A declaration without what may legitimately change between an agent's restarts (its device)."""
    data = decl.to_json()
    data.pop("device", None)
    return data
