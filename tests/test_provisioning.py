"""Provisioning: the CA, the server and silo kits, silos added and revoked later."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography import x509
from helpers import tap_server

from tap_core.errors import ConfigError
from tap_server.provision import SiloRegistry, add_silo, cert_fingerprint, provision


def test_provision_writes_private_keys_and_fingerprints(tmp_path):
    provision(tmp_path, ["clinic-a", "lab_b"], ["fl.example.org", "10.0.0.7"])
    for key in (
        tmp_path / "ca" / "ca.key",
        tmp_path / "server" / "server.key",
        tmp_path / "clinic-a" / "client.key",
        tmp_path / "lab_b" / "client.key",
    ):
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
