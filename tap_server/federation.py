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
from tap_core.config import FederationConfig, SiloSpec, plan_bytes_limit, to_mapping
from tap_core.errors import ConfigError, Rejected, TapError
from tap_core.layout import Layout, layout_bytes, select
from tap_core.messages import NOT_JOINED, ClientUpdate, RoundStats, SiloDeclaration, SiloResult
from tap_core.model import build_backbone
from tap_core.model.tap_model import ComponentValues, ModelPlan, TapModel
from tap_core.plan import (
    check_label_spaces,
    component_weights,
    incomplete_tasks,
    plan_json_bytes,
    silo_plan,
    union_plan,
)
from tap_core.plan import united_tasks
from tap_core.scenario import check_shared_tasks
from tap_core.seeding import derive_seed
from tap_core.atomic_files import atomic_write_json
from tap_core.store import CheckpointStore
from tap_server.aggregation import StreamingAggregator, capped_weights
from tap_server.federation_api import DONE, FINISHING, TRAINING, WAITING, Assignment, Payload, Registration, Status
from tap_server.federation_api import Transfer, UploadSlot
from tap_server.federation_state import FederationState
from tap_server.metrics import ServerMetrics
from tap_server.validation import check_declaration, check_result, check_stats, check_update, check_update_norm

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
        # selected silos whose update this round was refused for its content (reason): the round does not wait on them
        self._refused: dict[str, str] = {}
        # silos whose certificate was revoked (or removed from silos.json) since they joined: nobody waits for them
        self._withdrawn: set[str] = set()
        self._aggregator = StreamingAggregator()
        self._last_seen: dict[str, float] = {}
        self._told_done: set[str] = set()
        # silos whose declarations the start refused, with the refusal: told again if they join unchanged
        self._refused_at_start: dict[str, tuple[dict[str, Any], str]] = {}
        self._weights: tuple[tuple[int, int], dict[str, dict[str, float]]] = ((-1, -1), {})
        # the global values' norms for the update-norm bound, per round (the values change only between rounds)
        self._global_norms: tuple[int, dict[str, float]] = (-1, {})
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
        """Admit a silo (or a returning one); a refusal (:class:`Rejected`) says what differs.

        Whatever one silo declares is decided at its own join: a declaration that conflicts with the
        others, or would push a silo's plan past the limits, is refused to the silo that sends it, and the
        start can no longer fail because of another silo's declaration (``_start_if_complete``).
        """
        with self._lock:
            s = self._state
            check_declaration(decl, self._config.limits)
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
                    raise Rejected(
                        "federation_started",
                        f"silo {decl.silo} joins after the federation started; its plan is fixed. "
                        "Raise expected_silos (or join before the join deadline) and restart the federation",
                    )
                if _comparable(known) != _comparable(decl):
                    raise Rejected(
                        "declaration_changed",
                        f"silo {decl.silo} declares other tasks, sample counts or labels than when it joined; "
                        "the federation's plan is fixed: restore the silo's data and config",
                    )
            else:
                refused = self._refused_at_start.get(decl.silo)
                if refused is not None and refused[0] == _comparable(decl):
                    raise Rejected("tasks_conflict", refused[1])
                others = [d for silo, d in sorted(s.declarations.items()) if silo != decl.silo]
                self._check_joinable(others, decl)
                self._refused_at_start.pop(decl.silo, None)
                s.declarations[decl.silo] = decl
                self._persist(with_values=False)
            self._touch(decl.silo)
            log.info("silo %s joined (%d tasks, %d registered)", decl.silo, len(decl.tasks), len(s.declarations))
            if s.phase == WAITING and self._expected_silos and len(s.declarations) >= self._expected_silos:
                self._start_if_complete(joiner=decl.silo)
            self._changed_now()
            return Registration(decl.silo, len(s.declarations), s.plan is not None)

    def _check_joinable(self, others: list[SiloDeclaration], decl: SiloDeclaration) -> None:
        """Refuse ``decl`` if, beside ``others``, it breaks a rule the start relies on or a bound of the plan."""
        limits = self._config.limits
        everyone = [*others, decl]
        try:  # conflicts only; completeness (e.g. two labels per task) is checked at the start
            check_shared_tasks(tuple(SiloSpec(d.silo, d.tasks) for d in everyone), "federation")
            check_label_spaces(everyone)
            tasks = united_tasks(everyone, complete=False)
        except ConfigError as exc:
            raise Rejected("tasks_conflict", str(exc)) from exc
        own = {t.name for t in decl.tasks}
        for name in sorted(own):
            labels = tasks[name].labels or ()
            if len(labels) > limits.max_labels_per_task:
                raise Rejected(
                    "tasks_conflict",
                    f"task {name} would have {len(labels)} labels across the federation with "
                    f"silo {decl.silo}'s, at most {limits.max_labels_per_task} "
                    "(limits.max_labels_per_task)",
                )
        budget = plan_bytes_limit(self._config)
        fusion = self._config.model.fusion_layers
        for other in everyone:  # the plans this join changes: the silo's own and those of silos sharing a task
            if other is decl or own & {t.name for t in other.tasks}:
                size = plan_json_bytes(silo_plan(other, tasks, fusion))
                if size > budget:
                    raise Rejected(
                        "oversize",
                        f"with silo {decl.silo}'s declaration the plan of silo {other.silo} would "
                        f"take {size} bytes, at most {budget} (limits.max_plan_bytes; the labels "
                        "of its tasks make most of it)",
                    )

    def _start_if_complete(self, joiner: str | None) -> bool:
        """Start, unless a classification task has fewer than two labels: then its holders are refused.

        The joiner is refused if it holds such a task (its join is undone). Otherwise the holders are
        removed: the start waits for more joins or the join deadline, and when they join again with the same
        declaration they are told why. No silo is refused for another's declaration.
        """
        s = self._state
        decls = [s.declarations[silo] for silo in sorted(s.declarations)]
        incomplete = incomplete_tasks(decls)
        if not incomplete:
            self._start()
            return True
        holders = sorted({silo for silos in incomplete.values() for silo in silos})
        problems = "; ".join(
            f"task {name} has {len(united_tasks(decls, complete=False)[name].labels or ())} label(s) "
            f"across silos {', '.join(silos)}"
            for name, silos in incomplete.items()
        )
        message = (
            f"the federation cannot start with these declarations: {problems}; a classification task needs at "
            "least 2 labels across the federation (declare its labels: list, or add examples of a second label)"
        )
        refused = [joiner] if joiner in holders else holders
        for silo in refused:
            self._refused_at_start[silo] = (_comparable(s.declarations.pop(silo)), message)
            self._metrics.rejected.labels(reason="tasks_conflict").inc()
        self._persist(with_values=False)
        if joiner in refused:
            raise Rejected("tasks_conflict", f"silo {joiner}: {message}")
        log.warning(
            "start refused to silos %s (their agents are told at their next join): %s", ", ".join(refused), message
        )
        return False

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
        silos = sorted(set(self._state.declarations) - self._withdrawn)
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
        self._refused = {}
        self._aggregator = StreamingAggregator(previous=self._aggregator)
        self._round_started = self._clock()
        self._deadline = self._round_started + self._config.deadlines.round_s
        log.info("round %d/%d: selected %s", s.round, self._config.rounds, ", ".join(s.selected))
        self._round_weights()
        self._persist(with_values=s.attempt == 0)

    def _round_weights(self) -> dict[str, dict[str, float]]:
        """Silo -> component -> its aggregation weight this round, fixed from the declarations when it begins.

        The declared training samples, each silo's share of a component's total among the round's selected
        silos capped at ``aggregation.max_weight_share`` (never computed from the updates themselves).
        """
        s = self._state
        key = (s.round, s.attempt)
        if self._weights[0] == key:
            return self._weights[1]
        declared = {
            silo: component_weights(
                s.silo_plans[silo], s.declarations[silo].train_samples, list(self._travelling(silo))
            )
            for silo in s.selected
        }
        weights, capped = capped_weights(declared, self._config.aggregation.max_weight_share)
        for silo, components in sorted(capped.items()):
            log.warning(
                "round %d: aggregation weight of silo %s capped at a %.3g share on %d component(s) "
                "(aggregation.max_weight_share)",
                s.round,
                silo,
                self._config.aggregation.max_weight_share,
                len(components),
            )
            self._metrics.weights_capped.inc()
        self._weights = (key, weights)
        return weights

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
                raise Rejected(
                    "future_round" if round_index > self._state.round else "stale_round",
                    f"silo {silo} asked for round {round_index}; its assignment is {current.action} {current.round}",
                )
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
                raise Rejected(
                    "stale_round" if round_index <= s.round else "future_round",
                    f"upload for round {round_index}, but the federation is in {s.phase} round {s.round}",
                )
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
            try:
                check_update(update, slot.layout, set(plan.components), expected_weights)
                check_stats(update.stats, {t.name for t in plan.tasks}, set(plan.components))
                if self._global_norms[0] != s.round:
                    self._global_norms = (s.round, {})
                check_update_norm(
                    update.values,
                    s.global_values,
                    self._config.aggregation.max_update_norm_ratio,
                    self._global_norms[1],
                )
            except Rejected as exc:
                self._refuse_update(update.silo, exc)
                raise
            self._aggregator.add(update.values, self._round_weights()[update.silo])
            self._received[update.silo] = update.stats
            self._refused.pop(update.silo, None)  # a valid update after a refused one counts
            s.log.count_payload(update.silo, update.round, "up", update.values, self._config.wire.dtype)
            self._metrics.updates_received.inc()
            log.info("round %d: update from %s (%d/%d)", s.round, update.silo, len(self._received), len(s.selected))
            self._close_if_complete()
            self._changed.notify_all()

    def _refuse_update(self, silo: str, refusal: Rejected) -> None:
        """A selected silo's update was refused for what it carries: the round stops waiting for that silo.

        Its agent stops on such a refusal (it is no transient fault), so waiting for it would only hold the
        others until the round deadline. The round closes once every other selected silo has delivered (and
        ``min_clients`` updates arrived); until then a valid update of the refused silo is still taken.
        """
        s = self._state
        self._refused[silo] = refusal.reason
        log.warning(
            "round %d: silo %s is out of the round (%s); the round no longer waits for it",
            s.round,
            silo,
            refusal.reason,
        )
        self._close_if_complete()
        self._changed.notify_all()

    def _close_if_complete(self) -> None:
        """Close the round once every selected silo delivered or was refused, and ``min_clients`` updates arrived."""
        s = self._state
        if len(self._received) + len(self._refused) < len(s.selected):
            return
        if self._refused and len(self._received) < self._config.min_clients:
            return  # too few updates: the round deadline retries it
        if self._refused:
            log.warning(
                "round %d: closing with %d of %d updates (refused: %s)",
                s.round,
                len(self._received),
                len(s.selected),
                ", ".join(f"{silo} ({why})" for silo, why in sorted(self._refused.items())),
            )
        self._close_round()

    def _close_round(self) -> None:
        s = self._state
        self._metrics.set_phase("aggregating")
        started = time.perf_counter()
        s.global_values = self._aggregator.result(s.global_values)
        seconds = time.perf_counter() - started
        record = s.log.close_round(
            s.round, s.selected, self._received, self._clock() - self._round_started, seconds, refused=self._refused
        )
        self._metrics.round_closed(record, seconds)
        s.attempt = 0
        log.info(
            "round %d aggregated in %.3fs (losses %s)",
            s.round,
            seconds,
            {t: round(v, 4) for t, v in record["task_losses"].items()},
        )
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
            check_result(result, {t.name: t.kind for t in s.silo_plans[result.silo].tasks}, self._config.limits)
            s.results[result.silo] = result
            self._metrics.result_received(result)
            log.info("silo %s reported results (%d/%d)", result.silo, len(s.results), len(s.declarations))
            if self._all_results_in():
                self._finish()
            else:
                self._persist(with_values=False)
            self._changed_now()

    def _all_results_in(self) -> bool:
        missing = set(self._state.declarations) - set(self._state.results) - self._withdrawn
        if missing:
            return False
        gone = sorted(set(self._state.declarations) - set(self._state.results))
        if gone:
            log.warning("finishing without results of withdrawn silos %s", ", ".join(gone))
            self._state.log.drop_at_finish(gone)
        return True

    def withdraw(self, silos: set[str]) -> None:
        """The silos that are no longer provisioned (revoked, removed): the federation stops waiting for them.

        Called by the daemon with every silo of the federation missing from silos.json (the whole set each
        time; one that is provisioned again is waited for again). Before the start a withdrawn silo's
        declaration is removed; in a round it counts as refused (the round closes once the others delivered,
        ``min_clients`` permitting) and it is not selected again; in the finishing phase the federation
        finishes once every other silo reported.
        """
        with self._lock:
            s = self._state
            silos = set(silos) & set(s.declarations)
            new = silos - self._withdrawn
            self._withdrawn = silos
            if not new:
                return
            log.warning(
                "silos %s are no longer provisioned: the federation stops waiting for them", ", ".join(sorted(new))
            )
            if s.phase == WAITING:
                for silo in new:
                    del s.declarations[silo]
                self._withdrawn -= new
                self._persist(with_values=False)
            elif s.phase == TRAINING:
                for silo in sorted(new & set(s.selected) - set(self._received)):
                    self._refuse_update(silo, Rejected("revoked", f"silo {silo} is no longer provisioned"))
            elif s.phase == FINISHING and self._all_results_in():
                self._finish()
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
                    # each attempt that cannot start removes the holders of incomplete tasks: try with the others
                    while len(s.declarations) >= self._config.min_clients and not self._start_if_complete(joiner=None):
                        pass
                elif s.phase == TRAINING and len(self._received) >= self._config.min_clients:
                    log.warning(
                        "round %d deadline: closing with %d of %d updates (none from %s)",
                        s.round,
                        len(self._received),
                        len(s.selected),
                        ", ".join(sorted(set(s.selected) - set(self._received))),
                    )
                    self._close_round()
                elif s.phase == TRAINING:
                    log.warning(
                        "round %d deadline: only %d updates (< min_clients %d; none from %s); retrying the round",
                        s.round,
                        len(self._received),
                        self._config.min_clients,
                        ", ".join(sorted(set(s.selected) - set(self._received))),
                    )
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
        return Status(
            federation_id=s.federation_id,
            phase=s.phase,
            round=s.round,
            rounds=self._config.rounds,
            joined=tuple(sorted(s.declarations)),
            selected=tuple(s.selected) if s.phase == TRAINING else (),
            received=tuple(sorted(self._received)),
            results=tuple(sorted(s.results)),
            told_done=frozenset(self._told_done),
            connected=connected,
        )

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
        trainable = {
            silo: layout_bytes(self._travelling(silo), self._config.wire.dtype) for silo in sorted(s.silo_plans)
        }
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
        self._unsaved = (
            f"the server cannot write its state in {self._store.directory} ({exc.strerror or exc}); "
            "it keeps its last checkpoint and waits: free space on the volume or make it writable, "
            "and the federation carries on by itself"
        )
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
