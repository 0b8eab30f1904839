"""The deployed system over loopback with real mTLS, end to end: a whole federation, agents that stop, health,
metrics, the daemon's clock and ports. (Refusals: test_servicer.py; the agent's channel: test_connection.py;
kits: test_provisioning.py.)"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    GRPC_CONFIG,
    RPC_TIMEOUT,
    client_cli,
    credentials,
    finished,
    popen,
    rejected,
    rpc_error,
    start_server,
    stub_for,
    write_silo_data,
)

from tap_core.errors import ConfigError
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_server.daemon import SERVICE_NAME, ServeOptions, ServerDaemon
from tap_server.provision import provision


# -------------------------------------------------------------- full federation


@pytest.mark.slow
def test_full_federation_over_mtls(tmp_path):
    """Two silos (one in a thread via Agent, one as the tap-client CLI) run a whole TAP federation."""
    from tap_client.agent import Agent, AgentOptions
    from tap_core.scenario import load_silo_config

    kits = tmp_path / "kits"
    provision(kits, ["alpha", "beta"], ["127.0.0.1"])
    configs = write_silo_data(tmp_path / "data")
    daemon = start_server(kits / "server", tmp_path / "state", exit_when_done=True)
    threads_before = torch.get_num_threads()
    try:
        beta = popen(client_cli(kits / "beta", daemon, configs["beta"], tmp_path / "clients" / "beta"))
        codes: dict[str, object] = {}

        def run_alpha() -> None:
            try:
                silo, _ = load_silo_config(configs["alpha"])
                options = AgentOptions(
                    kit=kits / "alpha",
                    server=f"127.0.0.1:{daemon.port}",
                    silo=silo,
                    config_path=configs["alpha"],
                    state_dir=tmp_path / "clients" / "alpha",
                    threads=1,
                )
                codes["alpha"] = Agent(options).run()
            except BaseException as exc:  # reported by the assertion below
                codes["alpha"] = exc

        alpha = threading.Thread(target=run_alpha, daemon=True)
        alpha.start()
        code, output = finished(beta, timeout=150)
        alpha.join(timeout=60)
        assert not alpha.is_alive(), "agent alpha did not finish"
        assert codes["alpha"] == 0, codes["alpha"]
        assert code == 0, output[-3000:]
        assert daemon.stop_event.wait(15), "the server did not stop by itself (--exit-when-done)"
    finally:
        daemon.stop(grace=1)
        torch.set_num_threads(threads_before)

    report = json.loads((tmp_path / "state" / "report.json").read_text())
    assert report["algorithm"] == "tap" and report["rounds"] == 2
    assert sorted((t["silo"], t["task"]) for t in report["tasks"]) == [("alpha", "shapes"), ("beta", "reviews")]
    assert math.isfinite(report["mean_primary"])
    assert [r["round"] for r in report["history"]] == [1, 2]
    assert all(not r["dropped"] for r in report["history"])
    for silo, task in (("alpha", "shapes"), ("beta", "reviews")):
        state = tmp_path / "clients" / silo
        results = json.loads((state / "results.json").read_text())
        assert results["silo"] == silo and [t["task"] for t in results["tasks"]] == [task]
        assert all(math.isfinite(v) for t in results["tasks"] for v in t["metrics"].values())
        assert (state / "final_model.safetensors").stat().st_size > 10_000
    # every transfer was counted with its real wire size, and framing stayed within budget
    streams = [e for e in report["timing"]["events"] if "stream_seconds" in e]
    assert {e["direction"] for e in streams} == {"down", "up", "final"} and len(streams) >= 2 * 2 * 2 + 2
    rows = report["transport"]["per_client_round"]
    assert len(rows) == 4 and all(
        r["payload_bytes"] <= r["wire_bytes"] <= 1.05 * r["payload_bytes"] + 128 for r in rows
    )
    assert daemon.metrics.registry.get_sample_value("tap_rounds_completed_total") == 2
    assert daemon.metrics.registry.get_sample_value("tap_updates_received_total") == 4


@pytest.mark.parametrize("what", ["update", "results"])
def test_agent_stops_when_the_server_refuses_its_numbers_as_invalid(tmp_path, what):
    """An update (NaN) or results (wrong tasks) the server refuses as invalid: the agent must not re-send the same
    saved numbers on every poll until the deadline."""
    from tap_client.agent import Agent, AgentOptions
    from tap_client.connection import Refused
    from tap_core.scenario import load_silo_config

    kits = tmp_path / "kits"
    provision(kits, ["alpha"], ["127.0.0.1"])
    configs = write_silo_data(tmp_path / "data")
    daemon = start_server(
        kits / "server", tmp_path / "state", config=dataclasses.replace(GRPC_CONFIG, expected_silos=1)
    )

    class DivergingAgent(Agent):
        def prepare(self) -> None:
            super().prepare()
            train, finish = self.algorithm.local_round, self.algorithm.finish

            def local_round(runtime, round_index, values):
                update = train(runtime, round_index, values)
                if what == "update":
                    tensor = next(iter(next(iter(update.values.values())).values()))
                    tensor.view(-1)[0] = float("nan")
                return update

            def stage2(runtime, values):
                result, model = finish(runtime, values)
                if what == "results":
                    result.tasks[0].task = "not-my-task"  # results for a task this silo does not have
                return result, model

            self.algorithm.local_round = local_round
            self.algorithm.finish = stage2

    try:
        silo, _ = load_silo_config(configs["alpha"])
        agent = DivergingAgent(
            AgentOptions(
                kit=kits / "alpha",
                server=f"127.0.0.1:{daemon.port}",
                silo=silo,
                config_path=configs["alpha"],
                state_dir=tmp_path / "client",
                threads=1,
            )
        )
        outcome: dict[str, object] = {}
        thread = threading.Thread(target=lambda: outcome.setdefault("result", _run_catching(agent)), daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the agent keeps re-sending a refused update"
        assert isinstance(outcome["result"], Refused), outcome
        assert outcome["result"].status == "INVALID_ARGUMENT"
        if what == "update":
            assert rejected(daemon, "non_finite") == 1
            assert outcome["result"].reason == "non_finite" and "NaN" in str(outcome["result"])
            assert daemon.federation.status().received == ()
        else:
            assert rejected(daemon, "bad_result") == 1
            assert outcome["result"].reason == "bad_result" and "not-my-task" in str(outcome["result"])
            assert daemon.federation.status().results == ()
    finally:
        daemon.stop(grace=1)


def _run_catching(agent):
    try:
        return agent.run()
    except Exception as exc:
        return exc


# ------------------------------------------------------------- health, metrics


def test_health_serving_on_mtls_and_plaintext_ports(server, kits):
    assert server.health_port and server.health_port != server.port
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        # the plaintext port serves health only
        err = rpc_error(pb_grpc.FederationStub(channel).Hello, pb.HelloRequest())
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    channel, _ = stub_for(server, credentials(kits / "beta"))
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_second_server_on_the_same_port_is_refused(server, kits, tmp_path):
    """gRPC would share the port (SO_REUSEPORT) and split the silos between two federations."""
    opts = ServeOptions(
        kit=kits / "server",
        listen=f"127.0.0.1:{server.port}",
        state_dir=tmp_path / "state",
        metrics_port=0,
        health_port=0,
    )
    second = ServerDaemon(GRPC_CONFIG, opts)
    with pytest.raises(ConfigError, match="could not bind"):
        second.start()
    assert second.stop_event.is_set()  # what it had bound (health, metrics) is released
    opts = dataclasses.replace(opts, listen="127.0.0.1:0", health_port=server.health_port)
    with pytest.raises(ConfigError, match="health-port"):
        ServerDaemon(GRPC_CONFIG, opts).start()
    opts = dataclasses.replace(opts, health_port=0, metrics_port=server.metrics_port)
    with pytest.raises(ConfigError, match="metrics-port"):
        ServerDaemon(GRPC_CONFIG, opts).start()


def test_clock_survives_a_failing_deadline_check(kits, tmp_path):
    daemon = start_server(kits / "server", tmp_path / "state")
    try:
        calls = []

        def failing_tick():
            calls.append(1)
            raise OSError("disk full")

        daemon.federation.tick = failing_tick
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(calls) >= 3, "the clock thread died at the first failure"
    finally:
        daemon.stop(grace=0)


def test_health_not_serving_after_stop(kits, tmp_path):
    daemon = start_server(kits / "server", tmp_path / "state")
    daemon.stop(grace=0)
    assert (
        daemon.health.Check(health_pb2.HealthCheckRequest(service=""), None).status
        == health_pb2.HealthCheckResponse.NOT_SERVING
    )


def test_prometheus_endpoint_serves_every_metric(server, round1):
    from prometheus_client.parser import text_string_to_metric_families

    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=RPC_TIMEOUT).read().decode()
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    registered = {f.name for f in server.metrics.registry.collect()}
    assert registered <= set(families), f"missing: {sorted(registered - set(families))}"
    samples = {s.name: s for f in families.values() for s in f.samples if not s.labels}
    assert samples["tap_round"].value == 1
    assert samples["tap_clients_joined"].value == 2
    assert samples["tap_rounds_planned"].value == GRPC_CONFIG.rounds
    phases = {s.labels["phase"]: s.value for s in families["tap_phase"].samples}
    assert phases["training"] == 1 and sum(phases.values()) == 1
    sent = {s.labels["kind"] for s in families["tap_bytes_sent"].samples if s.name == "tap_bytes_sent_total"}
    assert {"encoder", "head"} <= sent
    # every exported sample name is one metrics.py declares (the contract with deploy/)
    declared = server.metrics.exported_names()
    assert {s.name for f in families.values() for s in f.samples} <= declared
