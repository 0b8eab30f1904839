"""The agent's mTLS channel: kit checks, credentials, retries with backoff, error classes.

Authentication problems end the agent at once with a message naming the
certificate at fault; transient network problems are retried with exponential
backoff (the agent reconnects when the connection drops).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from tap_core.config import FederationConfig
from tap_core.errors import ConfigError, TapError
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_core.transport import channel_options, split_address

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
MAX_SERVER_ERRORS = 5
_TLS_WORDS = ("handshake", "ssl", "certificate", "tls", "x509")
_BUSY_WORDS = ("retry", "concurrent rpc limit")  # the servicer's "busy", gRPC's maximum_concurrent_rpcs


class AuthFailure(TapError):
    """The server or the TLS layer refused this silo's identity: retrying will not help."""


class Refused(TapError):
    """The server refused a request for a reason that retrying will not change."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class Kit:
    directory: Path
    ca: bytes
    cert: bytes
    key: bytes
    silo: str


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(str(path), "not found", "--kit must be the silo folder written by `tap-server provision`")
    return path.read_bytes()


def load_kit(directory: Path) -> Kit:
    """Read the kit and check it is usable, so a TLS failure later is not a mystery."""
    ca_pem, cert_pem, key_pem = (_read(directory / n) for n in ("ca.crt", "client.crt", "client.key"))
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(str(directory), f"unreadable certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(directory / "client.key"), f"unreadable private key: {exc}") from exc
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ConfigError(str(directory / "client.key"), "does not belong to client.crt", "use the key and certificate of one kit")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(str(directory / "client.crt"), "is not signed by the kit's ca.crt",
                          "use the certificate and CA from the same provisioning") from exc
    now = dt.datetime.now(dt.timezone.utc)
    for name, c in (("client.crt", cert), ("ca.crt", ca)):
        if now > c.not_valid_after_utc:
            raise ConfigError(str(directory / name), f"expired on {c.not_valid_after_utc:%Y-%m-%d}",
                              "ask the operator for a new kit")
        if now < c.not_valid_before_utc:
            raise ConfigError(str(directory / name), f"is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                              "check this machine's clock")
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return Kit(directory, ca_pem, cert_pem, key_pem, str(names[0].value) if names else "")


class Connection:
    def __init__(self, kit: Kit, server: str, config: FederationConfig | None = None, server_name: str | None = None,
                 give_up_after_s: float = 3600.0):
        self.kit = kit
        self.server = server
        self.server_name = server_name
        self.give_up_after_s = give_up_after_s
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.FederationStub | None = None
        self.open(config or FederationConfig())

    def open(self, config: FederationConfig) -> None:
        """(Re)open the channel with ``config``'s message limits."""
        if self.channel is not None:
            self.channel.close()
        credentials = grpc.ssl_channel_credentials(root_certificates=self.kit.ca, private_key=self.kit.key,
                                                   certificate_chain=self.kit.cert)
        options = channel_options(config)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        self.channel = grpc.secure_channel(self.server, credentials, options=options)
        self.stub = pb_grpc.FederationStub(self.channel)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()

    def call(self, what: str, fn: Callable[[pb_grpc.FederationStub], T], *, retry: bool = True) -> T:
        """Run ``fn(stub)``, retrying transient failures with exponential backoff and jitter."""
        delay, started, server_errors = 0.5, time.monotonic(), 0
        while True:
            try:
                return fn(self.stub)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                self.raise_if_final(what, code, details)
                # a server-side error may be transient (a restart), but not forever
                server_errors += code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
                if not retry or time.monotonic() - started > self.give_up_after_s or server_errors > MAX_SERVER_ERRORS:
                    raise Refused(code, f"{what}: {code.name}: {details}") from exc
                log.warning("%s failed (%s: %s); retrying in %.1fs", what, code.name, details[:200], delay)
                time.sleep(delay * (0.8 + 0.4 * random.random()))
                delay = min(delay * 2, 30.0)

    def raise_if_final(self, what: str, code: grpc.StatusCode, details: str) -> None:
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) and not what.startswith("upload"):
            raise AuthFailure(f"the server refused silo {self.kit.silo} ({self.kit.directory / 'client.crt'}): {details}")
        if code == grpc.StatusCode.UNAVAILABLE and any(w in details.lower() for w in _TLS_WORDS):
            raise AuthFailure(
                f"TLS handshake with {self.server} failed: {details.strip()[:300]}. Either the server's certificate is "
                f"not signed by {self.kit.directory / 'ca.crt'} (wrong kit or wrong server address), or the server does "
                f"not trust {self.kit.directory / 'client.crt'} (issued by another federation's CA)")
        if code == grpc.StatusCode.UNAVAILABLE and self.server_hung_up_after_handshake():
            raise AuthFailure(
                f"the server at {self.server} completed the TLS handshake and then closed the connection at once: it does "
                f"not accept this silo's certificate {self.kit.directory / 'client.crt'} (issued by another federation's "
                "CA, or expired or not yet valid by the server's clock). Ask the operator for a new kit")
        if code not in RETRYABLE:
            raise Refused(code, f"{what}: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not any(w in details.lower() for w in _BUSY_WORDS):
            # too big (the server's size check or gRPC's message limit) stays too big; only "busy" is retried
            raise Refused(code, f"{what}: {details}")

    def server_hung_up_after_handshake(self, timeout: float = 5.0) -> bool:
        """Did the server refuse our client certificate? (gRPC cannot tell: it reports "Socket closed".)

        With TLS 1.3 the client's side of the handshake completes before the server
        checks the client certificate; a server that rejects it just closes the
        connection, which gRPC reports as a retryable UNAVAILABLE. So try a handshake
        of our own: a server that proved it holds a certificate of our CA and then
        hangs up without a single byte (a gRPC server sends its HTTP/2 settings at
        once) refused us. Anything else (no connection, timeout, a proxy that drops
        the handshake) is treated as transient.
        """
        try:
            host, port = split_address(self.server)
            context = ssl.create_default_context(cadata=self.kit.ca.decode("ascii", "replace"))
            context.load_cert_chain(self.kit.directory / "client.crt", self.kit.directory / "client.key")
            context.set_alpn_protocols(["h2"])
            with socket.create_connection((host, port), timeout=timeout) as raw:
                with context.wrap_socket(raw, server_hostname=self.server_name or host) as tls:
                    try:
                        return tls.recv(1) == b""
                    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                        return True  # an alert or a reset right after a completed handshake
        except (OSError, ValueError, ConfigError):  # ssl.SSLError is an OSError: the handshake itself failed
            return False
