"""Provisioning: a CA, the server's certificate and one ready-to-hand-over kit per silo.

Layout written under ``KITS``:

    ca/ca.crt, ca/ca.key          the federation CA (keep offline; needed to add silos)
    server/ca.crt server.crt server.key silos.json federation.yaml
    <silo>/ca.crt client.crt client.key silo.yaml README.txt

The silo id is the client certificate's common name; ``silos.json`` lists the
provisioned silos with the SHA-256 of the certificate each was given, so a
certificate minted later for the same name (or for an unlisted one) is refused.
Keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tap_core.errors import ConfigError

SILO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
ORGANIZATION = "TAP federation"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@dataclass
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str, days: int) -> "CertificateAuthority":
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION), x509.NameAttribute(NameOID.COMMON_NAME, name)]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> "CertificateAuthority":
        cert_path, key_path = directory / "ca.crt", directory / "ca.key"
        if not key_path.is_file():
            raise ConfigError(
                str(key_path),
                "CA key not found",
                "pass the --out folder of the original provisioning (it holds ca/ca.key)",
            )
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cls(cert, key)

    def save(self, directory: Path) -> None:
        _write_public(directory / "ca.crt", _cert_pem(self.cert))
        _write_private(directory / "ca.key", _key_pem(self.key))

    def issue(
        self, cn: str, days: int, *, server_hosts: list[str] | None = None, client: bool = False
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()), critical=False)
        )
        if client:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"tap://silo/{cn}")]), critical=False
            )
        else:
            names: list[x509.GeneralName] = []
            for host in server_hosts or []:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            # clientAuth too: the server's liveness self-check dials its own mTLS port with this certificate
            # (no silo can use it: silos.json pins each silo's own certificate).
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256()), key


class SiloRegistry:
    """``silos.json`` of the server kit: provisioned silos and their certificate fingerprints."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        if not self.path.is_file():
            return {"silos": {}, "revoked": {}}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(str(self.path), f"is not valid JSON: {exc}") from exc
        data.setdefault("silos", {})
        data.setdefault("revoked", {})
        return data

    def save(self, data: dict) -> None:
        from tap_core.atomic_files import atomic_write_json

        atomic_write_json(self.path, data)

    def add(self, silo: str, cert: x509.Certificate) -> None:
        data = self.load()
        data["silos"][silo] = {"sha256": cert_fingerprint(cert), "not_after": cert.not_valid_after_utc.isoformat()}
        data["revoked"].pop(silo, None)
        self.save(data)

    def revoke(self, silo: str) -> None:
        data = self.load()
        if silo not in data["silos"]:
            raise ConfigError(
                str(self.path), f"silo {silo!r} is not provisioned", f"known: {', '.join(sorted(data['silos']))}"
            )
        data["revoked"][silo] = data["silos"].pop(silo)
        data["revoked"][silo]["revoked_at"] = _now().isoformat()
        self.save(data)


def check_silo_id(silo: str) -> None:
    if not SILO_ID.match(silo) or silo in ("ca", "server"):
        raise ConfigError(f"--silo {silo}", "silo ids are 1-63 letters, digits, '-' or '_' (and not 'ca' or 'server')")


SILO_README = """Kit for silo {silo} of a TAP federation.

  ca.crt       the federation's CA (verifies the server)
  client.crt   this silo's certificate (its identity: CN={silo})
  client.key   this silo's private key: keep it secret (mode 0600)
  silo.yaml    your tasks and data paths: edit before the first run

Run the agent next to the data:

  tap-client run --kit {kit_dir} --server {server} --config {kit_dir}/silo.yaml

Data never leaves this silo; only trainable component tensors and numbers do.
"""

SILO_TEMPLATE = {
    "tasks": [
        {
            "name": "my-task",
            "kind": "classification",
            "modalities": ["text"],
            "family": "text_classification",
            "domain": "general",
            "data": {
                "format": "csv",
                "path": "data/train.csv",
                "text_column": "text",
                "label_column": "label",
                "test_fraction": 0.2,
            },
        }
    ],
    "state_dir": "tap-client-state",
}

FEDERATION_TEMPLATE = {
    "name": "my-federation",
    "algorithm": "tap",
    "rounds": 10,
    "seed": 0,
    "min_clients": 1,
    "model": {"backbone": "flava", "size": "small", "text_encoder": "minilm"},
    "train": {"local_steps": 20, "batch_size": 16},
    "wire": {"dtype": "fp32", "chunk_bytes": 2097152},
    "deadlines": {"join_s": 600, "round_s": 1800, "finish_s": 3600},
}


def provision(
    out: Path, silos: list[str], server_hosts: list[str], days: int = 365, ca_days: int = 3650, port: int = 50051
) -> None:
    """Create the CA, the server kit and one kit per silo under ``out`` (refuses to overwrite a CA)."""
    for silo in silos:
        check_silo_id(silo)
    if len(set(silos)) != len(silos):
        raise ConfigError("--silo", "a silo is listed twice")
    if (out / "ca" / "ca.key").exists():
        raise ConfigError(str(out / "ca"), "already holds a CA", "use --add-silo to add silos, or a new --out folder")
    hosts = list(dict.fromkeys(server_hosts + ["localhost", "127.0.0.1"]))
    ca = CertificateAuthority.create("TAP federation CA", ca_days)
    ca.save(out / "ca")
    server_dir = out / "server"
    cert, key = ca.issue("tap-server", days, server_hosts=hosts)
    _write_public(server_dir / "ca.crt", _cert_pem(ca.cert))
    _write_public(server_dir / "server.crt", _cert_pem(cert))
    _write_private(server_dir / "server.key", _key_pem(key))
    (server_dir / "federation.yaml").write_text(yaml.safe_dump(FEDERATION_TEMPLATE, sort_keys=False))
    SiloRegistry(server_dir / "silos.json").save({"silos": {}, "revoked": {}})
    for silo in silos:
        add_silo(out, silo, days, server=f"{server_hosts[0] if server_hosts else 'localhost'}:{port}", ca=ca)


def add_silo(
    out: Path, silo: str, days: int = 365, server: str = "SERVER:50051", ca: CertificateAuthority | None = None
) -> Path:
    check_silo_id(silo)
    ca = ca or CertificateAuthority.load(out / "ca")
    registry = SiloRegistry(out / "server" / "silos.json")
    if silo in registry.load()["silos"]:
        raise ConfigError(f"--silo {silo}", "is already provisioned", "revoke it first to issue a new certificate")
    cert, key = ca.issue(silo, days, client=True)
    kit = out / silo
    _write_public(kit / "ca.crt", _cert_pem(ca.cert))
    _write_public(kit / "client.crt", _cert_pem(cert))
    _write_private(kit / "client.key", _key_pem(key))
    (kit / "silo.yaml").write_text(yaml.safe_dump(SILO_TEMPLATE, sort_keys=False))
    (kit / "README.txt").write_text(SILO_README.format(silo=silo, kit_dir=f"kits/{silo}", server=server))
    registry.add(silo, cert)
    return kit
