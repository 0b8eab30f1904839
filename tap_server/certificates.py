"""The server's TLS material over a federation's life: reloaded when it changes, and its days left.

``ServerTLS`` puts the kit's ``server.crt``, ``server.key`` and ``ca.crt`` behind gRPC's dynamic
server credentials. gRPC asks it before every new TLS handshake; when the files changed
(``tap-server rotate``, an updated Kubernetes Secret) and the new certificate, key and CA belong
together, new connections get the new material. No restart: the federation keeps its round.
A half-written or inconsistent kit is refused with a log line and the current material stays.

``CertificateExpiryCollector`` exports ``tap_certificate_days_left`` at every scrape: days left
of the server certificate, of the CA and of each provisioned silo's certificate.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tap_core.errors import ConfigError

log = logging.getLogger(__name__)

KIT_FILES = ("server.crt", "server.key", "ca.crt")
SECONDS_PER_DAY = 86400.0


def days_left(not_after: dt.datetime, now: dt.datetime | None = None) -> float:
    now = now or dt.datetime.now(dt.timezone.utc)
    return (not_after - now).total_seconds() / SECONDS_PER_DAY


@dataclass(frozen=True)
class TLSMaterial:
    """One consistent set: the server's certificate and key and the CA bundle that verifies silos."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    cert: x509.Certificate
    cas: tuple[x509.Certificate, ...]

    @property
    def can_dial_itself(self) -> bool:
        """The certificate may also act as a TLS client (the liveness self-check dials the mTLS port)."""
        try:
            usages = self.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return True  # no EKU: any use
        return ExtendedKeyUsageOID.CLIENT_AUTH in usages

    def grpc_config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem)


def load_material(kit: Path) -> TLSMaterial:
    """Read and cross-check the server's TLS files; ConfigError says which file is wrong and why."""
    data = {}
    for name in KIT_FILES:
        path = kit / name
        if not path.is_file():
            raise ConfigError(
                str(path),
                "not found",
                f"--kit must be the server folder written by `tap-server provision` (it holds {name})",
            )
        data[name] = path.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(data["server.crt"])
        cas = tuple(x509.load_pem_x509_certificates(data["ca.crt"]))
    except ValueError as exc:
        raise ConfigError(str(kit), f"unreadable certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data["server.key"], password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(kit / "server.key"), f"unreadable private key: {exc}") from exc
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise ConfigError(
            str(kit / "server.key"),
            "does not belong to server.crt",
            "replace both together (tap-server rotate --server writes a matching pair)",
        )
    if not any(_issued_by(cert, ca) for ca in cas):
        # ca.crt only verifies silos; silos verify the server with their own ca.crt. Worth a word, not a refusal.
        log.warning(
            "%s is not signed by a CA in %s: silos of that CA are accepted, but only silos that trust the "
            "server certificate's issuer can connect",
            kit / "server.crt",
            kit / "ca.crt",
        )
    return TLSMaterial(data["server.crt"], data["server.key"], data["ca.crt"], cert, cas)


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


class ServerTLS:
    """The kit's TLS files, reloaded when they change on disk (checked before each new handshake)."""

    def __init__(self, kit: Path):
        self.kit = kit
        self._lock = threading.Lock()
        self._signature = self._stat()
        self.material = load_material(kit)  # at start a broken kit is an error, later it is only logged
        self._version = 0  # bumped on every accepted reload
        self._served = 0  # the version gRPC was last handed
        self._refused: tuple | None = None  # signature of a kit already refused (log it once)

    def _stat(self) -> tuple:
        out: list[tuple[int, int, int] | None] = []
        for name in KIT_FILES:
            try:
                st = (self.kit / name).stat()  # follows a Secret volume's ..data symlink
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def reload(self) -> bool:
        """Load the files again if they changed; True when new material is now in use."""
        with self._lock:
            signature = self._stat()
            if signature == self._signature or signature == self._refused:
                return False
            try:
                material = load_material(self.kit)
            except ConfigError as exc:  # e.g. the key written but not the certificate yet: keep what works
                self._refused = signature
                log.warning(
                    "server TLS files changed but are not usable (%s); still serving the previous certificate", exc
                )
                return False
            old = self.material.cert
            self.material, self._signature, self._refused = material, signature, None
            self._version += 1
        log.info(
            "server TLS material reloaded: certificate serial %x -> %x, valid until %s",
            old.serial_number,
            material.cert.serial_number,
            material.cert.not_valid_after_utc.isoformat(),
        )
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher: None keeps the current configuration."""
        try:
            self.reload()
            with self._lock:
                if self._served == self._version:
                    return None
                self._served = self._version
                return self.material.grpc_config()
        except Exception:  # never let a callback of the TLS stack raise
            log.exception("reloading the server TLS material failed; keeping the current one")
            return None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.material.grpc_config(), self._fetch, require_client_authentication=True
        )

    def expiries(self) -> Iterator[tuple[str, str, dt.datetime]]:
        """(certificate, silo, not_after) of the server certificate in use and of each CA certificate."""
        material = self.material
        yield "server", "", material.cert.not_valid_after_utc
        for ca in material.cas:
            yield "ca", "", ca.not_valid_after_utc


ExpirySource = Callable[[], Iterable[tuple[str, str, dt.datetime]]]


class CertificateExpiryCollector(Collector):
    """``tap_certificate_days_left{certificate, silo}``, computed at scrape time from ``attach``-ed sources."""

    NAME = "tap_certificate_days_left"
    HELP = "Days until a certificate expires (certificate: server, ca or silo; silo: the silo id)."

    def __init__(self, registry=None):
        self._sources: list[ExpirySource] = []
        if registry is not None:
            registry.register(self)

    def attach(self, source: ExpirySource) -> None:
        self._sources.append(source)

    def describe(self):
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["certificate", "silo"])]

    def collect(self):
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["certificate", "silo"])
        now = dt.datetime.now(dt.timezone.utc)
        for source in self._sources:
            try:
                for certificate, silo, not_after in source():
                    family.add_metric([certificate, silo], round(days_left(not_after, now), 4))
            except Exception:  # a scrape never fails because of one source
                log.exception("certificate expiry source failed")
        yield family
