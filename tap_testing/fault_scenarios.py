"""The faults a federation must survive, each a function returning a :class:`ScenarioOutcome`.

Used by ``tests/test_faults.py`` (small sizes) and ``bench/faults.py`` (every
point, the long versions). Each scenario builds what it needs under ``root`` and
says, in ``detail``, what held or what broke; ``numbers`` carries the measured
values behind the verdict.

- :func:`server_kills`: the server SIGKILLed at one or more points (restarted on
  the same state dir after each), agents untouched: the final global model and
  every silo's metrics must equal an uninterrupted run.
- :func:`agent_kills`: agents SIGKILLed mid-training / mid-upload and restarted:
  the same equality.
- :func:`network_faults`: agents behind a fault-injecting proxy (drops, cuts
  mid-stream, a partition, a stall, latency, a slow link): the same equality.
- :func:`silent_training`: minutes of local work behind a proxy that drops idle
  connections: the connection stays up, no call has to be retried.
- :func:`agent_disk_full`: an agent's state dir fills up: a clear error, and a
  restart on the same dir resumes to the same result.
- :func:`state_volume_fault`, :func:`unwritable_state_dir`: the server's state
  volume fills up or goes read-only mid-federation, or is unwritable at start.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

from tap_testing.cluster import FAULT_CONFIG, Cluster, Reference, compare, compare_run, in_process, reference_run
from tap_testing.outcome import ScenarioOutcome
from tap_testing.proxy import DOWN, UP
from tap_testing.volume import FILLER, StateVolume

#: the server's kill points in an order one federation reaches them (tap_testing.faults.POINTS)
SERVER_CHAIN = ["join:2", "download:2", "upload:2", "update:1", "aggregate:1", "state_write:1", "result:1"]
PHASES = {
    "join": "waiting for joins",
    "download": "streaming out",
    "upload": "mid-upload",
    "update": "mid-aggregation (partial sums)",
    "aggregate": "mid-aggregation (round close)",
    "state_write": "during the state write",
    "result": "during stage 2",
}
RUN_TIMEOUT_S = 900.0


def _prepared(root: Path, reference: Reference | None, retry_s: float | None) -> tuple[Cluster, Reference]:
    cluster = Cluster.create(root / "cluster", max_retry_delay_s=retry_s)
    return cluster, reference or reference_run(cluster, root / "reference-state")


def _finish(
    name: str, cluster: Cluster, reference: Reference, started: float, checks: dict[str, bool], numbers: dict
) -> ScenarioOutcome:
    codes = cluster.wait_all(RUN_TIMEOUT_S)
    numbers["exit_codes"] = codes
    numbers["seconds"] = round(time.monotonic() - started, 1)
    checks["every process exited 0"] = all(code == 0 for code in codes.values())
    equal, detail, gaps = compare(cluster, reference) if checks["every process exited 0"] else (False, "", {})
    numbers.update(gaps)
    checks["final model and metrics equal the uninterrupted run"] = equal
    logs = {} if all(checks.values()) else {n: cluster.tail(n, 8) for n in ("server", *cluster.silos)}
    return ScenarioOutcome.from_checks(name, checks, numbers, detail, when_failed=f". Log tails: {logs}")


def server_kills(
    root: Path, points: list[str] | None = None, reference: Reference | None = None, retry_s: float | None = None
) -> ScenarioOutcome:
    """SIGKILL the server at each of ``points`` in turn (restarting it on the same state dir after each)."""
    points = list(points or SERVER_CHAIN)
    name = "server SIGKILL " + ", ".join(PHASES.get(p.split(":")[0], p) for p in points)
    cluster, reference = _prepared(root, reference, retry_s)
    started = time.monotonic()
    checks: dict[str, bool] = {}
    numbers: dict = {"points": points}
    with cluster:
        cluster.start_server(fault=points[0])
        for silo in cluster.silos:
            cluster.start_agent(silo)
        for point, following in zip(points, [*points[1:], None]):
            code = cluster.wait_exit(cluster.server, RUN_TIMEOUT_S, "server")  # type: ignore[arg-type]
            checks[f"the server died at {point}"] = code == -9 and cluster.killed("server") == points.index(point) + 1
            if not checks[f"the server died at {point}"]:
                break
            # The agents are already retrying, so a restarted server can reach its next kill point (or finish)
            # before a health probe sees it: don't wait for health; the loop and _finish wait for the exit codes.
            cluster.start_server(fault=following, wait_healthy=False)
        numbers["server_starts"] = cluster.server_starts
        return _finish(name, cluster, reference, started, checks, numbers)


def agent_kills(
    root: Path, victims: dict[str, str] | None = None, reference: Reference | None = None, retry_s: float | None = None
) -> ScenarioOutcome:
    """SIGKILL agents at their points (default: one mid-training, one mid-upload), restart them, finish."""
    victims = victims or {"alpha": "train:1", "beta": "upload_frame:2"}
    name = "agent SIGKILL " + ", ".join(f"{silo} at {point}" for silo, point in victims.items())
    cluster, reference = _prepared(root, reference, retry_s)
    started = time.monotonic()
    checks: dict[str, bool] = {}
    numbers: dict = {"victims": victims}
    with cluster:
        cluster.start_server()
        for silo in cluster.silos:
            cluster.start_agent(silo, fault=victims.get(silo))
        for silo, point in victims.items():
            code = cluster.wait_exit(cluster.agents[silo], RUN_TIMEOUT_S, silo)
            checks[f"{silo} died at {point}"] = code == -9 and cluster.killed(silo) == 1
            cluster.start_agent(silo)
        outcome = _finish(name, cluster, reference, started, checks, numbers)
    resumed = {
        silo: "resumed local state" in cluster.log(silo) or "re-sending the saved update" in cluster.log(silo)
        for silo in victims
    }
    numbers["resumed_from_disk"] = resumed
    return outcome


def _when(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.05)


def network_faults(root: Path, reference: Reference | None = None, retry_s: float | None = None) -> ScenarioOutcome:
    """Agents reach the server through a proxy that drops every connection, cuts a download and an upload
    mid-stream, partitions the network, stalls for a few seconds and then runs as a slow, distant link; they
    must finish as if nothing happened."""
    name = "network: drops, cuts mid-stream, partition, stall, latency, slow link"
    cluster, reference = _prepared(root, reference, retry_s)
    started = time.monotonic()
    checks: dict[str, bool] = {}
    numbers: dict = {}
    with cluster:
        proxy = cluster.use_proxy()
        cluster.start_server()
        for silo in cluster.silos:
            cluster.start_agent(silo)
        # 1. every connection reset once all agents are connected (they are joining or waiting)
        _when(lambda: proxy.open_connections() >= len(cluster.silos), 300, "agents connected")
        numbers["dropped_at_join"] = proxy.drop()
        # 2. the next download is cut after 100 kB (mid-stream), the next upload after 60 kB
        proxy.cut_after(DOWN, 100_000)
        proxy.cut_after(UP, 60_000)
        _when(lambda: proxy.stats().cut >= 2, 300, "a download and an upload were cut")
        # 3. a partition: for 3 s the server cannot be reached (open connections reset, new ones refused)
        numbers["reset_by_partition"] = proxy.partition(3.0)
        time.sleep(3.5)
        # 4. a black hole of 3 s (connections stay open, nothing flows) while everyone works
        proxy.stall(3.0)
        time.sleep(3.5)
        # 5. for the rest: a slow (200 kB/s), distant (50 ms one way) link
        proxy.set_latency(0.05)
        proxy.set_rate(200_000)
        outcome = _finish(name, cluster, reference, started, checks, numbers)
        numbers["proxy"] = proxy.stats().to_json()
    return outcome


def silent_training(
    root: Path,
    train_sleep_s: float = 8.0,
    idle_timeout_s: float = 3.0,
    reference: Reference | None = None,
    retry_s: float | None = None,
) -> ScenarioOutcome:
    """Every training pass of every agent lasts ``train_sleep_s`` longer (silent local work) while a proxy drops
    connections idle for ``idle_timeout_s``: heartbeats and keepalive keep them up, so no call is retried."""
    name = f"silent local training ({train_sleep_s:.0f}s per pass) behind a {idle_timeout_s:.0f}s idle timeout"
    cluster, reference = _prepared(root, reference, retry_s)
    started = time.monotonic()
    checks: dict[str, bool] = {}
    numbers: dict = {"train_sleep_s": train_sleep_s, "idle_timeout_s": idle_timeout_s}
    with cluster:
        proxy = cluster.use_proxy()
        proxy.idle_timeout_s = idle_timeout_s
        cluster.start_server()
        for silo in cluster.silos:
            cluster.start_agent(silo, env={"TAP_FAULT_TRAIN_SLEEP_S": str(train_sleep_s)})
        outcome = _finish(name, cluster, reference, started, checks, numbers)
        numbers["proxy"] = proxy.stats().to_json()
    retries: dict[str, int] = {
        silo: len(re.findall(r"failed \(.*\); retrying", cluster.log(silo))) for silo in cluster.silos
    }
    numbers["retried_calls"] = retries
    if outcome.passed and (sum(retries.values()) > 0 or numbers["proxy"]["idle_closed"]):
        outcome.passed = False
        outcome.detail = (
            f"FAILED: connections were lost during silent training ({numbers['proxy']['idle_closed']} "
            f"closed idle, retried calls {retries})"
        )
    return outcome


def agent_disk_full(
    root: Path,
    silo: str = "alpha",
    after_writes: int = 4,
    reference: Reference | None = None,
    retry_s: float | None = None,
) -> ScenarioOutcome:
    """``silo``'s state dir fills up (ENOSPC from its ``after_writes``-th file write on): the agent stops with a clear
    error naming its state dir (exit 2, not a crash); restarted on the same dir once there is space, it resumes
    and the federation ends as an uninterrupted run."""
    name = f"agent's state dir full ({silo}, from its write #{after_writes})"
    cluster, reference = _prepared(root, reference, retry_s)
    started = time.monotonic()
    checks: dict[str, bool] = {}
    numbers: dict = {"silo": silo, "after_writes": after_writes}
    with cluster:
        cluster.start_server()
        for agent in cluster.silos:
            cluster.start_agent(agent, env={"TAP_FAULT_DISK_FULL": str(after_writes)} if agent == silo else None)
        code = cluster.wait_exit(cluster.agents[silo], RUN_TIMEOUT_S, silo)
        message = next((line for line in cluster.log(silo).splitlines() if "cannot write" in line), "")
        numbers["exit_code"], numbers["error"] = code, message[:300]
        checks["the agent stops with exit 2"] = code == 2
        checks["saying it cannot write its state dir, and that the previous state is intact"] = (
            str(cluster.client_state(silo)) in message and "intact" in message
        )
        cluster.start_agent(silo)
        return _finish(name, cluster, reference, started, checks, numbers)


# ------------------------------------------------------------ the state volume (in process: no gRPC needed)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != FILLER}


def state_volume_fault(
    root: Path, kind: str = "full", real: bool | None = None, reference: Reference | None = None
) -> ScenarioOutcome:
    """The state volume fills up (``kind="full"``) or goes read-only (``"read_only"``) when round 2 closes.

    Held when: the upload that closes the round gets a clear, retryable refusal naming the state directory;
    the state on disk is byte for byte the previous checkpoint (no temp files left); nothing the server could
    not persist is handed out (every silo is told to wait, the new global values are refused); a server
    restarted on the directory meanwhile resumes the previous round; once the volume is writable again the
    federation carries on by itself and ends exactly as an uninterrupted run.
    """
    from tap_core.algorithms import get_algorithm
    from tap_core.errors import Rejected, TapError
    from tap_server.federation import Federation

    cluster = Cluster.create(root / "cluster")
    reference = reference or reference_run(cluster, root / "reference-state")
    config, runtimes = in_process(cluster)
    algorithm = get_algorithm(config)
    checks: dict[str, bool] = {}
    numbers: dict = {"kind": kind}
    with StateVolume(root / "state", real=real) as volume:
        numbers["volume"] = volume.how
        federation = Federation(config, state_dir=volume.path, expected_silos=len(runtimes))
        for runtime in runtimes.values():
            federation.register(runtime.declaration())
        for silo, runtime in runtimes.items():
            runtime.set_plan(federation.silo_plan(silo))
        for silo in federation.status().selected:  # round 1, uneventful
            federation.submit_update(algorithm.local_round(runtimes[silo], 1, federation.payload(silo, 1).values))
        before = _files(volume.path)
        updates = {
            silo: algorithm.local_round(runtimes[silo], 2, federation.payload(silo, 2).values)
            for silo in federation.status().selected
        }
        error: Exception | None = None
        with volume.full() if kind == "full" else volume.read_only():
            try:
                for update in updates.values():
                    federation.submit_update(update)  # the last one closes round 2: the state write fails
            except Exception as exc:  # noqa: BLE001 - what the caller sees is the point
                error = exc
            numbers["error"] = f"{type(error).__name__}: {error}" if error else None
            checks["the failed write is refused clearly (retryable, naming the state dir)"] = (
                isinstance(error, Rejected) and error.reason == "unavailable" and str(volume.path) in str(error)
            )
            checks["the previous state is intact on disk"] = _files(volume.path) == before
            assignments = {silo: federation.assignment(silo).action for silo in runtimes}
            numbers["assignments_while_unwritable"] = assignments
            checks["nothing unsaved is handed out"] = set(assignments.values()) == {"wait"} and _refused(
                lambda: federation.payload(next(iter(runtimes)), 2)
            )
            checks["a restart meanwhile refuses to start, saying why"] = _refused(
                lambda: Federation(config, state_dir=volume.path, expected_silos=len(runtimes)), TapError
            )
            federation.tick()  # still unwritable: no crash, still waiting
            checks["still waiting while unwritable"] = federation.assignment(next(iter(runtimes))).action == "wait"
        restarted = Federation(config, state_dir=volume.path, expected_silos=len(runtimes)).status()
        checks["a restart resumes the previous checkpoint"] = (restarted.phase, restarted.round) == ("training", 2)
        federation.tick()  # writable again: the pending checkpoint is written
        status = federation.status()
        checks["carries on once writable"] = status.phase == "finishing"
        if status.phase == "finishing":
            for silo in sorted(runtimes):
                result, _ = algorithm.finish(runtimes[silo], federation.payload(silo, status.round).values)
                federation.submit_result(result)
            equal, detail, gaps = compare_run(federation.report(), federation.global_values(), reference)
            numbers.update(gaps)
            checks["ends as an uninterrupted run"] = equal
    name = f"state volume {'full' if kind == 'full' else 'read-only'} ({numbers['volume']})"
    return ScenarioOutcome.from_checks(name, checks, numbers)


def unwritable_state_dir(root: Path, real: bool | None = None) -> ScenarioOutcome:
    """A server given a state directory it cannot write refuses to start, saying so (before any silo joins)."""
    from tap_core.errors import TapError
    from tap_server.federation import Federation

    with StateVolume(root / "state", real=real) as volume, volume.read_only():
        how = volume.how
        try:
            Federation(FAULT_CONFIG, state_dir=volume.path)
            error: Exception | None = None
        except Exception as exc:  # noqa: BLE001
            error = exc
    clear = isinstance(error, TapError) and str(volume.path) in str(error) and "writ" in str(error)
    detail = f"refused at start: {error}" if clear else f"FAILED: started anyway or unclear ({error!r})"
    return ScenarioOutcome(
        f"unwritable state dir at start ({how})", clear, detail, {"error": str(error) if error else None}
    )


def _refused(call: Callable[[], object], error: type[Exception] | None = None) -> bool:
    from tap_core.errors import Rejected

    expected = error or Rejected
    try:
        call()
    except expected:
        return True
    return False
