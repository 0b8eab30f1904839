"""The deployed system over loopback with real mTLS: federation, refusals, validation, health, metrics.

Servers are the in-process ``ServerDaemon`` bound to 127.0.0.1 with free ports;
kits come from ``tap_server.provision``. Agents run in threads (and one as the
real ``tap-client`` CLI); refusals are driven through the raw generated stub so
each bad request can be shaped exactly. Every RPC has an explicit timeout.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tap_core.config import Deadlines, FederationConfig, ModelSpec, TrainConfig, WireConfig
from tap_core.errors import ConfigError
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_core.wire import StreamDecoder, StreamInfo, encode_stream, layout_from_proto
from tap_server.daemon import SERVICE_NAME, ServeOptions, ServerDaemon
from tap_server.provision import CertificateAuthority, SiloRegistry, _cert_pem, _key_pem, add_silo, cert_fingerprint, provision

RPC_TIMEOUT = 15
CLI_TIMEOUT = 90  # "quickly": the agent would otherwise retry for an hour
ROOT = Path(__file__).resolve().parents[1]

CONFIG = FederationConfig(
    name="grpc-test",
    rounds=2,
    seed=0,
    expected_silos=2,
    model=ModelSpec(size="tiny"),
    train=TrainConfig(local_steps=2, ft_steps=1, kd_steps=1, batch_size=4, eval_batch_size=16, max_val_examples=8),
    wire=WireConfig(chunk_bytes=64 * 1024, max_message_bytes=1024 * 1024),
    deadlines=Deadlines(join_s=300, round_s=300, finish_s=300, heartbeat_s=1.0),
)

ALPHA_TASK = {"name": "shapes", "kind": "classification", "modalities": ["image"], "family": "image_classification",
              "domain": "general"}
BETA_TASK = {"name": "reviews", "kind": "classification", "modalities": ["text"], "family": "text_classification",
             "domain": "general"}


# ------------------------------------------------------------------ helpers


def start_server(kit: Path, state: Path, config: FederationConfig = CONFIG, **options) -> ServerDaemon:
    opts = ServeOptions(kit=kit, listen="127.0.0.1:0", state_dir=state, metrics_port=0, health_port=0, done_grace_s=5.0,
                        **options)
    return ServerDaemon(config, opts).start()


def credentials(kit_dir: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials((kit_dir / "ca.crt").read_bytes(), (kit_dir / "client.key").read_bytes(),
                                        (kit_dir / "client.crt").read_bytes())


def stub_for(server: ServerDaemon, creds: grpc.ChannelCredentials | None) -> tuple[grpc.Channel, pb_grpc.FederationStub]:
    target = f"127.0.0.1:{server.port}"
    channel = grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)
    return channel, pb_grpc.FederationStub(channel)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=RPC_TIMEOUT, **kwargs)
    return info.value


def rejected(server: ServerDaemon, reason: str) -> float:
    return server.metrics.registry.get_sample_value("tap_rejected_requests_total", {"reason": reason}) or 0.0


def declaration(silo_claim: str, task: dict, samples: int, labels: list[str], fingerprint: str) -> str:
    return json.dumps({"silo": silo_claim, "tasks": [task], "train_samples": {task["name"]: samples},
                       "labels_seen": {task["name"]: labels}, "fingerprint": fingerprint, "device": "cpu"})


def write_silo_data(root: Path) -> dict[str, Path]:
    """An npz image classification task for alpha, a csv text classification task for beta."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.array(["circle", "square", "triangle"] * 10)
    images = rng.integers(0, 255, size=(30, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "shapes.npz", images=images, labels=labels)
    with open(root / "reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict"])
        for i in range(30):
            good = i % 2 == 0
            writer.writerow([f"review {i}: the film was {'wonderful and moving' if good else 'dull and far too long'}",
                             "fresh" if good else "rotten"])
    alpha = root / "alpha.yaml"
    alpha.write_text(yaml.safe_dump({"tasks": [dict(ALPHA_TASK, data={"format": "npz", "path": "shapes.npz",
                                                                      "test_fraction": 0.2})]}))
    beta = root / "beta.yaml"
    beta.write_text(yaml.safe_dump({"tasks": [dict(BETA_TASK, data={"format": "csv", "path": "reviews.csv",
                                                                    "text_column": "review", "label_column": "verdict",
                                                                    "test_fraction": 0.2})]}))
    return {"alpha": alpha, "beta": beta}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def client_cli(kit: Path, server: ServerDaemon | str, config: Path, state: Path) -> list[str]:
    address = server if isinstance(server, str) else f"127.0.0.1:{server.port}"
    return cli("tap_client.cli", "run", "--kit", str(kit), "--server", address, "--config", str(config),
               "--state", str(state), "--threads", "1")


def tap_server(args: list[str]):
    """The ``tap-server`` command, in process (click's runner): provision, revoke."""
    from click.testing import CliRunner

    from tap_server.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def popen(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)


def finished(process: subprocess.Popen, timeout: float = CLI_TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"{process.args} still running after {timeout}s (retrying forever?):\n{out[-3000:]}")
    return process.returncode, out


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kits")
    provision(root, ["alpha", "beta", "delta"], ["127.0.0.1"])
    return root


@pytest.fixture(scope="module")
def other_kits(tmp_path_factory) -> Path:
    """A second, unrelated provisioning: another CA."""
    root = tmp_path_factory.mktemp("other")
    provision(root, ["alpha"], ["127.0.0.1"])
    return root


@pytest.fixture(scope="module")
def server(kits, tmp_path_factory):
    daemon = start_server(kits / "server", tmp_path_factory.mktemp("state"))
    yield daemon
    daemon.stop(grace=1)


def join_both(server: ServerDaemon, kits: Path) -> dict:
    """Hello + Join for alpha and beta over mTLS, then Poll until both have a TRAIN assignment for round 1."""
    fingerprint = server.federation.fingerprint
    out = {}
    for silo, task, samples, labels in (("alpha", ALPHA_TASK, 10, ["a", "b", "c"]), ("beta", BETA_TASK, 6, ["neg", "pos"])):
        channel, stub = stub_for(server, credentials(kits / silo))
        hello = stub.Hello(pb.HelloRequest(client_version="test"), timeout=RPC_TIMEOUT)
        assert hello.silo_id == silo
        # the declaration claims to be someone else: identity comes from the certificate only
        joined = stub.Join(pb.JoinRequest(declaration_json=declaration("delta", task, samples, labels, fingerprint)),
                           timeout=RPC_TIMEOUT)
        assert joined.silo_id == silo
        out[silo] = {"channel": channel, "stub": stub, "samples": samples}
    assert set(server.federation.declarations) == {"alpha", "beta"}
    for silo, entry in out.items():
        assignment = entry["stub"].Poll(pb.PollRequest(wait_s=5), timeout=RPC_TIMEOUT)
        assert assignment.action == pb.Assignment.TRAIN and assignment.round == 1, assignment
        entry["layout"] = layout_from_proto(assignment.layout)
        decoder = StreamDecoder(entry["layout"], CONFIG.wire.dtype)
        for frame in entry["stub"].Download(pb.DownloadRequest(round=1), timeout=RPC_TIMEOUT):
            decoder.feed(frame)
        entry["values"] = decoder.finish()
        entry["weights"] = {c: float(entry["samples"]) for c in entry["layout"]}  # one task uses every component
    return out


@pytest.fixture(scope="module")
def round1(server, kits):
    silos = join_both(server, kits)
    yield silos
    for entry in silos.values():
        entry["channel"].close()


def frames_for(entry: dict, *, values=None, layout=None, dtype="fp32", round_index=1, weights=None,
               stats_json='{"task_losses": {"shapes": 1.0}}', chunk_bytes=4096) -> list[pb.TensorFrame]:
    frames = encode_stream(values or entry["values"], layout or entry["layout"], dtype, chunk_bytes,
                           StreamInfo(round_index, stats_json, entry["weights"] if weights is None else weights))
    return [pb.TensorFrame.FromString(f.SerializeToString()) for f in frames]


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
                options = AgentOptions(kit=kits / "alpha", server=f"127.0.0.1:{daemon.port}", silo=silo,
                                       config_path=configs["alpha"], state_dir=tmp_path / "clients" / "alpha", threads=1)
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
    assert [r["round"] for r in daemon.federation.history] == [1, 2]
    assert all(not r["dropped"] for r in daemon.federation.history)
    for silo, task in (("alpha", "shapes"), ("beta", "reviews")):
        state = tmp_path / "clients" / silo
        results = json.loads((state / "results.json").read_text())
        assert results["silo"] == silo and [t["task"] for t in results["tasks"]] == [task]
        assert all(math.isfinite(v) for t in results["tasks"] for v in t["metrics"].values())
        assert (state / "final_model.safetensors").stat().st_size > 10_000
    # every transfer was counted with its real wire size, and framing stayed within budget
    transport = daemon.federation.transport
    assert {t["direction"] for t in transport} == {"down", "up", "final"}
    assert all(t["payload_bytes"] <= t["wire_bytes"] <= 1.05 * t["payload_bytes"] + 64 for t in transport)
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
    daemon = start_server(kits / "server", tmp_path / "state", config=dataclasses.replace(CONFIG, expected_silos=1))

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
        agent = DivergingAgent(AgentOptions(kit=kits / "alpha", server=f"127.0.0.1:{daemon.port}", silo=silo,
                                            config_path=configs["alpha"], state_dir=tmp_path / "client", threads=1))
        outcome: dict[str, object] = {}
        thread = threading.Thread(target=lambda: outcome.setdefault("result", _run_catching(agent)), daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the agent keeps re-sending a refused update"
        assert isinstance(outcome["result"], Refused), outcome
        assert outcome["result"].code == grpc.StatusCode.INVALID_ARGUMENT
        if what == "update":
            assert rejected(daemon, "non_finite") == 1
            assert "NaN" in str(outcome["result"]) and daemon.federation.received == {}
        else:
            assert rejected(daemon, "bad_result") == 1
            assert "not-my-task" in str(outcome["result"]) and daemon.federation.results == {}
    finally:
        daemon.stop(grace=1)


def _run_catching(agent):
    try:
        return agent.run()
    except Exception as exc:
        return exc


# --------------------------------------------------------------- refused clients


def test_identity_is_the_certificate(server, kits):
    channel, stub = stub_for(server, credentials(kits / "delta"))
    with channel:
        hello = stub.Hello(pb.HelloRequest(), timeout=RPC_TIMEOUT)
        assert hello.silo_id == "delta"
        assert json.loads(hello.federation_json)["name"] == "grpc-test"


def test_client_certificate_from_another_ca_is_refused(server, kits, other_kits):
    before = len(server.federation.declarations)
    creds = grpc.ssl_channel_credentials((kits / "ca" / "ca.crt").read_bytes(),
                                         (other_kits / "alpha" / "client.key").read_bytes(),
                                         (other_kits / "alpha" / "client.crt").read_bytes())
    channel, stub = stub_for(server, creds)
    with channel:
        err = rpc_error(stub.Hello, pb.HelloRequest())
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: nothing reaches the servicer
    assert len(server.federation.declarations) == before


def test_client_without_certificate_is_refused(server, kits):
    channel, stub = stub_for(server, grpc.ssl_channel_credentials((kits / "ca" / "ca.crt").read_bytes()))
    with channel:
        err = rpc_error(stub.Hello, pb.HelloRequest())
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_refused(server):
    channel, stub = stub_for(server, None)
    with channel:
        err = rpc_error(stub.Hello, pb.HelloRequest())
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)
        assert rpc_error(health.Check, health_pb2.HealthCheckRequest()).code() == grpc.StatusCode.UNAVAILABLE


def test_valid_certificate_of_unprovisioned_silo_is_refused(server, kits, tmp_path):
    cert, key = CertificateAuthority.load(kits / "ca").issue("gamma", 30, client=True)
    creds = grpc.ssl_channel_credentials((kits / "ca" / "ca.crt").read_bytes(), _key_pem(key), _cert_pem(cert))
    before = rejected(server, "not_provisioned")
    channel, stub = stub_for(server, creds)
    with channel:
        for call, request in ((stub.Hello, pb.HelloRequest()), (stub.Poll, pb.PollRequest()),
                              (stub.Heartbeat, pb.HeartbeatRequest())):
            err = rpc_error(call, request)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "gamma" in err.details() and "not provisioned" in err.details()
    assert rejected(server, "not_provisioned") == before + 3
    assert "gamma" not in server.federation.declarations


def test_second_certificate_for_a_provisioned_silo_is_refused(server, kits):
    """Same CA, same CN as a provisioned silo, but not the certificate that was handed over."""
    cert, key = CertificateAuthority.load(kits / "ca").issue("alpha", 30, client=True)
    creds = grpc.ssl_channel_credentials((kits / "ca" / "ca.crt").read_bytes(), _key_pem(key), _cert_pem(cert))
    channel, stub = stub_for(server, creds)
    with channel:
        err = rpc_error(stub.Hello, pb.HelloRequest())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "not the one provisioned" in err.details()


def test_cli_refuses_bad_kits_quickly(server, kits, other_kits, tmp_path):
    """tap-client exits non-zero at once (no endless retries), naming the certificate at fault."""
    config = write_silo_data(tmp_path / "data")["beta"]
    ca = CertificateAuthority.load(kits / "ca")
    # a kit whose certificate is valid (same CA) for a silo nobody provisioned
    gamma = tmp_path / "gamma"
    cert, key = ca.issue("gamma", 30, client=True)
    gamma.mkdir()
    shutil.copy(kits / "ca" / "ca.crt", gamma / "ca.crt")
    (gamma / "client.crt").write_bytes(_cert_pem(cert))
    (gamma / "client.key").write_bytes(_key_pem(key))
    # this federation's CA with a client certificate from another CA
    hybrid = tmp_path / "hybrid"
    hybrid.mkdir()
    shutil.copy(kits / "ca" / "ca.crt", hybrid / "ca.crt")
    shutil.copy(other_kits / "alpha" / "client.crt", hybrid / "client.crt")
    shutil.copy(other_kits / "alpha" / "client.key", hybrid / "client.key")
    # a kit without its certificate
    nocert = tmp_path / "nocert"
    nocert.mkdir()
    shutil.copy(kits / "ca" / "ca.crt", nocert / "ca.crt")
    shutil.copy(kits / "beta" / "client.key", nocert / "client.key")
    # a server that does not trust this federation's silos (its ca.crt is another CA's), while the
    # silo trusts the server: the TLS handshake completes on the client's side, then the server hangs up
    distrust_kit = tmp_path / "distrust-server"
    shutil.copytree(kits / "server", distrust_kit)
    shutil.copy(other_kits / "ca" / "ca.crt", distrust_kit / "ca.crt")
    distrust = start_server(distrust_kit, tmp_path / "distrust-state")
    try:
        cases = {
            "other-ca-kit": (client_cli(other_kits / "alpha", server, config, tmp_path / "s1"), 3, ["TLS", "ca.crt"]),
            "hybrid": (client_cli(hybrid, server, config, tmp_path / "s2"), 2, ["client.crt", "not signed by"]),
            "unprovisioned": (client_cli(gamma, server, config, tmp_path / "s3"), 3, ["gamma", "not provisioned"]),
            "no-certificate": (client_cli(nocert, server, config, tmp_path / "s4"), 2, ["client.crt", "not found"]),
            "server-distrusts": (client_cli(kits / "beta", distrust, config, tmp_path / "s5"), 3,
                                 ["client.crt", "certificate"]),
        }
        started = time.monotonic()
        processes = {name: popen(command) for name, (command, _, _) in cases.items()}
        for name, process in processes.items():
            code, output = finished(process)
            _, want_code, words = cases[name]
            assert code == want_code, f"{name}: exit {code}\n{output[-2000:]}"
            for word in words:
                assert word in output, f"{name}: {word!r} not in\n{output[-2000:]}"
        assert time.monotonic() - started < CLI_TIMEOUT
    finally:
        distrust.stop(grace=1)


def test_revoked_silo_is_refused_without_restart(server, kits, tmp_path):
    config = write_silo_data(tmp_path / "data")["beta"]
    channel, stub = stub_for(server, credentials(kits / "delta"))
    with channel:
        assert stub.Hello(pb.HelloRequest(), timeout=RPC_TIMEOUT).silo_id == "delta"
        revoke = tap_server(["revoke", "--kit", str(kits / "server"), "--silo", "delta"])
        assert revoke.exit_code == 0, revoke.output
        registry = json.loads((kits / "server" / "silos.json").read_text())
        assert "delta" not in registry["silos"] and "delta" in registry["revoked"]
        before = rejected(server, "revoked")
        err = rpc_error(stub.Hello, pb.HelloRequest())  # the same open channel
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in err.details() and "delta" in err.details()
        assert rejected(server, "revoked") == before + 1
    code, output = finished(popen(client_cli(kits / "delta", server, config, tmp_path / "state")))
    assert code == 3 and "revoked" in output, output[-2000:]
    # the others are unaffected
    channel, stub = stub_for(server, credentials(kits / "beta"))
    with channel:
        assert stub.Hello(pb.HelloRequest(), timeout=RPC_TIMEOUT).silo_id == "beta"


def test_join_with_another_base_model_is_refused(server, kits):
    channel, stub = stub_for(server, credentials(kits / "beta"))
    with channel:
        err = rpc_error(stub.Join, pb.JoinRequest(declaration_json=declaration("beta", BETA_TASK, 6, ["neg", "pos"], "0" * 64)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "base model" in err.details()
        err = rpc_error(stub.Join, pb.JoinRequest(declaration_json="[1, 2]"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = rpc_error(stub.Join, pb.JoinRequest(declaration_json='{"tasks": 3}'))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_requests_get_invalid_argument(server, round1):
    stub = round1["beta"]["stub"]
    task = {"silo": "x", "task": "reviews", "kind": "classification", "metrics": {"accuracy": 0.5}, "primary": 0.5}
    for text in ("not json", "[1]", '{"tasks": 5}', '{"tasks": [], "kd_losses": [1]}',
                 json.dumps({"tasks": [dict(task, metrics=[1, 2])]}), json.dumps({"tasks": [dict(task, metrics={"a": "b"})]})):
        err = rpc_error(stub.ReportResults, pb.ResultsRequest(results_json=text))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, err.details())
    # well-formed, but results are only taken once training is over
    err = rpc_error(stub.ReportResults, pb.ResultsRequest(results_json=json.dumps({"tasks": [task]})))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    for text in ('{"tasks": [], "train_samples": [], "fingerprint": "x"}', '{"tasks": [{"name": 1}]}'):
        err = rpc_error(stub.Join, pb.JoinRequest(declaration_json=text))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, err.details())
    assert server.federation.results == {} and server.federation.phase == "training"


# ------------------------------------------------------------- upload validation


def _drop_component(entry):
    layout = dict(entry["layout"])
    layout.pop(sorted(layout)[0])
    return frames_for(entry, layout=layout, values={c: entry["values"][c] for c in layout})


def _unknown_component(entry):
    frames = frames_for(entry)
    frames[0].header.components.append("head.does-not-exist")
    return frames


def _wrong_shape(entry):
    frames = frames_for(entry)
    piece = next(p for f in frames for p in f.pieces if len(p.shape) == 2 and p.offset == 0)
    piece.shape[:] = [piece.shape[1], piece.shape[0]]
    return frames


def _non_finite(entry):
    values = {c: {n: t.clone() for n, t in ts.items()} for c, ts in entry["values"].items()}
    component = sorted(values)[-1]
    name = sorted(values[component])[0]
    values[component][name].view(-1)[0] = float("nan")
    return frames_for(entry, values=values)


def _foreign_component(entry, beta):
    extra = next(c for c in beta["layout"] if c not in entry["layout"])
    layout = dict(entry["layout"], **{extra: beta["layout"][extra]})
    values = dict(entry["values"], **{extra: beta["values"][extra]})
    weights = dict(entry["weights"], **{extra: 1.0})
    return frames_for(entry, layout=layout, values=values, weights=weights)


def _announces_too_much(entry):
    frames = frames_for(entry)
    frames[0].header.payload_bytes += 4096
    return frames


def _piece_beyond_tensor(entry):
    frames = frames_for(entry)
    frames[-1].pieces[-1].data += b"\x00" * 8
    return frames


def _bad_checksum(entry):
    frames = frames_for(entry)
    piece = frames[-1].pieces[-1]
    data = bytearray(piece.data)
    data[-1] ^= 0xFF
    piece.data = bytes(data)
    return frames


def _wrong_weights(entry):
    return frames_for(entry, weights={c: 2 * w for c, w in entry["weights"].items()})


def _missing_weights(entry):
    return frames_for(entry, weights={c: w for c, w in list(entry["weights"].items())[1:]})


def _no_header(entry):
    return frames_for(entry)[1:]


def _stats_not_an_object(entry):
    return frames_for(entry, stats_json="[1, 2, 3]")


def _truncated(entry):
    return frames_for(entry)[:-1]


BAD_UPLOADS = {
    # name: (frames, status, reason)
    "unknown_component": (_unknown_component, grpc.StatusCode.INVALID_ARGUMENT, "unknown_component"),
    "wrong_shape": (_wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "wrong_shape"),
    "wrong_dtype": (lambda e: frames_for(e, dtype="bf16"), grpc.StatusCode.INVALID_ARGUMENT, "wrong_dtype"),
    "nan": (_non_finite, grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
    "stale_round": (lambda e: frames_for(e, round_index=0), grpc.StatusCode.FAILED_PRECONDITION, "stale_round"),
    "future_round": (lambda e: frames_for(e, round_index=2), grpc.StatusCode.FAILED_PRECONDITION, "future_round"),
    "foreign_component": (_foreign_component, grpc.StatusCode.PERMISSION_DENIED, "foreign_component"),
    "announces_oversize": (_announces_too_much, grpc.StatusCode.RESOURCE_EXHAUSTED, "oversize"),
    "piece_oversize": (_piece_beyond_tensor, grpc.StatusCode.RESOURCE_EXHAUSTED, "oversize"),
    "bad_checksum": (_bad_checksum, grpc.StatusCode.INVALID_ARGUMENT, "bad_checksum"),
    "wrong_weights": (_wrong_weights, grpc.StatusCode.INVALID_ARGUMENT, "bad_weight"),
    "missing_weights": (_missing_weights, grpc.StatusCode.INVALID_ARGUMENT, "bad_weight"),
    "missing_component": (_drop_component, grpc.StatusCode.INVALID_ARGUMENT, "missing_component"),
    "truncated": (_truncated, grpc.StatusCode.INVALID_ARGUMENT, "missing_tensor"),
    "no_header": (_no_header, grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    "stats_not_an_object": (_stats_not_an_object, grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
}


def assert_aggregate_untouched(server: ServerDaemon) -> None:
    fed = server.federation
    assert fed.phase == "training" and fed.round == 1
    assert fed.received == {}
    assert fed.aggregator.contributors == {} and fed.aggregator._sums == {}
    assert fed.wire["bytes_up"] == 0


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_refused_and_changes_nothing(server, round1, case):
    make, status, reason = BAD_UPLOADS[case]
    alpha = round1["alpha"]
    frames = make(alpha, round1["beta"]) if case == "foreign_component" else make(alpha)
    global_before = {c: {n: t.clone() for n, t in ts.items()} for c, ts in server.federation.global_values.items()}
    before = rejected(server, reason)
    err = rpc_error(alpha["stub"].Upload, iter(frames))
    assert err.code() == status, f"{case}: {err.code()} {err.details()}"
    assert err.details() and "Exception" not in err.details()
    assert rejected(server, reason) == before + 1, f"{case}: tap_rejected_requests_total{{reason={reason}}}"
    assert_aggregate_untouched(server)
    assert all(torch.equal(server.federation.global_values[c][n], t) for c, ts in global_before.items() for n, t in ts.items())
    # the silo is still asked for its update
    assignment = alpha["stub"].Poll(pb.PollRequest(wait_s=0), timeout=RPC_TIMEOUT)
    assert assignment.action == pb.Assignment.TRAIN and assignment.round == 1


def test_message_over_the_grpc_limit_is_refused(server, round1):
    alpha = round1["alpha"]
    frames = frames_for(alpha, stats_json=json.dumps({"pad": "x" * (2 << 20)}))  # a frame > max_message_bytes (1 MiB)
    assert frames[0].ByteSize() > CONFIG.wire.max_message_bytes
    err = rpc_error(alpha["stub"].Upload, iter(frames))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_aggregate_untouched(server)


def test_download_of_another_round_is_refused(server, round1):
    stub = round1["alpha"]["stub"]
    for round_index in (0, 2):
        err = rpc_error(lambda request, timeout: list(stub.Download(request, timeout=timeout)),
                        pb.DownloadRequest(round=round_index))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_silo_added_later_is_admitted_without_restart_but_waits(server, kits):
    add_silo(kits, "epsilon")  # the server notices silos.json changed
    channel, stub = stub_for(server, credentials(kits / "epsilon"))
    with channel:
        assert stub.Hello(pb.HelloRequest(), timeout=RPC_TIMEOUT).silo_id == "epsilon"
        assignment = stub.Poll(pb.PollRequest(wait_s=0), timeout=RPC_TIMEOUT)
        assert assignment.action == pb.Assignment.WAIT and "not joined" in assignment.message
        err = rpc_error(lambda request, timeout: list(stub.Download(request, timeout=timeout)), pb.DownloadRequest(round=1))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_valid_upload_is_accepted_once(kits, tmp_path):
    daemon = start_server(kits / "server", tmp_path / "state")
    try:
        silos = join_both(daemon, kits)
        alpha, beta = silos["alpha"], silos["beta"]
        frames = frames_for(alpha)
        ack = alpha["stub"].Upload(iter(frames), timeout=RPC_TIMEOUT)
        assert ack.round == 1 and ack.payload_bytes == frames[0].header.payload_bytes and ack.message == "accepted"
        fed = daemon.federation
        assert set(fed.received) == {"alpha"}
        assert fed.aggregator.contributors == {c: 1 for c in alpha["layout"]}
        assert fed.received["alpha"].task_losses == {"shapes": 1.0}
        before = rejected(daemon, "duplicate")
        err = rpc_error(alpha["stub"].Upload, iter(frames_for(alpha)))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "already" in err.details()
        assert rejected(daemon, "duplicate") == before + 1
        assert fed.aggregator.contributors == {c: 1 for c in alpha["layout"]}
        # the last update closes the round; a late copy of round 1 is stale from then on
        beta["stub"].Upload(iter(frames_for(beta, stats_json="{}")), timeout=RPC_TIMEOUT)
        assert fed.round == 2 and fed.received == {}
        err = rpc_error(alpha["stub"].Upload, iter(frames_for(alpha)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert daemon.metrics.registry.get_sample_value("tap_updates_received_total") == 2
        for entry in silos.values():
            entry["channel"].close()
    finally:
        daemon.stop(grace=1)


# ----------------------------------------------------------- the agent's channel


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_connection_retries_only_what_can_change(kits):
    from tap_client.connection import AuthFailure, Connection, Refused, load_kit

    connection = Connection(load_kit(kits / "beta"), "127.0.0.1:9", give_up_after_s=0.3)  # nothing listens on port 9

    def failing(code, details):
        calls = []

        def fn(stub):
            calls.append(time.monotonic())
            raise FakeRpcError(code, details)
        return fn, calls

    def outcome(what, code, details):
        fn, calls = failing(code, details)
        with pytest.raises((AuthFailure, Refused)) as info:
            connection.call(what, fn)
        return type(info.value).__name__, len(calls)

    try:
        assert outcome("hello", grpc.StatusCode.UNAUTHENTICATED, "no client certificate") == ("AuthFailure", 1)
        assert outcome("hello", grpc.StatusCode.PERMISSION_DENIED, "revoked") == ("AuthFailure", 1)
        assert outcome("upload round 1", grpc.StatusCode.PERMISSION_DENIED, "foreign") == ("Refused", 1)
        assert outcome("upload round 1", grpc.StatusCode.INVALID_ARGUMENT, "bad_checksum") == ("Refused", 1)
        assert outcome("upload round 1", grpc.StatusCode.FAILED_PRECONDITION, "stale") == ("Refused", 1)
        assert outcome("upload round 1", grpc.StatusCode.ALREADY_EXISTS, "dup") == ("Refused", 1)
        assert outcome("hello", grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED")[0] == "AuthFailure"
        # a size refusal is final; a busy server or a dead connection is retried (until give_up_after_s)
        assert outcome("upload round 1", grpc.StatusCode.RESOURCE_EXHAUSTED,
                       "stream announces 9999 bytes, at most 10 expected") == ("Refused", 1)
        assert outcome("upload round 1", grpc.StatusCode.RESOURCE_EXHAUSTED,
                       "Received message larger than max (2097152 vs. 1048576)") == ("Refused", 1)
        name, calls = outcome("upload round 1", grpc.StatusCode.RESOURCE_EXHAUSTED,
                              "too many uploads in progress; retry shortly")
        assert name == "Refused" and calls >= 2
        name, calls = outcome("poll", grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
        assert name == "Refused" and calls >= 2
        name, calls = outcome("poll", grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused")
        assert name == "Refused" and calls >= 2
    finally:
        connection.close()


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
    opts = ServeOptions(kit=kits / "server", listen=f"127.0.0.1:{server.port}", state_dir=tmp_path / "state",
                        metrics_port=0, health_port=0)
    second = ServerDaemon(CONFIG, opts)
    with pytest.raises(ConfigError, match="could not bind"):
        second.start()
    assert second.stop_event.is_set()  # what it had bound (health, metrics) is released
    opts = dataclasses.replace(opts, listen="127.0.0.1:0", health_port=server.health_port)
    with pytest.raises(ConfigError, match="health-port"):
        ServerDaemon(CONFIG, opts).start()
    opts = dataclasses.replace(opts, health_port=0, metrics_port=server.metrics_port)
    with pytest.raises(ConfigError, match="metrics-port"):
        ServerDaemon(CONFIG, opts).start()


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
    assert daemon.health.Check(health_pb2.HealthCheckRequest(service=""), None).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING


def test_prometheus_endpoint_serves_every_metric(server, round1):
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=RPC_TIMEOUT).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    registered = {f.name for f in server.metrics.registry.collect()}
    assert registered <= set(families), f"missing: {sorted(registered - set(families))}"
    samples = {s.name: s for f in families.values() for s in f.samples if not s.labels}
    assert samples["tap_round"].value == 1
    assert samples["tap_clients_joined"].value == 2
    assert samples["tap_rounds_planned"].value == CONFIG.rounds
    phases = {s.labels["phase"]: s.value for s in families["tap_phase"].samples}
    assert phases["training"] == 1 and sum(phases.values()) == 1
    sent = {s.labels["kind"] for s in families["tap_bytes_sent"].samples if s.name == "tap_bytes_sent_total"}
    assert {"encoder", "head"} <= sent
    # every exported sample name is one metrics.py declares (the contract with deploy/)
    declared = server.metrics.exported_names()
    assert {s.name for f in families.values() for s in f.samples} <= declared


# ----------------------------------------------------------------- provisioning


def test_provision_writes_private_keys_and_fingerprints(tmp_path):
    provision(tmp_path, ["clinic-a", "lab_b"], ["fl.example.org", "10.0.0.7"])
    for key in (tmp_path / "ca" / "ca.key", tmp_path / "server" / "server.key", tmp_path / "clinic-a" / "client.key",
                tmp_path / "lab_b" / "client.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    registry = json.loads((tmp_path / "server" / "silos.json").read_text())
    assert set(registry["silos"]) == {"clinic-a", "lab_b"} and registry["revoked"] == {}
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    for silo in ("clinic-a", "lab_b"):
        cert = x509.load_pem_x509_certificate((tmp_path / silo / "client.crt").read_bytes())
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == silo
        assert registry["silos"][silo]["sha256"] == cert_fingerprint(cert)
        cert.verify_directly_issued_by(ca)
        assert (tmp_path / silo / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
        assert (tmp_path / silo / "silo.yaml").is_file() and silo in (tmp_path / silo / "README.txt").read_text()
        assert not (tmp_path / silo / "ca.key").exists()
    server = x509.load_pem_x509_certificate((tmp_path / "server" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert {"10.0.0.7", "127.0.0.1"} <= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert not (tmp_path / "server" / "ca.key").exists()


def test_provision_add_silo_and_refusals(tmp_path):
    provision(tmp_path, ["a"], ["127.0.0.1"])
    original = (tmp_path / "ca" / "ca.crt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a CA"):
        provision(tmp_path, ["b"], ["127.0.0.1"])
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == original
    result = tap_server(["provision", "--out", str(tmp_path), "--silo", "c", "--server-host", "127.0.0.1"])
    assert result.exit_code != 0 and "already holds a CA" in result.output
    assert not (tmp_path / "c").exists()
    result = tap_server(["provision", "--out", str(tmp_path), "--add-silo", "b"])
    assert result.exit_code == 0, result.output
    registry = SiloRegistry(tmp_path / "server" / "silos.json").load()
    assert set(registry["silos"]) == {"a", "b"}
    cert = x509.load_pem_x509_certificate((tmp_path / "b" / "client.crt").read_bytes())
    assert registry["silos"]["b"]["sha256"] == cert_fingerprint(cert)
    assert stat.S_IMODE((tmp_path / "b" / "client.key").stat().st_mode) == 0o600
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(original))
    with pytest.raises(ConfigError, match="already provisioned"):
        add_silo(tmp_path, "b")
    for bad in ("ca", "server", "has space", "-x", "a/b", ""):
        with pytest.raises(ConfigError):
            add_silo(tmp_path, bad)
    with pytest.raises(ConfigError, match="twice"):
        provision(tmp_path / "new", ["x", "x"], ["127.0.0.1"])
    # revoking and re-adding issues a new certificate; the old one stays refused
    SiloRegistry(tmp_path / "server" / "silos.json").revoke("b")
    add_silo(tmp_path, "b")
    registry = SiloRegistry(tmp_path / "server" / "silos.json").load()
    assert registry["silos"]["b"]["sha256"] != cert_fingerprint(cert) and "b" not in registry["revoked"]
