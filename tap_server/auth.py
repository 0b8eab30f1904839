"""Who is calling: the silo id from the verified client certificate, checked against silos.json.

The TLS layer already proved the certificate chains to the federation CA and
is within its validity. Here we also require that the certificate is exactly the
one provisioned for that silo (SHA-256 listed in silos.json) and not revoked.
silos.json is re-read whenever it changes on disk (revocation needs no restart).

After ``tap-server rotate --silo S`` the silo's entry names the new certificate and keeps the
previous one: both are accepted until the new one is first used, then the previous one is retired
for good (recorded in the server's state directory, so a restart does not bring it back).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from pathlib import Path

import grpc
from cryptography import x509

from tap_core.errors import Rejected
from tap_server.provision import SiloRegistry, cert_fingerprint, common_name

log = logging.getLogger(__name__)


class SiloAuthenticator:
    def __init__(self, registry_path: Path, retired_path: Path | None = None):
        self.registry = SiloRegistry(registry_path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._data: dict = {"silos": {}, "revoked": {}}
        self.retired = RetiredCertificates(retired_path)
        self.reload()

    def reload(self) -> None:
        with self._lock:
            try:
                mtime = self.registry.path.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime != self._mtime:
                self._data = self.registry.load()
                self._mtime = mtime

    @property
    def provisioned(self) -> list[str]:
        return sorted(self._data["silos"])

    def identify_pem(self, pem: bytes) -> str:
        """The silo id of a (TLS-verified) client certificate, or :class:`Rejected` saying why not."""
        self.reload()
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise Rejected("bad_certificate", f"unreadable client certificate: {exc}") from exc
        silo = common_name(cert)
        fingerprint = cert_fingerprint(cert)
        with self._lock:
            silos, revoked = self._data["silos"], self._data["revoked"]
        if silo in revoked and revoked[silo].get("sha256") == fingerprint:
            raise Rejected("revoked", f"the certificate of silo {silo} was revoked; ask the operator for a new kit")
        entry = silos.get(silo)
        previous = (entry or {}).get("previous") or {}
        if previous.get("sha256") == fingerprint:
            if self.retired.contains(fingerprint):
                raise Rejected(
                    "retired_certificate",
                    f"this certificate of silo {silo} was replaced by a rotated one that is now in use; "
                    "run the agent with the new kit the operator handed over",
                )
            return silo  # rotated, but the new certificate has not been used yet
        if entry is None:
            raise Rejected(
                "not_provisioned",
                f"silo {silo!r} is not provisioned in this federation; ask the operator to run "
                f"`tap-server provision --add-silo {silo}` and use the kit it writes",
            )
        if entry.get("sha256") != fingerprint:
            raise Rejected(
                "unknown_certificate",
                f"this certificate for silo {silo} is not the one provisioned (SHA-256 {fingerprint[:16]}…); "
                "use the kit the operator handed over",
            )
        if previous.get("sha256") and not self.retired.contains(previous["sha256"]):
            self.retired.add(previous["sha256"], silo)
            log.info("silo %s uses its rotated certificate: the previous one is no longer accepted", silo)
        return silo

    def silo_expiries(self):
        """("silo", silo id, not_after) of each provisioned silo's current certificate."""
        self.reload()
        with self._lock:
            silos = dict(self._data["silos"])
        for silo, entry in sorted(silos.items()):
            if entry.get("not_after"):
                yield "silo", silo, dt.datetime.fromisoformat(entry["not_after"])

    def identify(self, context: grpc.ServicerContext) -> str:
        auth = context.auth_context()
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        if not pem:
            raise Rejected("no_certificate", "no client certificate: connect with mTLS using the silo kit")
        return self.identify_pem(pem)


class RetiredCertificates:
    """Fingerprints of rotated-out silo certificates, persisted as JSON (None: in memory only)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        if path is not None and path.is_file():
            self._entries = json.loads(path.read_text()).get("retired", {})

    def contains(self, fingerprint: str) -> bool:
        with self._lock:
            return fingerprint in self._entries

    def add(self, fingerprint: str, silo: str) -> None:
        from tap_core.atomic_files import atomic_write_json

        with self._lock:
            self._entries[fingerprint] = {"silo": silo, "retired_at": dt.datetime.now(dt.timezone.utc).isoformat()}
            if self.path is not None:
                atomic_write_json(self.path, {"retired": self._entries})
