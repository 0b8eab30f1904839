"""The servicer over loopback with real mTLS: identity, refusals and their statuses, upload validation.

Every refusal is driven through the raw generated stub so each bad request can be
shaped exactly; each must come back with its reason's status (``REASON_STATUS``),
the reason in the trailing metadata, a count in ``tap_rejected_requests_total``,
and no change in the federation.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    BETA_TASK,
    GRPC_CONFIG,
    RPC_TIMEOUT,
    credentials,
    declaration,
    client_cli,
    finished,
    frames_for,
    join_both,
    popen,
    reason_of,
    rejected,
    rpc_error,
    stub_for,
    tap_server,
    write_silo_data,
)

from tap_core.errors import REASON_STATUS
from tap_core.wire import StreamDecoder
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_server.provision import CertificateAuthority, _cert_pem, _key_pem, add_silo


def assert_refused(server, err: grpc.RpcError, reason: str, before: float) -> None:
    """``err`` is the refusal for ``reason``: its table status, its reason in the metadata, counted once."""
    assert err.code() == grpc.StatusCode[REASON_STATUS[reason]], f"{reason}: {err.code()} {err.details()}"
    assert reason_of(err) == reason, f"expected reason {reason}, got {reason_of(err)}: {err.details()}"
    assert err.details() and "Exception" not in err.details()
    assert rejected(server, reason) == before + 1, f"tap_rejected_requests_total{{reason={reason}}}"


# --------------------------------------------------------------- refused clients


def test_identity_is_the_certificate(server, kits):
    channel, stub = stub_for(server, credentials(kits / "delta"))
    with channel:
        hello = stub.Hello(pb.HelloRequest(), timeout=RPC_TIMEOUT)
        assert hello.silo_id == "delta"
        assert json.loads(hello.federation_json)["name"] == "grpc-test"


def test_client_certificate_from_another_ca_is_refused(server, kits, other_kits):
    before = server.federation.status().joined
    creds = grpc.ssl_channel_credentials(
        (kits / "ca" / "ca.crt").read_bytes(),
        (other_kits / "alpha" / "client.key").read_bytes(),
        (other_kits / "alpha" / "client.crt").read_bytes(),
    )
    channel, stub = stub_for(server, creds)
    with channel:
        err = rpc_error(stub.Hello, pb.HelloRequest())
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: nothing reaches the servicer
    assert server.federation.status().joined == before


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
        for call, request in (
            (stub.Hello, pb.HelloRequest()),
            (stub.Poll, pb.PollRequest()),
            (stub.Heartbeat, pb.HeartbeatRequest()),
        ):
            err = rpc_error(call, request)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and reason_of(err) == "not_provisioned"
            assert "gamma" in err.details() and "not provisioned" in err.details()
    assert rejected(server, "not_provisioned") == before + 3
    assert "gamma" not in server.federation.status().joined


def test_second_certificate_for_a_provisioned_silo_is_refused(server, kits):
    """Same CA, same CN as a provisioned silo, but not the certificate that was handed over."""
    cert, key = CertificateAuthority.load(kits / "ca").issue("alpha", 30, client=True)
    creds = grpc.ssl_channel_credentials((kits / "ca" / "ca.crt").read_bytes(), _key_pem(key), _cert_pem(cert))
    channel, stub = stub_for(server, creds)
    with channel:
        err = rpc_error(stub.Hello, pb.HelloRequest())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "not the one provisioned" in err.details()
    assert reason_of(err) == "unknown_certificate"


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
        assert_refused(server, err, "revoked", before)
    code, output = finished(popen(client_cli(kits / "delta", server, config, tmp_path / "state")))
    assert code == 3 and "revoked" in output, output[-2000:]
    # the others are unaffected
    channel, stub = stub_for(server, credentials(kits / "beta"))
    with channel:
        assert stub.Hello(pb.HelloRequest(), timeout=RPC_TIMEOUT).silo_id == "beta"


def test_join_with_another_base_model_is_refused(server, kits):
    channel, stub = stub_for(server, credentials(kits / "beta"))
    with channel:
        before = rejected(server, "fingerprint_mismatch")
        err = rpc_error(
            stub.Join, pb.JoinRequest(declaration_json=declaration("beta", BETA_TASK, 6, ["neg", "pos"], "0" * 64))
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "base model" in err.details()
        assert_refused(server, err, "fingerprint_mismatch", before)
        err = rpc_error(stub.Join, pb.JoinRequest(declaration_json="[1, 2]"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = rpc_error(stub.Join, pb.JoinRequest(declaration_json='{"tasks": 3}'))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_requests_get_invalid_argument(server, round1):
    stub = round1["beta"]["stub"]
    task = {"silo": "x", "task": "reviews", "kind": "classification", "metrics": {"accuracy": 0.5}, "primary": 0.5}
    for text in (
        "not json",
        "[1]",
        '{"tasks": 5}',
        '{"tasks": [], "kd_losses": [1]}',
        json.dumps({"tasks": [dict(task, metrics=[1, 2])]}),
        json.dumps({"tasks": [dict(task, metrics={"a": "b"})]}),
    ):
        err = rpc_error(stub.ReportResults, pb.ResultsRequest(results_json=text))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, err.details())
    # well-formed, but results are only taken once training is over
    err = rpc_error(stub.ReportResults, pb.ResultsRequest(results_json=json.dumps({"tasks": [task]})))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    for text in ('{"tasks": [], "train_samples": [], "fingerprint": "x"}', '{"tasks": [{"name": 1}]}'):
        err = rpc_error(stub.Join, pb.JoinRequest(declaration_json=text))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, err.details())
    status = server.federation.status()
    assert status.results == () and status.phase == "training"


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


def assert_round_untouched(server) -> None:
    status = server.federation.status()
    assert status.phase == "training" and status.round == 1 and status.received == ()
    assert server.federation.report()["wire"]["bytes_up"] == 0


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_refused_and_changes_nothing(server, round1, case):
    make, status, reason = BAD_UPLOADS[case]
    alpha = round1["alpha"]
    frames = make(alpha, round1["beta"]) if case == "foreign_component" else make(alpha)
    global_before = server.federation.global_values()
    before = rejected(server, reason)
    err = rpc_error(alpha["stub"].Upload, iter(frames))
    assert err.code() == status, f"{case}: {err.code()} {err.details()}"
    assert_refused(server, err, reason, before)
    assert_round_untouched(server)
    after = server.federation.global_values()
    assert all(torch.equal(after[c][n], t) for c, ts in global_before.items() for n, t in ts.items())
    # the silo is still asked for its update
    assignment = alpha["stub"].Poll(pb.PollRequest(wait_s=0), timeout=RPC_TIMEOUT)
    assert assignment.action == pb.Assignment.TRAIN and assignment.round == 1


def test_message_over_the_grpc_limit_is_refused_as_oversize(server, round1):
    alpha = round1["alpha"]
    frames = frames_for(alpha, stats_json=json.dumps({"pad": "x" * (2 << 20)}))  # a frame > max_message_bytes (1 MiB)
    assert frames[0].ByteSize() > GRPC_CONFIG.wire.max_message_bytes
    before, internal = rejected(server, "oversize"), rejected(server, "internal")
    err = rpc_error(alpha["stub"].Upload, iter(frames))
    assert_refused(server, err, "oversize", before)
    assert "max_message_bytes" in err.details()
    assert_round_untouched(server)
    # far beyond it the transport refuses it itself (gRPC's own refusal). Whether our handler still sees the call
    # (then counted as a cut call) depends on gRPC: never 'internal', and nothing of it stays open
    cancelled = rejected(server, "cancelled")
    frames = frames_for(alpha, stats_json=json.dumps({"pad": "x" * (5 << 20)}))
    err = rpc_error(alpha["stub"].Upload, iter(frames))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(err) is None
    deadline = time.monotonic() + 5
    while (
        server.metrics.registry.get_sample_value("tap_calls_in_flight", {"kind": "upload"})
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert server.metrics.registry.get_sample_value("tap_calls_in_flight", {"kind": "upload"}) == 0
    assert rejected(server, "cancelled") in (cancelled, cancelled + 1) and rejected(server, "internal") == internal
    assert_round_untouched(server)


def test_download_of_another_round_is_refused(server, round1):
    stub = round1["alpha"]["stub"]
    for round_index, reason in ((0, "stale_round"), (2, "future_round")):
        before = rejected(server, reason)
        err = rpc_error(
            lambda request, timeout: list(stub.Download(request, timeout=timeout)),
            pb.DownloadRequest(round=round_index),
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert_refused(server, err, reason, before)


def test_silo_added_later_is_admitted_without_restart_but_waits(server, kits):
    add_silo(kits, "epsilon")  # the server notices silos.json changed
    channel, stub = stub_for(server, credentials(kits / "epsilon"))
    with channel:
        assert stub.Hello(pb.HelloRequest(), timeout=RPC_TIMEOUT).silo_id == "epsilon"
        assignment = stub.Poll(pb.PollRequest(wait_s=0), timeout=RPC_TIMEOUT)
        assert assignment.action == pb.Assignment.WAIT and "not joined" in assignment.message
        err = rpc_error(
            lambda request, timeout: list(stub.Download(request, timeout=timeout)), pb.DownloadRequest(round=1)
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_valid_upload_is_accepted_once(kits, tmp_path, serve):
    daemon = serve(kits / "server", tmp_path / "state")
    silos = join_both(daemon, kits)
    alpha, beta = silos["alpha"], silos["beta"]
    initial = daemon.federation.global_values()
    # alpha's training, say (a step of the size training takes: +1 on every element is refused by the norm bound)
    moved = {c: {n: t + 0.01 for n, t in ts.items()} for c, ts in alpha["values"].items()}
    frames = frames_for(alpha, values=moved)
    ack = alpha["stub"].Upload(iter(frames), timeout=RPC_TIMEOUT)
    assert ack.round == 1 and ack.payload_bytes == frames[0].header.payload_bytes and ack.message == "accepted"
    assert daemon.federation.status().received == ("alpha",)
    before = rejected(daemon, "duplicate")
    err = rpc_error(alpha["stub"].Upload, iter(frames_for(alpha, values=moved)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "already" in err.details()
    assert_refused(daemon, err, "duplicate", before)
    # the last update closes the round; a late copy of round 1 is stale from then on
    beta["stub"].Upload(iter(frames_for(beta, stats_json="{}")), timeout=RPC_TIMEOUT)
    status = daemon.federation.status()
    assert status.round == 2 and status.received == ()
    err = rpc_error(alpha["stub"].Upload, iter(frames_for(alpha)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_of(err) == "stale_round"
    assert daemon.metrics.registry.get_sample_value("tap_updates_received_total") == 2
    # alpha's update counted once, with its 10 samples against beta's 6 (beta sent the values it got)
    after = daemon.federation.global_values()
    shared = set(alpha["layout"]) & set(beta["layout"])
    assert shared and set(alpha["layout"]) - shared
    for component in alpha["layout"]:
        step = 0.01 * (10 / 16 if component in shared else 1.0)
        for name, tensor in initial[component].items():
            assert torch.allclose(after[component][name], tensor + step, atol=1e-6), (component, name)
    assert daemon.federation.report()["history"][0]["silo_losses"]["alpha"] == {"shapes": 1.0}
    for entry in silos.values():
        entry["channel"].close()


def test_downloads_are_encoded_once_per_round_and_component(kits, tmp_path, serve):
    """Both silos' round-1 downloads (join_both) share the frames of the components they both hold."""
    daemon = serve(kits / "server", tmp_path / "state")
    silos = join_both(daemon, kits)
    alpha, beta = silos["alpha"], silos["beta"]
    held = set(alpha["layout"]) | set(beta["layout"])
    assert set(alpha["layout"]) & set(beta["layout"]) and len(held) < len(alpha["layout"]) + len(beta["layout"])
    frames = daemon.servicer.frames
    assert frames.builds == len(held)
    current = daemon.federation.global_values()
    for entry in silos.values():
        for component, tensors in entry["values"].items():
            for name, tensor in tensors.items():
                assert torch.equal(tensor, current[component][name])
    decoder = StreamDecoder(alpha["layout"], GRPC_CONFIG.wire.dtype)  # a retried download: served as built
    for frame in alpha["stub"].Download(pb.DownloadRequest(round=1), timeout=RPC_TIMEOUT):
        decoder.feed(frame)
    assert frames.builds == len(held)
    for component, tensors in decoder.finish().items():
        assert all(torch.equal(t, current[component][n]) for n, t in tensors.items())
    for entry in silos.values():
        entry["channel"].close()
