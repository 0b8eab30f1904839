"""A tiny two-silo federation on disk for the operations tests (containers, Prometheus, rotation).

Kits from ``tap-server provision``, a ``federation.yaml`` with the tiny model and short deadlines
(written into the server kit, where the images' default command looks for it), one small CSV
text-classification task per silo and one ``silo.yaml`` per silo whose data path is given by the
caller (a host folder, or ``/data`` inside a container).
"""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tap_cli.demo import run_command, serve_command
from tap_core.config import Deadlines, FederationConfig, ModelSpec, TrainConfig, WireConfig, to_mapping
from tap_testing.dirs import FederationDirs

SILOS = ("alpha", "beta")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(rounds: int = 2, silos: int = 2, local_steps: int = 2) -> FederationConfig:
    return FederationConfig(
        name="ops-test",
        algorithm="tap",
        rounds=rounds,
        seed=0,
        expected_silos=silos,
        model=ModelSpec(size="tiny", text_encoder=None),
        train=TrainConfig(
            local_steps=local_steps,
            batch_size=8,
            ft_steps=1,
            kd_steps=1,
            eval_batch_size=16,
            max_val_examples=8,
            threads=1,
        ),
        wire=WireConfig(chunk_bytes=64 * 1024, max_message_bytes=1024 * 1024),
        deadlines=Deadlines(join_s=300, round_s=300, finish_s=300, heartbeat_s=1.0),
    )


@dataclass
class TinyFederation(FederationDirs):
    root: Path
    silos: tuple[str, ...] = SILOS
    config: FederationConfig = field(default_factory=tiny_config)

    @property
    def federation_yaml(self) -> Path:
        return self.kits / "server" / "federation.yaml"

    def silo_yaml(self, silo: str) -> Path:
        return self.kits / silo / "silo.yaml"

    def client_state(self, silo: str) -> Path:
        return self.state / silo

    def server_command(self, port: int, health: int, metrics: int, *extra: str) -> list[str]:
        return serve_command(
            self.kits / "server", self.federation_yaml, self.state / "server", port, health, metrics, *extra
        )

    def client_command(self, silo: str, port: int, *extra: str) -> list[str]:
        return run_command(
            self.kits / silo, port, self.silo_yaml(silo), self.client_state(silo), "--threads", "1", *extra
        )

    def start(self, command: list[str], name: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)"


def write_csv(path: Path, seed: int, rows: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict"])
        for i in range(rows):
            good = (i + seed) % 2 == 0
            writer.writerow(
                [
                    f"review {i}: the film was {'wonderful and moving' if good else 'dull and far too long'}",
                    "fresh" if good else "rotten",
                ]
            )


def make_tiny_federation(
    root: Path, data_dir: str | None = None, days: int = 365, rounds: int = 2, local_steps: int = 2
) -> TinyFederation:
    """Provision and configure; ``data_dir`` is where the silos' CSV files appear to the agents."""
    from tap_server.provision import provision

    fed = TinyFederation(root, config=tiny_config(rounds, local_steps=local_steps))
    provision(fed.kits, list(fed.silos), ["127.0.0.1", "localhost"], days=days)
    fed.federation_yaml.write_text(yaml.safe_dump(to_mapping(fed.config), sort_keys=False))
    for i, silo in enumerate(fed.silos):
        write_csv(fed.data / f"{silo}.csv", seed=i)
        where = data_dir or str(fed.data)
        task = {
            "name": "reviews",
            "kind": "classification",
            "modalities": ["text"],
            "domain": "reviews",
            "data": {
                "format": "csv",
                "path": f"{where}/{silo}.csv",
                "text_column": "review",
                "label_column": "verdict",
                "test_fraction": 0.25,
            },
        }
        fed.silo_yaml(silo).write_text(yaml.safe_dump({"tasks": [task]}, sort_keys=False))
    fed.state.mkdir(parents=True, exist_ok=True)
    return fed


def read_metrics(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics endpoint as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metrics_up(port: int) -> bool:
    """Does a /metrics endpoint answer on this loopback port?"""
    try:
        read_metrics(port)
        return True
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def rounds_completed(state_dir: Path) -> int:
    """Rounds aggregated and persisted according to a server state directory (-1: no state yet)."""
    from tap_server.federation_state import FederationState

    try:
        return len(FederationState.from_json(json.loads((state_dir / "state.json").read_text())).log.history)
    except (OSError, ValueError, KeyError, TypeError):
        return -1
