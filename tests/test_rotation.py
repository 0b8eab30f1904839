"""Certificates over a federation's life: ``tap-server rotate``, live reload, retirement, expiry gauge, liveness.

A running server picks up a renewed server certificate at its next TLS handshake; a renewed silo's
previous certificate works until the new one is used and is refused from then on (also after a
restart); a federation whose certificates are renewed between rounds finishes with every round and
the same results as without; liveness fails when the mTLS server is wedged while the plaintext
health port still answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import socket
import ssl
import threading
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ops_federation import (
    free_port,
    make_tiny_federation,
    metrics_up,
    read_metrics,
    rounds_completed,
    tiny_config,
    wait_for,
)
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_server.cli import main as server_cli
from tap_server.daemon import SERVICE_NAME, ServeOptions, ServerDaemon

RPC_TIMEOUT = 10


def start_daemon(fed, state: Path, **options) -> ServerDaemon:
    opts = ServeOptions(
        kit=fed.kits / "server", listen="127.0.0.1:0", state_dir=state, metrics_port=0, health_port=0, **options
    )
    return ServerDaemon(fed.config, opts).start()


def hello(daemon: ServerDaemon, kit: Path) -> str:
    """The Hello RPC with the certificate in ``kit``: the silo id, or the gRPC error code's name."""
    creds = grpc.ssl_channel_credentials(
        (kit / "ca.crt").read_bytes(), (kit / "client.key").read_bytes(), (kit / "client.crt").read_bytes()
    )
    with grpc.secure_channel(f"127.0.0.1:{daemon.port}", creds) as channel:
        try:
            return pb_grpc.FederationStub(channel).Hello(pb.HelloRequest(), timeout=RPC_TIMEOUT).silo_id
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"


def served_certificate(port: int, kit: Path) -> str:
    """SHA-256 of the certificate the server presents in a new TLS handshake."""
    context = ssl.create_default_context(cafile=str(kit / "ca.crt"))
    context.load_cert_chain(kit / "client.crt", kit / "client.key")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def pem_sha256(path: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


def rotate(*args: str):
    result = CliRunner().invoke(server_cli, ["rotate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def days_left(daemon: ServerDaemon) -> dict[tuple[str, str], float]:
    samples = read_metrics(daemon.metrics_port)
    return {
        (dict(labels)["certificate"], dict(labels)["silo"]): value
        for (name, labels), value in samples.items()
        if name == "tap_certificate_days_left"
    }


def liveness(daemon: ServerDaemon) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{daemon.health_port}") as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
            .status
        )


def test_rotation_renews_server_and_silo_certificates_while_serving(tmp_path):
    fed = make_tiny_federation(tmp_path, days=365)
    old_alpha = tmp_path / "alpha-before-rotation"
    shutil.copytree(fed.kits / "alpha", old_alpha)
    old_server = pem_sha256(fed.kits / "server" / "server.crt")
    daemon = start_daemon(fed, tmp_path / "server-state")
    try:
        assert hello(daemon, fed.kits / "alpha") == "alpha"
        assert served_certificate(daemon.port, fed.kits / "alpha") == old_server
        before = days_left(daemon)
        assert 364 < before[("server", "")] <= 365 and 364 < before[("silo", "alpha")] <= 365
        assert before[("ca", "")] > 3000
        status = daemon.federation.status()
        round_before = status.round, status.phase

        out = rotate("--out", str(fed.kits), "--server", "--silo", "alpha", "--days", "30").output
        assert "silo alpha: new kit" in out and "server: new certificate" in out

        new_server = pem_sha256(fed.kits / "server" / "server.crt")
        assert new_server != old_server
        assert served_certificate(daemon.port, fed.kits / "beta") == new_server, (
            "the running server reloads its certificate"
        )
        after = days_left(daemon)
        assert 29 < after[("server", "")] <= 30 and 29 < after[("silo", "alpha")] <= 30
        assert 364 < after[("silo", "beta")] <= 365

        # until the new certificate is used, the previous one still works; then it is refused for good
        assert hello(daemon, old_alpha) == "alpha"
        assert hello(daemon, fed.kits / "alpha") == "alpha"
        refused = hello(daemon, old_alpha)
        assert refused.startswith("PERMISSION_DENIED") and "rotated" in refused, refused
        assert hello(daemon, fed.kits / "beta") == "beta", "other silos are untouched"
        status = daemon.federation.status()
        assert (status.round, status.phase) == round_before, "the federation did not move"
        rejected = daemon.metrics.registry.get_sample_value(
            "tap_rejected_requests_total", {"reason": "retired_certificate"}
        )
        assert rejected == 1
    finally:
        daemon.stop(grace=0)

    # the retirement survives a restart (it is kept in the state directory, the kit may be read-only)
    again = start_daemon(fed, tmp_path / "server-state")
    try:
        assert hello(again, old_alpha).startswith("PERMISSION_DENIED")
        assert hello(again, fed.kits / "alpha") == "alpha"
    finally:
        again.stop(grace=0)


def test_a_half_written_server_kit_keeps_the_working_certificate(tmp_path):
    fed = make_tiny_federation(tmp_path)
    daemon = start_daemon(fed, tmp_path / "server-state")
    try:
        served = served_certificate(daemon.port, fed.kits / "alpha")
        (fed.kits / "server" / "server.key").write_bytes((fed.kits / "alpha" / "client.key").read_bytes())
        assert served_certificate(daemon.port, fed.kits / "alpha") == served
        assert hello(daemon, fed.kits / "alpha") == "alpha"
    finally:
        daemon.stop(grace=0)


def test_rotate_refuses_what_it_cannot_renew(tmp_path):
    fed = make_tiny_federation(tmp_path)
    runner = CliRunner()
    result = runner.invoke(server_cli, ["rotate", "--out", str(fed.kits), "--silo", "gamma"])
    assert result.exit_code == 2 and "not provisioned" in result.output and "alpha" in result.output
    result = runner.invoke(server_cli, ["rotate", "--out", str(fed.kits)])
    assert result.exit_code != 0 and "--server, --silo ID or --all-silos" in result.output
    shutil.move(fed.kits / "ca", tmp_path / "ca-offline")
    result = runner.invoke(server_cli, ["rotate", "--out", str(fed.kits), "--server"])
    assert result.exit_code == 2 and "ca.key" in result.output
    registry = json.loads((fed.kits / "server" / "silos.json").read_text())
    assert "previous" not in registry["silos"]["alpha"], "a refused rotation changes nothing"


def test_liveness_fails_when_the_mtls_server_is_wedged(tmp_path):
    """All workers of the silo-facing server stuck: readiness still SERVING, liveness NOT_SERVING, then back."""
    fed = make_tiny_federation(tmp_path)
    daemon = start_daemon(fed, tmp_path / "server-state", liveness_interval_s=0.3, liveness_timeout_s=1.0)
    release = threading.Event()
    try:
        assert liveness(daemon) == health_pb2.HealthCheckResponse.SERVING
        for _ in range(daemon._executor._max_workers):
            daemon._executor.submit(release.wait)
        wait_for(lambda: liveness(daemon) == health_pb2.HealthCheckResponse.NOT_SERVING, 20, "liveness to fail")
        with grpc.insecure_channel(f"127.0.0.1:{daemon.health_port}") as channel:
            ready = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=RPC_TIMEOUT
            )
        assert ready.status == health_pb2.HealthCheckResponse.SERVING, "readiness is about the state, not the workers"
        release.set()
        wait_for(lambda: liveness(daemon) == health_pb2.HealthCheckResponse.SERVING, 20, "liveness to recover")
    finally:
        release.set()
        daemon.stop(grace=0)


@pytest.mark.slow
def test_federation_finishes_with_every_round_when_certificates_rotate_mid_way(tmp_path):
    """Real processes: after round 1 the server and silo alpha get new certificates; alpha's agent restarts
    with its new kit; the server runs through and the results equal an undisturbed simulation."""
    from tap_cli.simulate import run_simulation
    from tap_core.config import Scenario
    from tap_core.scenario import load_silo_config

    fed = make_tiny_federation(tmp_path, rounds=2)
    port, health, metrics = free_port(), free_port(), free_port()
    server = fed.start(fed.server_command(port, health, metrics, "--exit-when-done"), "server")
    agents = {}
    try:
        wait_for(
            lambda: server.poll() is None and metrics_up(metrics),
            60,
            "the server",
            on_timeout=lambda: fed.log("server"),
        )
        agents = {s: fed.start(fed.client_command(s, port), s) for s in fed.silos}
        wait_for(
            lambda: rounds_completed(fed.state / "server") >= 1,
            180,
            "round 1 to complete",
            on_timeout=lambda: fed.log("server") + fed.log("alpha"),
        )
        rotate("--out", str(fed.kits), "--server", "--silo", "alpha")
        agents["alpha"].send_signal(signal.SIGTERM)
        assert agents["alpha"].wait(timeout=60) in (0, -signal.SIGTERM), fed.log("alpha")
        agents["alpha"] = fed.start(fed.client_command("alpha", port), "alpha")
        assert server.wait(timeout=300) == 0, fed.log("server")
        for silo, agent in agents.items():
            assert agent.wait(timeout=60) == 0, fed.log(silo)
    finally:
        for process in [server, *agents.values()]:
            if process.poll() is None:
                process.kill()
    report = json.loads((fed.state / "server" / "report.json").read_text())
    assert [r["round"] for r in report["history"]] == [1, 2] and not report["dropped"]
    assert "reloaded" in fed.log("server", tail=10**6), "the server took the new certificate without a restart"
    assert "resumed local state" in fed.log("alpha", tail=10**6)

    silos = tuple(dataclasses.replace(load_silo_config(fed.silo_yaml(s))[0], id=s) for s in fed.silos)
    simulated = run_simulation(Scenario("ops-test", silos), fed.config)
    for got, want in zip(report["tasks"], simulated["tasks"]):
        assert (got["silo"], got["task"]) == (want["silo"], want["task"])
        for key, value in want["metrics"].items():
            assert abs(got["metrics"][key] - value) <= 1e-4, (got["silo"], key, got["metrics"][key], value)


def test_tiny_config_is_valid():
    from tap_core.config import validate_federation

    validate_federation(tiny_config())
