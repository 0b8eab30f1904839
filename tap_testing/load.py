"""Load: many light silos against one ``tap-server`` process; the server's memory per round; hostile neighbours.

:func:`load_run` provisions ``silos`` light silos (:mod:`tap_testing.light`: the
real protocol over mTLS, trivial training) sharing one task of the tiny model,
starts ``tap-server serve`` as its own process and lets every silo run the
federation from its own thread. It records, at each round boundary (from the
server's ``tap_round`` metric), the wall time and the server's resident memory
(``/proc/PID/status``), and checks: every round completes with every silo, the
final global model is exactly what the silos' known shifts make it, and the
server's memory is flat over rounds.

With ``attackers=True`` two of the silos are hostile instead: one floods Polls
(hundreds at once, again and again), one opens uploads and stalls them. The
other ``silos - 2`` must still finish every round (rounds close at the deadline
with ``min_clients = silos - 2``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from tap_core.config import Deadlines, FederationConfig, ModelSpec, TrainConfig, WireConfig
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_testing.cluster import Cluster
from tap_testing.light import IMAGE_TASK, LightSilo, expected_final, fingerprint_of, max_difference
from tap_testing.outcome import ScenarioOutcome

LOAD_CONFIG = FederationConfig(
    name="load",
    algorithm="fedavg",
    rounds=5,
    seed=0,
    model=ModelSpec(size="tiny"),
    train=TrainConfig(local_steps=1, ft_steps=1, kd_steps=1, batch_size=4),
    wire=WireConfig(chunk_bytes=64 * 1024, max_message_bytes=1024 * 1024),
    deadlines=Deadlines(join_s=300, round_s=120, finish_s=120, heartbeat_s=5.0),
)
FLOOD_POLLS = 300  # concurrent Polls the flooder keeps open (the attack)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RoundWatch(threading.Thread):
    """Samples the server at every round boundary: (round, seconds since the first, RSS MB)."""

    def __init__(self, cluster: Cluster):
        super().__init__(name="round-watch", daemon=True)
        self.cluster = cluster
        self.samples: list[tuple[int, float, float]] = []
        self.peak_mb = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        from tap_cli.demo import read_metrics

        assert self.cluster.server is not None
        pid, last, started = self.cluster.server.pid, -1, time.monotonic()
        while not self._halt.wait(0.1) and self.cluster.server.poll() is None:
            try:
                metrics = read_metrics(self.cluster.metrics_port)
                rss = _rss_mb(pid)
            except (OSError, ValueError):
                continue
            self.peak_mb = max(self.peak_mb, rss)
            current = int(metrics.get("tap_round", 0)) + int("phase:finishing" in metrics or "phase:done" in metrics)
            if current != last:
                last = current
                self.samples.append((current, round(time.monotonic() - started, 2), round(rss, 1)))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class PollFlood(threading.Thread):
    """A joined silo that keeps ``polls`` long polls open at once, renewing each as soon as it returns."""

    def __init__(self, channel: grpc.Channel, polls: int = FLOOD_POLLS):
        super().__init__(name="poll-flood", daemon=True)
        self.stub, self.polls = pb_grpc.FederationStub(channel), polls
        self.stopped = threading.Event()
        self.answers: dict[str, int] = {}
        self._lock = threading.Lock()

    def _one(self) -> None:
        while not self.stopped.is_set():
            try:
                self.stub.Poll(pb.PollRequest(wait_s=30), timeout=35)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            except ValueError:  # "Channel closed!": the test is over and closed the flood's channel
                return
            with self._lock:
                self.answers[code] = self.answers.get(code, 0) + 1

    def run(self) -> None:
        workers = [threading.Thread(target=self._one, daemon=True) for _ in range(self.polls)]
        for worker in workers:
            worker.start()
        self.stopped.wait()


class UploadStall(threading.Thread):
    """A joined silo that opens uploads for the current round, sends the header, then nothing, again and again."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(name="upload-stall", daemon=True)
        self.stub = pb_grpc.FederationStub(channel)
        self.stopped = threading.Event()
        self.opened = 0
        self.answers: dict[str, int] = {}

    def _frames(self, round_index: int):
        yield pb.TensorFrame(header=pb.StreamHeader(round=round_index, payload_bytes=1))
        self.stopped.wait()  # and then nothing until the test ends (or the server cuts the stream)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                round_index = self.stub.Poll(pb.PollRequest(wait_s=5), timeout=35).round or 1
                self.opened += 1
                self.stub.Upload(self._frames(round_index), timeout=3600)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            self.answers[code] = self.answers.get(code, 0) + 1
            self.stopped.wait(0.2)


def _hostile_channel(cluster: Cluster, silo: str, fingerprint: str) -> grpc.Channel:
    """An mTLS channel of ``silo`` that has joined the federation."""
    import json

    kit = cluster.kits / silo
    credentials = grpc.ssl_channel_credentials(
        (kit / "ca.crt").read_bytes(), (kit / "client.key").read_bytes(), (kit / "client.crt").read_bytes()
    )
    channel = grpc.secure_channel(f"127.0.0.1:{cluster.port}", credentials)
    stub = pb_grpc.FederationStub(channel)
    declaration = {
        "silo": silo,
        "tasks": [IMAGE_TASK],
        "train_samples": {IMAGE_TASK["name"]: 10},
        "labels_seen": {IMAGE_TASK["name"]: ["circle", "square", "triangle"]},
        "fingerprint": fingerprint,
    }
    stub.Hello(pb.HelloRequest(client_version="hostile"), timeout=30)
    stub.Join(pb.JoinRequest(declaration_json=json.dumps(declaration)), timeout=60)
    return channel


def load_run(
    root: Path,
    silos: int = 64,
    rounds: int = 5,
    attackers: bool = False,
    round_s: float | None = None,
    timeout_s: float = 900.0,
    rss_growth_mb: float = 25.0,
    flood_polls: int = FLOOD_POLLS,
) -> ScenarioOutcome:
    """``silos`` concurrent silo connections for ``rounds`` rounds (two of them hostile with ``attackers``)."""
    hostile = ["flooder", "staller"] if attackers else []
    honest = [f"silo{i:02d}" for i in range(silos - len(hostile))]
    deadlines = dataclasses.replace(
        LOAD_CONFIG.deadlines,
        round_s=round_s or LOAD_CONFIG.deadlines.round_s,
        finish_s=round_s or LOAD_CONFIG.deadlines.finish_s,
    )
    config = dataclasses.replace(LOAD_CONFIG, rounds=rounds, min_clients=len(honest), deadlines=deadlines)
    cluster = Cluster.create(
        root, config, {name: (IMAGE_TASK, 0) for name in [*honest, *hostile]}, data=False, metrics=True
    )
    fingerprint = fingerprint_of(config)
    name = f"load: {silos} silos, {rounds} rounds" + (", one flooding Polls, one stalling uploads" if attackers else "")
    numbers: dict[str, Any] = {"silos": silos, "honest": len(honest), "rounds": rounds}
    if attackers:
        numbers["flood_polls"] = flood_polls
    checks: dict[str, bool] = {}
    attacks: list[Any] = []
    with cluster:
        cluster.start_server()
        watch = RoundWatch(cluster)
        watch.start()
        started = time.monotonic()
        shifts = {silo: 0.001 * (i + 1) for i, silo in enumerate(honest)}
        threads = [
            LightSilo(cluster.kits / silo, f"127.0.0.1:{cluster.port}", fingerprint, shift=shifts[silo])
            for silo in honest
        ]
        channels = []
        try:
            if attackers:  # they join first, so the flood is on before the honest silos arrive
                channels = [_hostile_channel(cluster, silo, fingerprint) for silo in hostile]
                attacks = [PollFlood(channels[0], flood_polls), UploadStall(channels[1])]
                for attack in attacks:
                    attack.start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
            numbers["seconds"] = round(time.monotonic() - started, 1)
        finally:
            for attack in attacks:
                attack.stopped.set()
            for channel in channels:
                channel.close()
        code = cluster.wait_exit(cluster.server, 120, "server")  # type: ignore[arg-type]
        watch.stop()
    records = {t.silo: t.record for t in threads}
    unfinished = sorted(silo for silo, r in records.items() if not r.finished)
    checks["every honest silo finished"] = not unfinished
    missed = {silo: sorted(set(range(1, rounds + 1)) - set(r.rounds)) for silo, r in records.items()}
    numbers["missed_rounds"] = {silo: late for silo, late in missed.items() if late}  # updates that came too late
    checks["every round completed with every honest silo"] = not numbers["missed_rounds"]
    checks["the server exited 0"] = code == 0
    numbers["errors"] = {silo: r.error for silo, r in records.items() if r.error}
    numbers["unfinished"] = unfinished[:10]
    first = next((r.first_values for r in records.values() if r.first_values is not None), None)
    final = next((r.final_values for r in records.values() if r.final_values is not None), None)
    if first is not None and final is not None:
        per_round = [[shifts[s] for s, r in records.items() if k in r.rounds] for k in range(1, rounds + 1)]
        numbers["aggregate_max_abs_error"] = max_difference(final, expected_final(first, per_round))
        checks["the final model is exactly the silos' known updates"] = numbers["aggregate_max_abs_error"] < 1e-5
    else:
        checks["the final model is exactly the silos' known updates"] = False
    numbers["per_round"] = [{"round": r, "t_s": t, "rss_mb": m} for r, t, m in watch.samples]
    numbers["peak_rss_mb"] = round(watch.peak_mb, 1)
    rss = [m for r, _, m in watch.samples if r >= 2]
    if len(rss) >= 2:
        numbers["rss_growth_after_round_2_mb"] = round(max(rss) - rss[0], 1)
        checks[f"server memory flat over rounds (< {rss_growth_mb:.0f} MB growth after round 2)"] = (
            numbers["rss_growth_after_round_2_mb"] < rss_growth_mb
        )
    times = [t for r, t, _ in watch.samples if 1 <= r <= rounds + 1]
    if len(times) >= 2:
        numbers["rounds_per_s"] = round((len(times) - 1) / max(1e-9, times[-1] - times[0]), 3)
    for attack in attacks:
        numbers[f"{attack.name}_answers"] = dict(attack.answers)
    return ScenarioOutcome.from_checks(name, checks, numbers, when_failed=f". Server log: {cluster.tail('server', 6)}")
