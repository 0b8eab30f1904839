"""The federation state machine: joins, selection, rounds, deadlines, stage 2.

No gRPC here: the servicer, the daemon and ``tap simulate`` call the methods
below with plain objects and get plain objects back (``federation_api``); no
caller reads an attribute. One lock owns all state. Joins, the start of every
round (with the global values and the selection), every result and the end are
persisted atomically when a state directory is given (``federation_state``), so
a restarted server resumes from the last completed round with identical
weights; uploads of a round in progress are asked for again (agents keep them
until the round closes). What the report is made of is kept by ``round_log``.

Phases: waiting_for_silos -> training (round 1..R) -> finishing -> done.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

from tap_core.algorithms import algorithm_class, travelling_components
from tap_core.config import FederationConfig, SiloSpec, to_mapping
from tap_core.errors import ConfigError, Rejected, TapError
from tap_core.layout import Layout, layout_bytes, select
from tap_core.messages import NOT_JOINED, ClientUpdate, RoundStats, SiloDeclaration, SiloResult
from tap_core.model import build_backbone
from tap_core.model.tap_model import ComponentValues, ModelPlan, TapModel
from tap_core.plan import check_label_spaces, component_weights, silo_plan, union_plan, united_tasks
from tap_core.scenario import check_shared_tasks
from tap_core.seeding import derive_seed
from tap_core.store import CheckpointStore, atomic_write_json
from tap_server.aggregation import StreamingAggregator
from tap_server.federation_api import DONE, FINISHING, TRAINING, WAITING, Assignment, Payload, Registration, Status
from tap_server.federation_api import Transfer, UploadSlot
from tap_server.federation_state import FederationState
from tap_server.metrics import ServerMetrics
from tap_server.validation import check_declaration, check_result, check_stats, check_update

log = logging.getLogger(__name__)

UNSAVED_LOG_INTERVAL_S = 30.0  # a state write failing again and again is logged this often, not at every retry


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
        algorithm_class(config.algorithm)  # an unknown algorithm is a config error now, not at the first upload
        self._config = config
        self._metrics = metrics or ServerMetrics()
        self._clock = clock
        self._expected_silos = config.expected_silos or expected_silos
        self._fingerprint = build_backbone(config.model).fingerprint
        self._store = CheckpointStore(Path(state_dir), "state") if state_dir else None
        if self._store is not None:
            self._store.check_writable()  # an unwritable --state is refused now, not at the first join
        self._report_path = Path(state_dir) / "report.json" if state_dir else None
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._state = FederationState.new(config, self._fingerprint)
        # the round in progress and liveness: not persisted (a restarted server asks for the uploads again)
        self._received: dict[str, RoundStats] = {}
        self._aggregator = StreamingAggregator()
        self._last_seen: dict[str, float] = {}
        self._told_done: set[str] = set()
        self._round_started = self._clock()
        self._deadline = self._round_started + config.deadlines.join_s
        # a state write that failed (disk full, read-only volume): why, and what the next write must include.
        # Until a write succeeds nothing derived from the unsaved state is handed out (a silo is never told what
        # a restart would forget) and tick() tries again.
        self._unsaved: str | None = None
        self._unsaved_values = False
        self._unsaved_logged = -math.inf
        if self._store is not None and self._store.exists():
            self._resume(self._store)
        self._metrics.publish(self._status())

    # ------------------------------------------------------------------ joins

    def register(self, decl: SiloDeclaration) -> Registration:
        """Admit a silo (or a returning one); a refusal (:class:`Rejected`) says what differs."""
        with self._lock:
            s = self._state
            check_declaration(decl)
            if decl.fingerprint != self._fingerprint:
                raise Rejected(
                    "fingerprint_mismatch",
                    f"silo {decl.silo} runs base model {decl.fingerprint[:16]}…, the federation runs {self._fingerprint[:16]}…: "
                    f"the frozen backbone weights, the tokenizer or the model spec differ "
                    f"(model: {to_mapping(self._config.model)}); use the federation's model spec and the same local files",
                )
            known = s.declarations.get(decl.silo)
            if s.plan is not None:
                if known is None:
                    raise Rejected("federation_started",
                                   f"silo {decl.silo} joins after the federation started; its plan is fixed. "
                                   "Raise expected_silos (or join before the join deadline) and restart the federation")
                if _comparable(known) != _comparable(decl):
                    raise Rejected("declaration_changed",
                                   f"silo {decl.silo} declares other tasks, sample counts or labels than when it joined; "
                                   "the federation's plan is fixed: restore the silo's data and config")
            else:
                others = [d for silo, d in sorted(s.declarations.items()) if silo != decl.silo]
                try:  # conflicts only; completeness (e.g. two labels per task) is checked at the start
                    check_shared_tasks(tuple(SiloSpec(d.silo, d.tasks) for d in [*others, decl]), "federation")
                    check_label_spaces([*others, decl])
                except ConfigError as exc:
                    raise Rejected("tasks_conflict", str(exc)) from exc
                s.declarations[decl.silo] = decl
                self._persist(with_values=False)
            self._touch(decl.silo)
            log.info("silo %s joined (%d tasks, %d registered)", decl.silo, len(decl.tasks), len(s.declarations))
            if s.phase == WAITING and self._expected_silos and len(s.declarations) >= self._expected_silos:
                try:
                    self._start()
                except ConfigError as exc:
                    del s.declarations[decl.silo]
                    self._persist(with_values=False)
                    raise Rejected("tasks_conflict", f"the federation cannot start with silo {decl.silo}: {exc}") from exc
            self._changed_now()
            return Registration(decl.silo, len(s.declarations), s.plan is not None)

    def touch(self, silo: str) -> Status:
        """The silo is alive (any call counts); returns where the federation stands."""
        with self._lock:
            self._touch(silo)
            return self._status()

    def _touch(self, silo: str) -> None:
        self._last_seen[silo] = self._clock()

    def silo_plan(self, silo: str) -> ModelPlan:
        with self._lock:
            if self._state.plan is None:
                raise TapError("the federation has not started yet: no plan")
            return self._state.silo_plans[silo]

    def _travelling(self, silo: str) -> Layout:
        """The layout of the components that travel between the server and ``silo``."""
        return select(self._state.layout, travelling_components(self._config.algorithm, self._state.silo_plans[silo]))

    # ----------------------------------------------------------------- rounds

    def _start(self) -> None:
        """Fix the plan (united label spaces), initialise the global model, begin round 1."""
        s = self._state
        decls = [s.declarations[silo] for silo in sorted(s.declarations)]
        tasks = united_tasks(decls)
        fusion = self._config.model.fusion_layers
        plan = union_plan(decls, fusion)
        silo_plans = {d.silo: silo_plan(d, tasks, fusion) for d in decls}
        model = TapModel(plan, build_backbone(self._config.model), self._config.seed)
        s.plan, s.silo_plans, s.global_values, s.layout = plan, silo_plans, model.values(), model.layout()
        log.info("federation starts: %d silos, %d tasks, %d components", len(decls), len(tasks), len(plan.components))
        self._begin_round()

    def _select(self, round_index: int, attempt: int) -> list[str]:
        silos = sorted(self._state.declarations)
        k = self._config.clients_per_round
        if k is None or k >= len(silos):
            return silos
        rng = random.Random(derive_seed(self._config.seed, "select", round_index, attempt))
        return sorted(rng.sample(silos, k))

    def _begin_round(self) -> None:
        s = self._state
        s.round += 1
        s.selected = self._select(s.round, s.attempt)
        s.phase = TRAINING
        self._received = {}
        self._aggregator = StreamingAggregator(previous=self._aggregator)
        self._round_started = self._clock()
        self._deadline = self._round_started + self._config.deadlines.round_s
        log.info("round %d/%d: selected %s", s.round, self._config.rounds, ", ".join(s.selected))
        self._persist(with_values=s.attempt == 0)

    def assignment(self, silo: str) -> Assignment:
        with self._lock:
            self._touch(silo)
            s = self._state
            if silo not in s.declarations:
                return Assignment("wait", message=NOT_JOINED)
            if self._unsaved is not None:
                return Assignment("wait", s.round, message="the server cannot write its state; waiting")
            plan = s.silo_plans.get(silo)
            if s.phase == TRAINING and silo in s.selected and silo not in self._received:
                return Assignment("train", s.round, plan=plan, layout=self._travelling(silo))
            if s.phase == FINISHING and silo not in s.results:
                return Assignment("finish", s.round, plan=plan, layout=self._travelling(silo))
            if s.phase == DONE:
                self._told_done.add(silo)
                return Assignment("done", s.round, plan=plan)
            return Assignment("wait", s.round, message=s.phase, plan=plan)

    def wait_for_assignment(self, silo: str, timeout: float) -> Assignment:
        """Long poll: the silo's assignment as soon as it is something other than 'wait' (or at ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                current = self.assignment(silo)
                remaining = deadline - time.monotonic()
                if current.action != "wait" or current.message == NOT_JOINED or remaining <= 0:
                    return current
                self._changed.wait(remaining)

    def payload(self, silo: str, round_index: int) -> Payload:
        """Current global values of the silo's travelling components, for ``round_index`` (or the final model)."""
        with self._lock:
            if self._unsaved is not None:
                raise Rejected("unavailable", self._unsaved)
            current = self.assignment(silo)
            if current.action not in ("train", "finish") or current.round != round_index:
                raise Rejected("future_round" if round_index > self._state.round else "stale_round",
                               f"silo {silo} asked for round {round_index}; its assignment is {current.action} {current.round}")
            direction = "down" if current.action == "train" else "final"
            values = {c: self._state.global_values[c] for c in current.layout}
            self._state.log.count_payload(silo, round_index, direction, values, self._config.wire.dtype)
            return Payload(round_index, direction, values, current.layout)

    def admit_upload(self, silo: str, round_index: int) -> UploadSlot:
        """Whether ``silo`` may upload for ``round_index`` now (ask before reading a stream): what it must carry."""
        with self._lock:
            self._touch(silo)
            s = self._state
            if s.phase != TRAINING or round_index != s.round:
                raise Rejected("stale_round" if round_index <= s.round else "future_round",
                               f"upload for round {round_index}, but the federation is in {s.phase} round {s.round}")
            if silo not in s.selected:
                raise Rejected("not_selected", f"silo {silo} is not selected in round {s.round}")
            if silo in self._received:
                raise Rejected("duplicate", f"silo {silo} already uploaded round {s.round}")
            return UploadSlot(round_index, self._travelling(silo), frozenset(s.layout))

    def submit_update(self, update: ClientUpdate) -> None:
        """Validate and fold in one silo's upload; closes the round when the last one arrives."""
        with self._lock:
            slot = self.admit_upload(update.silo, update.round)  # again: the round may have moved on meanwhile
            s = self._state
            plan = s.silo_plans[update.silo]
            expected_weights = component_weights(plan, s.declarations[update.silo].train_samples, list(slot.layout))
            check_update(update, slot.layout, set(plan.components), expected_weights)
            check_stats(update.stats, {t.name for t in plan.tasks})
            self._aggregator.add(update.values, update.weights)
            self._received[update.silo] = update.stats
            s.log.count_payload(update.silo, update.round, "up", update.values, self._config.wire.dtype)
            self._metrics.updates_received.inc()
            log.info("round %d: update from %s (%d/%d)", s.round, update.silo, len(self._received), len(s.selected))
            if len(self._received) == len(s.selected):
                self._close_round()
            self._changed.notify_all()

    def _close_round(self) -> None:
        s = self._state
        self._metrics.set_phase("aggregating")
        started = time.perf_counter()
        s.global_values = self._aggregator.result(s.global_values)
        seconds = time.perf_counter() - started
        record = s.log.close_round(s.round, s.selected, self._received, self._clock() - self._round_started, seconds)
        self._metrics.round_closed(record, seconds)
        s.attempt = 0
        log.info("round %d aggregated in %.3fs (losses %s)", s.round, seconds,
                 {t: round(v, 4) for t, v in record["task_losses"].items()})
        if s.round >= self._config.rounds:
            s.phase = FINISHING
            self._deadline = self._clock() + self._config.deadlines.finish_s
            self._persist(with_values=True)
        else:
            self._begin_round()  # persists the new global values with the next round's selection
        self._metrics.publish(self._status())

    def submit_result(self, result: SiloResult) -> None:
        with self._lock:
            self._touch(result.silo)
            s = self._state
            if s.phase != FINISHING:
                raise Rejected("stale_round", f"results are accepted in the finishing phase, not in {s.phase}")
            if result.silo not in s.silo_plans:
                raise Rejected("not_selected", f"silo {result.silo} is not part of this federation's plan")
            if result.silo in s.results:
                raise Rejected("duplicate", f"silo {result.silo} already reported its results")
            check_result(result, {t.name for t in s.silo_plans[result.silo].tasks})
            s.results[result.silo] = result
            self._metrics.result_received(result)
            log.info("silo %s reported results (%d/%d)", result.silo, len(s.results), len(s.declarations))
            if len(s.results) == len(s.declarations):
                self._finish()
            else:
                self._persist(with_values=False)
            self._changed_now()

    def _finish(self) -> None:
        self._state.phase = DONE
        self._persist(with_values=False)
        report = self._report()
        self._write_report(report)
        log.info("federation done: mean primary %s", report["mean_primary"])

    def _write_report(self, report: dict[str, Any]) -> None:
        if self._report_path is None:
            return
        try:
            atomic_write_json(self._report_path, report)
        except OSError as exc:  # the state (results included) is saved: tick() or a restart writes the report
            self._write_failed(exc)

    # ------------------------------------------------------------ deadlines

    def tick(self) -> Status:
        """Apply deadlines (called periodically by the daemon; simulate never needs it); returns the status."""
        with self._lock:
            s = self._state
            if self._unsaved is not None and not self._save_again():
                pass  # no deadline applies while nothing new can be saved: silos are waiting for the disk, not late
            elif self._clock() >= self._deadline:
                if s.phase == WAITING and len(s.declarations) >= self._config.min_clients:
                    log.warning("join deadline passed with %d silos: starting without the others", len(s.declarations))
                    self._start()
                elif s.phase == TRAINING and len(self._received) >= self._config.min_clients:
                    log.warning("round %d deadline: closing with %d of %d updates (none from %s)", s.round,
                                len(self._received), len(s.selected),
                                ", ".join(sorted(set(s.selected) - set(self._received))))
                    self._close_round()
                elif s.phase == TRAINING:
                    log.warning("round %d deadline: only %d updates (< min_clients %d; none from %s); retrying the round",
                                s.round, len(self._received), self._config.min_clients,
                                ", ".join(sorted(set(s.selected) - set(self._received))))
                    self._metrics.clients_dropped.inc(len(set(s.selected) - set(self._received)))
                    s.round -= 1
                    s.attempt += 1
                    self._begin_round()
                elif s.phase == FINISHING:
                    missing = sorted(set(s.declarations) - set(s.results))
                    log.warning("finish deadline: no results from %s", ", ".join(missing))
                    self._metrics.clients_dropped.inc(len(missing))
                    s.log.drop_at_finish(missing)
                    self._finish()
                self._changed.notify_all()
            status = self._status()
            self._metrics.publish(status)
            return status

    def wait_idle(self) -> None:
        """Return once no call is inside the federation (a state write in progress finishes first)."""
        with self._lock:
            pass

    # ------------------------------------------------------------ observations

    def status(self) -> Status:
        with self._lock:
            return self._status()

    def _status(self) -> Status:
        s = self._state
        horizon = self._clock() - 3 * self._config.deadlines.heartbeat_s
        connected = sum(1 for silo, t in self._last_seen.items() if t >= horizon and silo in s.declarations)
        return Status(federation_id=s.federation_id, phase=s.phase, round=s.round, rounds=self._config.rounds,
                      joined=tuple(sorted(s.declarations)), selected=tuple(s.selected) if s.phase == TRAINING else (),
                      received=tuple(sorted(self._received)), results=tuple(sorted(s.results)),
                      told_done=frozenset(self._told_done), connected=connected)

    def global_values(self) -> ComponentValues:
        """The current global model (a snapshot: aggregation replaces tensors, it never changes them in place)."""
        with self._lock:
            return {c: dict(tensors) for c, tensors in self._state.global_values.items()}

    def record_transfer(self, transfer: Transfer) -> None:
        """A tensor stream as it went over the wire: the report's transport section and the byte metrics."""
        with self._lock:
            self._state.log.record_transfer(transfer)
            self._metrics.record_transfer(transfer)

    def report(self) -> dict[str, Any]:
        with self._lock:
            return self._report()

    def _report(self) -> dict[str, Any]:
        s = self._state
        trainable = {silo: layout_bytes(self._travelling(silo), self._config.wire.dtype) for silo in sorted(s.silo_plans)}
        return s.log.report(self._config, [s.results[silo] for silo in sorted(s.results)], trainable, self._fingerprint)

    # ----------------------------------------------------------- persistence

    def _changed_now(self) -> None:
        self._metrics.publish(self._status())
        self._changed.notify_all()

    def _persist(self, with_values: bool) -> None:
        """Write the state (with the global values when they changed since the last tensor file).

        A failed write leaves the previous checkpoint on disk (``CheckpointStore``) and the federation unsaved:
        the caller gets a retryable ``unavailable`` refusal, silos are told to wait, and :meth:`tick` writes
        again until it works. Nothing is lost: what silos sent is in memory, and a restart resumes the last
        checkpoint, which is all any silo was ever told.
        """
        if self._store is None:
            return
        self._unsaved_values |= with_values
        started = time.perf_counter()
        try:
            self._state.save(self._store, self._unsaved_values)
        except OSError as exc:
            self._write_failed(exc)
        self._unsaved_values = False
        self._metrics.state_writes.inc()
        self._metrics.state_write_seconds.observe(time.perf_counter() - started)

    def _write_failed(self, exc: OSError) -> NoReturn:
        assert self._store is not None
        self._metrics.state_write_failures.inc()
        self._unsaved = (f"the server cannot write its state in {self._store.directory} ({exc.strerror or exc}); "
                         "it keeps its last checkpoint and waits: free space on the volume or make it writable, "
                         "and the federation carries on by itself")
        now = self._clock()
        if now - self._unsaved_logged >= UNSAVED_LOG_INTERVAL_S:
            self._unsaved_logged = now
            log.error("state write failed: %s (%s)", self._unsaved, exc)
        raise Rejected("unavailable", self._unsaved) from exc

    def _save_again(self) -> bool:
        """Retry a failed state write; once it works the silos are told what they were waiting for."""
        try:
            self._persist(with_values=False)  # the values too, if the failed write had them
            if self._state.phase == DONE and self._report_path is not None and not self._report_path.exists():
                self._write_report(self._report())
        except Rejected:
            return False
        self._unsaved, self._unsaved_logged = None, -math.inf
        log.warning("state written again after a failed write; the federation carries on")
        # the silos could not work while the state was unsaved: their deadline starts now
        self._round_started = self._clock()
        if self._state.phase == TRAINING:
            self._deadline = self._round_started + self._config.deadlines.round_s
        elif self._state.phase == FINISHING:
            self._deadline = self._round_started + self._config.deadlines.finish_s
        self._changed_now()
        return True

    def _resume(self, store: CheckpointStore) -> None:
        s = self._state = FederationState.load(store, self._config, self._fingerprint)
        if s.phase == TRAINING:
            # the round in progress restarts: the same selection, uploads are asked for again
            s.log.forget_uploads(s.round)
            self._deadline = self._round_started + self._config.deadlines.round_s
        elif s.phase == FINISHING:
            self._deadline = self._clock() + self._config.deadlines.finish_s
        elif s.phase == DONE and self._report_path is not None and not self._report_path.exists():
            self._write_report(self._report())  # the server stopped before it could write the report
        log.info("resumed from %s: phase %s, round %d", store.json_path, s.phase, s.round)


def _comparable(decl: SiloDeclaration) -> dict[str, Any]:
    """A declaration without what may legitimately change between an agent's restarts (its device)."""
    data = decl.to_json()
    data.pop("device", None)
    return data
