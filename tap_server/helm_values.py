"""Kits as Kubernetes objects: a Secret manifest and a ready Helm values file per release.

``tap-server provision --helm-values`` (and ``rotate --helm-values``) write, under ``KITS/helm/``:

    server-secret.yaml     Secret tap-server-kit: ca.crt, server.crt, server.key, silos.json
    server-values.yaml     values of the server release (that Secret, the federation config)
    <silo>-secret.yaml     Secret tap-kit-<silo>: ca.crt, client.crt, client.key, silo.yaml
    <silo>-values.yaml     values of the silo's agent release (that Secret, the server address)

so a kit goes into a cluster with ``kubectl apply -f <...>-secret.yaml`` and the release with
``helm install -f <...>-values.yaml``. The Secret files hold private keys: they are written with
mode 0600 and travel like the kit folder they come from.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tap_core.errors import ConfigError
from tap_core.atomic_files import atomic_write_bytes
from tap_server.provision import SiloRegistry

SERVER_SECRET = "tap-server-kit"
SERVER_FILES = ("ca.crt", "server.crt", "server.key", "silos.json")
SILO_FILES = ("ca.crt", "client.crt", "client.key", "silo.yaml")


def kubernetes_name(silo: str) -> str:
    """A silo id as a DNS-1123 label (Kubernetes names and Helm releases: lower case, no '_')."""
    return silo.lower().replace("_", "-")


def silo_secret_name(silo: str) -> str:
    return f"tap-kit-{kubernetes_name(silo)}"


class _BlockDumper(yaml.SafeDumper):
    """PEM files and JSON as literal blocks (|), readable and diffable."""


_BlockDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None),
)


def secret_manifest(name: str, directory: Path, files: tuple[str, ...], component: str) -> dict:
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise ConfigError(str(directory), f"lacks {', '.join(missing)}", "pass the --out folder of the provisioning")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/part-of": "tap", "app.kubernetes.io/component": component},
        },
        "type": "Opaque",
        "stringData": {f: (directory / f).read_text() for f in files},
    }


def _write(path: Path, header: str, data: dict, private: bool) -> Path:
    text = header + yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, width=1000)
    atomic_write_bytes(path, text.encode())  # created 0600
    if not private:
        path.chmod(0o644)
    return path


def write_server_secret(out: Path) -> Path:
    return _write(
        out / "helm" / "server-secret.yaml",
        "# The server kit (holds the server's private key). kubectl -n NAMESPACE apply -f this file\n",
        secret_manifest(SERVER_SECRET, out / "server", SERVER_FILES, "server"),
        private=True,
    )


def write_server(out: Path) -> list[Path]:
    secret = write_server_secret(out)
    kit = out / "server"
    federation = yaml.safe_load((kit / "federation.yaml").read_text()) if (kit / "federation.yaml").is_file() else {}
    # Helm merges these over the chart's defaults (sized for 3 silos): say how many this federation has.
    silos = len(SiloRegistry(kit / "silos.json").load()["silos"])
    federation.setdefault("expected_silos", silos)
    federation.setdefault("clients_per_round", silos)
    federation["min_clients"] = min(federation.get("min_clients", 1), silos)
    values = {"server": {"tls": {"existingSecret": SERVER_SECRET}, "federation": federation}}
    header = (
        "# Values of the server release, written by tap-server provision --helm-values.\n"
        f"#   kubectl -n federation apply -f {secret.name}\n"
        "#   helm install fl helm/tap -n federation -f server-values.yaml\n"
        "# server.federation is KITS/server/federation.yaml: edit it here (or there) before the first install.\n"
    )
    return [secret, _write(out / "helm" / "server-values.yaml", header, values, private=False)]


def write_silo_secret(out: Path, silo: str) -> Path:
    return _write(
        out / "helm" / f"{silo}-secret.yaml",
        f"# The kit of silo {silo} (holds its private key): hand it over with the kit, never to anyone else.\n",
        secret_manifest(silo_secret_name(silo), out / silo, SILO_FILES, "client"),
        private=True,
    )


def write_silo(out: Path, silo: str, server: str) -> list[Path]:
    secret = write_silo_secret(out, silo)
    values = {
        "server": {"enabled": False},
        "client": {
            "enabled": True,
            "siloName": kubernetes_name(silo),
            "server": server,
            "tls": {"existingSecret": silo_secret_name(silo)},
        },
    }
    header = (
        f"# Values of silo {silo}'s agent release, written by tap-server provision --helm-values.\n"
        f"#   kubectl -n silo apply -f {secret.name}\n"
        f"#   helm install {kubernetes_name(silo)} helm/tap -n silo -f {silo}-values.yaml "
        "--set client.data.existingClaim=<data PVC>\n"
        "# silo.yaml (in the Secret) lists the tasks; its data paths point under client.data.mountPath (/data).\n"
    )
    return [secret, _write(out / "helm" / f"{silo}-values.yaml", header, values, private=False)]
