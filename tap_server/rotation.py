"""``tap-server rotate``: renew the server's and silos' certificates during a federation.

The federation's state never refers to certificates, so renewing them loses nothing:

- server: a new key and certificate (same names unless new ones are given) replace
  ``KITS/server/server.{crt,key}``. A running server picks them up before its next TLS
  handshake (``ServerTLS``); silos keep trusting it because the CA is the same.
- silo: a new key and certificate replace ``KITS/<silo>/client.{crt,key}`` and become the
  silo's entry in ``silos.json``; the previous certificate stays accepted until the new one is
  first used, and is refused from then on (``SiloAuthenticator``).

Files are replaced atomically (temp file, fsync, rename), keys with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tap_core.errors import ConfigError
from tap_core.atomic_files import atomic_write_bytes
from tap_server.provision import (
    CertificateAuthority,
    SiloRegistry,
    _cert_pem,
    _key_pem,
    cert_fingerprint,
    check_silo_id,
)


@dataclass
class Renewed:
    """What one rotation wrote: the certificate's file, its fingerprint and its expiry."""

    path: Path
    sha256: str
    not_after: dt.datetime


def _replace(path: Path, data: bytes, mode: int) -> None:
    atomic_write_bytes(path, data)  # a temp file made with mode 0600, renamed over the old one
    os.chmod(path, mode)


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key) -> None:
    # Key first: until the certificate follows, the pair does not match and a running server keeps the old one.
    _replace(directory / f"{name}.key", _key_pem(key), 0o600)
    _replace(directory / f"{name}.crt", _cert_pem(cert), 0o644)


def server_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def rotate_server(out: Path, days: int, hosts: list[str] | None = None) -> Renewed:
    """A new server key and certificate from the CA in ``out/ca``, for the same names unless ``hosts``."""
    ca = CertificateAuthority.load(out / "ca")
    server_dir = out / "server"
    current = server_dir / "server.crt"
    if not current.is_file():
        raise ConfigError(str(current), "not found", "--out must be the folder of the original provisioning")
    if hosts:
        for host in hosts:
            _check_host(host)
        names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    else:
        names = server_hosts(x509.load_pem_x509_certificate(current.read_bytes()))
    cert, key = ca.issue("tap-server", days, server_hosts=names)
    _write_pair(server_dir, "server", cert, key)
    return Renewed(current, cert_fingerprint(cert), cert.not_valid_after_utc)


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise ConfigError(f"--server-host {host!r}", "is not a host name or IP address") from None


def rotate_silo(out: Path, silo: str, days: int) -> Renewed:
    """A new key and certificate for ``silo``; silos.json keeps the previous one until the new one is used."""
    check_silo_id(silo)
    registry = SiloRegistry(out / "server" / "silos.json")
    data = registry.load()
    entry = data["silos"].get(silo)
    if entry is None:
        hint = (
            "it was revoked: issue a new kit with --add-silo"
            if silo in data["revoked"]
            else f"known: {', '.join(sorted(data['silos'])) or 'none'}"
        )
        raise ConfigError(f"--silo {silo}", "is not provisioned", hint)
    kit = out / silo
    if not kit.is_dir():
        raise ConfigError(str(kit), "not found", "--out must be the folder of the original provisioning")
    ca = CertificateAuthority.load(out / "ca")
    cert, key = ca.issue(silo, days, client=True)
    _write_pair(kit, "client", cert, key)
    previous = {k: v for k, v in entry.items() if k in ("sha256", "not_after")}
    previous["rotated_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    data["silos"][silo] = {
        "sha256": cert_fingerprint(cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "previous": previous,
    }
    registry.save(data)
    return Renewed(kit / "client.crt", cert_fingerprint(cert), cert.not_valid_after_utc)
