"""A silo that dies and never comes back (or comes back late): the round must close or be retried, never hang.

:func:`vanished_silo` runs light silos (:mod:`tap_testing.light`) against a
``tap-server`` process with a short round deadline. One silo downloads round 1
and then stops answering, as a machine that lost power:

- ``retry=False`` (``min_clients`` = the others): every round closes at its
  deadline with the others' updates, the server says which silo it did not hear
  from, the missing silo is dropped at the finish deadline, and the final model
  is exactly the others' known updates.
- ``retry=True`` (``min_clients`` = everyone): round 1 cannot close, the server
  says so and retries it; the silo's agent is restarted (a new process would
  resume the same way) and the federation finishes with everyone's updates.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tap_testing.cluster import Cluster
from tap_testing.light import IMAGE_TASK, LightSilo, expected_final, fingerprint_of, max_difference
from tap_testing.load import LOAD_CONFIG
from tap_testing.outcome import ScenarioOutcome


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def vanished_silo(
    root: Path, silos: int = 4, rounds: int = 2, round_s: float = 4.0, retry: bool = False, timeout_s: float = 300.0
) -> ScenarioOutcome:
    names = [f"silo{i}" for i in range(silos)]
    victim = names[-1]
    deadlines = dataclasses.replace(LOAD_CONFIG.deadlines, round_s=round_s, finish_s=round_s)
    config = dataclasses.replace(
        LOAD_CONFIG, rounds=rounds, min_clients=silos if retry else silos - 1, deadlines=deadlines
    )
    cluster = Cluster.create(root, config, {name: (IMAGE_TASK, 0) for name in names}, data=False)
    fingerprint = fingerprint_of(config)
    shifts = {silo: 0.01 * (i + 1) for i, silo in enumerate(names)}
    address = f"127.0.0.1:{cluster.port}"
    name = (
        f"a silo dies after downloading round 1 and {'returns after the deadline (round retried)' if retry else 'never returns'}"
        f" ({silos} silos, {round_s:.0f}s round deadline)"
    )
    checks: dict[str, bool] = {}
    numbers: dict = {"silos": silos, "rounds": rounds, "round_s": round_s, "min_clients": config.min_clients}
    started = time.monotonic()
    with cluster:
        cluster.start_server()
        threads = {
            silo: LightSilo(
                cluster.kits / silo,
                address,
                fingerprint,
                shift=shifts[silo],
                vanish_after=1 if silo == victim else None,
            )
            for silo in names
        }
        for thread in threads.values():
            thread.start()
        threads[victim].join(timeout=timeout_s)
        checks["the victim vanished after downloading round 1"] = (
            threads[victim].record.first_values is not None and not threads[victim].record.rounds
        )
        if retry:
            checks["the server says the round is retried, naming the missing silo"] = _wait(
                lambda: f"none from {victim}); retrying the round" in cluster.log("server"), timeout_s
            )
            threads[victim] = LightSilo(cluster.kits / victim, address, fingerprint, shift=shifts[victim])
            threads[victim].start()
        honest = [t for silo, t in threads.items() if retry or silo != victim]
        for thread in honest:
            thread.join(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
        numbers["seconds"] = round(time.monotonic() - started, 1)
        checks["every other silo finished"] = all(t.record.finished for t in honest)
        checks["the report is written"] = _wait(lambda: (cluster.state / "report.json").is_file(), 30)
        server_log = cluster.log("server")
    if not retry:
        closed = server_log.count(f"updates (none from {victim})")
        numbers["rounds_closed_at_deadline"] = closed
        checks["every round closed at its deadline, naming the missing silo"] = closed == rounds
        checks["the missing silo is dropped at the finish deadline"] = f"no results from {victim}" in server_log
    records = {silo: t.record for silo, t in threads.items()}
    numbers["errors"] = {silo: r.error for silo, r in records.items() if r.error}
    first = records[names[0]].first_values
    final = records[names[0]].final_values
    if first is not None and final is not None:
        # the updates the server accepted, per round: a retried round counts once, with its last attempt
        per_round = [[shifts[s] for s, r in records.items() if k in r.rounds] for k in range(1, rounds + 1)]
        numbers["accepted_per_round"] = [len(r) for r in per_round]
        numbers["aggregate_max_abs_error"] = max_difference(final, expected_final(first, per_round))
        checks["the final model is exactly the accepted updates"] = numbers["aggregate_max_abs_error"] < 1e-5
        expected_count = silos if retry else silos - 1
        checks[f"{expected_count} updates in every round"] = numbers["accepted_per_round"] == [expected_count] * rounds
    else:
        checks["the final model is exactly the accepted updates"] = False
    return ScenarioOutcome.from_checks(name, checks, numbers, when_failed=f". Server log: {cluster.tail('server', 8)}")
