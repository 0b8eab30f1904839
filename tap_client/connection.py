"""The agent's mTLS channel: kit checks, credentials, retries with backoff.

A failed call becomes the server's :class:`~tap_core.errors.Rejected` again: its
reason travels in the trailing metadata; for gRPC's own failures the status
names it (``tap_core.errors.reason_for_status``). Identity problems end the agent
at once (:class:`AuthFailure`) with a message naming the certificate at fault;
transient problems are retried with exponential backoff (the agent reconnects
when the connection drops); anything else is final.
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
from tap_core.errors import IDENTITY, REASON_METADATA_KEY, REASON_STATUS, TRANSIENT, ConfigError, Rejected
from tap_core.errors import reason_for_status
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_core.transport import channel_options, split_address

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_SERVER_ERRORS = 5
MAX_RETRY_DELAY_S = 30.0  # the longest wait between two tries of a call (exponential backoff from 0.5 s)
# words only a certificate decision puts in gRPC's details (a reset or EOF during a handshake is not one: a server
# that restarts or dies mid-handshake says "Handshake read failed (recvmsg:Connection reset by peer)")
_CERTIFICATE_WORDS = ("certificate", "x509", "unknown ca", "alert")
_GRPC_BUSY = "concurrent rpc limit"  # gRPC's own answer at the server's maximum_concurrent_rpcs


class Refused(Rejected):
    """A call that failed for good: the server refused it (its reason), or it kept failing past retrying."""


class AuthFailure(Refused):
    """The server or the TLS layer refused this silo's identity: retrying will not help."""


class FederationStub(pb_grpc.FederationStub):
    """The generated stub, except that tensor frames cross gRPC as serialised bytes (the wire is unchanged).

    ``Download`` yields each frame unparsed, for ``StreamDecoder`` to read without copying its
    tensor data; ``Upload`` takes frames already serialised (``wire.encode_frames``).
    """

    def __init__(self, channel: grpc.Channel):
        super().__init__(channel)
        self.Download = channel.unary_stream(
            "/tap.v1.Federation/Download",
            request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=None,
            _registered_method=True,
        )
        self.Upload = channel.stream_unary(
            "/tap.v1.Federation/Upload",
            request_serializer=None,
            response_deserializer=pb.UploadAck.FromString,
            _registered_method=True,
        )


def rejection(exc: grpc.RpcError) -> Refused:
    """The refusal a failed call stands for: the server's reason, else the one its status implies."""
    code, details = exc.code(), exc.details() or ""
    metadata = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    reason = metadata.get(REASON_METADATA_KEY)
    if reason not in REASON_STATUS:  # gRPC's own failure (or a server that did not say)
        reason = "busy" if _GRPC_BUSY in details.lower() else reason_for_status(code.name)
    return Refused(reason, f"{code.name}: {details}")


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
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(
            str(directory / "client.key"), "does not belong to client.crt", "use the key and certificate of one kit"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(
            str(directory / "client.crt"),
            "is not signed by the kit's ca.crt",
            "use the certificate and CA from the same provisioning",
        ) from exc
    now = dt.datetime.now(dt.timezone.utc)
    for name, c in (("client.crt", cert), ("ca.crt", ca)):
        if now > c.not_valid_after_utc:
            raise ConfigError(
                str(directory / name), f"expired on {c.not_valid_after_utc:%Y-%m-%d}", "ask the operator for a new kit"
            )
        if now < c.not_valid_before_utc:
            raise ConfigError(
                str(directory / name),
                f"is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                "check this machine's clock",
            )
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return Kit(directory, ca_pem, cert_pem, key_pem, str(names[0].value) if names else "")


class Connection:
    def __init__(
        self,
        kit: Kit,
        server: str,
        config: FederationConfig | None = None,
        server_name: str | None = None,
        give_up_after_s: float = 3600.0,
    ):
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
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.kit.ca, private_key=self.kit.key, certificate_chain=self.kit.cert
        )
        options = channel_options(config)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        self.channel = grpc.secure_channel(self.server, credentials, options=options)
        self.stub = FederationStub(self.channel)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()

    @property
    def _stub(self) -> pb_grpc.FederationStub:
        assert self.stub is not None, "open() first"
        return self.stub

    def call(self, what: str, fn: Callable[[pb_grpc.FederationStub], T], *, retry: bool = True) -> T:
        """Run ``fn(stub)``, retrying transient failures with exponential backoff and jitter.

        Raises :class:`Refused` (:class:`AuthFailure` for identity) when the call failed for good.
        """
        delay, started, server_errors = 0.5, time.monotonic(), 0
        while True:
            try:
                return fn(self._stub)
            except grpc.RpcError as exc:
                rejected = rejection(exc)
                self.raise_if_final(what, rejected)
                # a server-side error may be transient (a restart), but not forever
                server_errors += rejected.reason in ("internal", "unknown")
                if not retry or time.monotonic() - started > self.give_up_after_s or server_errors > MAX_SERVER_ERRORS:
                    raise Refused(rejected.reason, f"{what}: {rejected}") from exc
                log.warning("%s failed (%s); retrying in %.1fs", what, str(rejected)[:200], delay)
                time.sleep(delay * (0.8 + 0.4 * random.random()))
                delay = min(delay * 2, MAX_RETRY_DELAY_S)

    def raise_if_final(self, what: str, rejected: Refused) -> None:
        details = str(rejected)
        if rejected.reason in IDENTITY:
            raise AuthFailure(
                rejected.reason,
                f"the server refused silo {self.kit.silo} ({self.kit.directory / 'client.crt'}): {details}",
            )
        refusal = None
        if rejected.reason == "unavailable":
            refusal = "untrusted" if any(w in details.lower() for w in _CERTIFICATE_WORDS) else self.tls_refusal()
            if refusal == "hung_up":  # a server killed right after the handshake hangs up too: ask once more
                time.sleep(1.0)
                refusal = self.tls_refusal()
        if refusal == "untrusted":
            raise AuthFailure(
                "bad_certificate",
                (
                    f"TLS handshake with {self.server} failed: {details.strip()[:300]}. Either the server's certificate is "
                    f"not signed by {self.kit.directory / 'ca.crt'} (wrong kit or wrong server address), or the server does "
                    f"not trust {self.kit.directory / 'client.crt'} (issued by another federation's CA)"
                ),
            )
        if refusal == "hung_up":
            raise AuthFailure(
                "bad_certificate",
                (
                    f"the server at {self.server} completed the TLS handshake and then closed the connection at once: it does "
                    f"not accept this silo's certificate {self.kit.directory / 'client.crt'} (issued by another federation's "
                    "CA, or expired or not yet valid by the server's clock). Ask the operator for a new kit"
                ),
            )
        if rejected.reason not in TRANSIENT:  # e.g. too big (the server's size check or gRPC's limit) stays too big
            raise Refused(rejected.reason, f"{what}: {details}")

    def tls_refusal(self, timeout: float = 5.0) -> str | None:
        """Did the server refuse TLS with this kit for good? (gRPC cannot tell: it reports UNAVAILABLE.)

        So try a handshake of our own: "untrusted" when the server's certificate does not verify against the
        kit's CA or the server answers the handshake with a certificate alert; "hung_up" when it completes the
        handshake and closes the connection without a single byte (with TLS 1.3 the client's side completes
        before the server checks the client certificate; a gRPC server sends its HTTP/2 settings at once):
        it refused our certificate. None when it works, or the server cannot be reached or goes away
        mid-handshake (a restart, a proxy that drops the connection): transient.
        """
        try:
            host, port = split_address(self.server)
            context = ssl.create_default_context(cadata=self.kit.ca.decode("ascii", "replace"))
            context.load_cert_chain(self.kit.directory / "client.crt", self.kit.directory / "client.key")
            context.set_alpn_protocols(["h2"])
            with socket.create_connection((host, port), timeout=timeout) as raw:
                try:
                    tls = context.wrap_socket(raw, server_hostname=self.server_name or host)
                except ssl.SSLCertVerificationError:
                    return "untrusted"
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    return None  # the peer went away mid-handshake: a dying or restarting server
                except ssl.SSLError as exc:
                    return "untrusted" if any(w in str(exc).lower() for w in _CERTIFICATE_WORDS) else None
                with tls:
                    try:
                        return "hung_up" if tls.recv(1) == b"" else None
                    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                        return "hung_up"  # an alert or a reset right after a completed handshake
        except (OSError, ValueError, ConfigError):  # no connection, a timeout, a reset: transient
            return None
