"""The agent's channel: how a failed call becomes a refusal (the same reasons and table as the server), what is
retried and what ends the agent; the ``tap-client`` CLI with kits that cannot work."""

from __future__ import annotations

import shutil
import time

import grpc
import pytest
from helpers import CLI_TIMEOUT, client_cli, finished, popen, write_silo_data

from tap_client.connection import Connection, Refused, load_kit, rejection
from tap_core.errors import REASON_METADATA_KEY, REASON_STATUS, Rejected
from tap_server.provision import CertificateAuthority, _cert_pem, _key_pem


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, reason: str | None = None):
        self._code, self._details = code, details
        self._metadata = ((REASON_METADATA_KEY, reason),) if reason else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._metadata


def test_a_failed_call_becomes_the_servers_refusal_or_the_one_its_status_implies():
    for reason, status in REASON_STATUS.items():  # every reason survives the trip: the same table on both ends
        refused = rejection(FakeRpcError(grpc.StatusCode[status], "why", reason))
        assert isinstance(refused, Rejected) and (refused.reason, refused.status) == (reason, status)
    # gRPC's own failures carry no reason: the status names one
    assert rejection(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")).reason == "unavailable"
    assert (
        rejection(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max")).reason
        == "oversize"
    )
    assert (
        rejection(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")).reason == "busy"
    )
    assert rejection(FakeRpcError(grpc.StatusCode.INTERNAL, "boom", "no-such-reason")).reason == "internal"
    with pytest.raises(ValueError, match="unknown refusal reason"):
        Rejected("no-such-reason", "a reason outside the table is a programming error")


def test_connection_retries_only_what_can_change(kits):
    connection = Connection(load_kit(kits / "beta"), "127.0.0.1:9", give_up_after_s=0.3)  # nothing listens on port 9

    def outcome(what, code, details, reason=None):
        calls = []

        def fn(stub):
            calls.append(time.monotonic())
            raise FakeRpcError(code, details, reason)

        with pytest.raises(Refused) as info:
            connection.call(what, fn)
        return type(info.value).__name__, info.value.reason, len(calls)

    try:
        assert outcome("hello", grpc.StatusCode.UNAUTHENTICATED, "no client certificate", "no_certificate") == (
            "AuthFailure",
            "no_certificate",
            1,
        )
        assert outcome("hello", grpc.StatusCode.PERMISSION_DENIED, "revoked", "revoked") == (
            "AuthFailure",
            "revoked",
            1,
        )
        assert outcome("upload round 1", grpc.StatusCode.PERMISSION_DENIED, "foreign", "foreign_component") == (
            "Refused",
            "foreign_component",
            1,
        )
        assert outcome("upload round 1", grpc.StatusCode.INVALID_ARGUMENT, "crc", "bad_checksum") == (
            "Refused",
            "bad_checksum",
            1,
        )
        assert outcome("upload round 1", grpc.StatusCode.FAILED_PRECONDITION, "stale", "stale_round") == (
            "Refused",
            "stale_round",
            1,
        )
        assert outcome("upload round 1", grpc.StatusCode.ALREADY_EXISTS, "dup", "duplicate") == (
            "Refused",
            "duplicate",
            1,
        )
        name, _, calls = outcome(
            "hello", grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED"
        )
        assert (name, calls) == ("AuthFailure", 1)
        # a size refusal is final; a busy server or a dead connection is retried (until give_up_after_s)
        assert outcome(
            "upload round 1", grpc.StatusCode.RESOURCE_EXHAUSTED, "stream announces 9999 bytes, at most 10", "oversize"
        ) == ("Refused", "oversize", 1)
        assert outcome(
            "upload round 1",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Received message larger than max (2097152 vs. 1048576)",
        ) == ("Refused", "oversize", 1)
        for what, code, details, reason in (
            ("upload round 1", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many uploads in progress", "busy"),
            ("poll", grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", None),
            ("poll", grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused", None),
            # the server died or restarted during a handshake: not a certificate problem (found by tests/test_faults.py)
            (
                "join",
                grpc.StatusCode.UNAVAILABLE,
                "failed to connect to all addresses; last error: UNAVAILABLE: "
                "ipv4:127.0.0.1:5: Handshake read failed (recvmsg:Connection reset by peer (104))",
                None,
            ),
            ("poll", grpc.StatusCode.INTERNAL, "server error (OSError: disk full)", "internal"),
        ):
            name, _, calls = outcome(what, code, details, reason)
            assert name == "Refused" and calls >= 2, (details, calls)
    finally:
        connection.close()


def test_cli_refuses_bad_kits_quickly(server, kits, other_kits, tmp_path, serve):
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
    distrust = serve(distrust_kit, tmp_path / "distrust-state")
    cases = {
        "other-ca-kit": (client_cli(other_kits / "alpha", server, config, tmp_path / "s1"), 3, ["TLS", "ca.crt"]),
        "hybrid": (client_cli(hybrid, server, config, tmp_path / "s2"), 2, ["client.crt", "not signed by"]),
        "unprovisioned": (client_cli(gamma, server, config, tmp_path / "s3"), 3, ["gamma", "not provisioned"]),
        "no-certificate": (client_cli(nocert, server, config, tmp_path / "s4"), 2, ["client.crt", "not found"]),
        "server-distrusts": (
            client_cli(kits / "beta", distrust, config, tmp_path / "s5"),
            3,
            ["client.crt", "certificate"],
        ),
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
