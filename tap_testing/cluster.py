"""A deployed federation as real processes on loopback, for fault scenarios: kits, data, configs, restarts.

:class:`Cluster` provisions a few silos with small synthetic data (an image task
two silos share, a text task), writes ``federation.yaml`` and one ``silo.yaml``
per silo, and starts ``tap-server serve`` and ``tap-client run`` as separate
processes through ``python -m tap_testing.faults`` (so any of them can carry a
kill point, see :mod:`tap_testing.faults`). The server keeps one port across
restarts; agents can dial it directly or through a :class:`~tap_testing.proxy.FaultProxy`.

:func:`reference_run` runs the same federation in this process without any
fault (``tap simulate``'s path, which the deployed system reproduces exactly):
what a faulted run must end with. Logs of every process (appended across
restarts) stay in ``ROOT/logs``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tap_core.config import Deadlines, FederationConfig, ModelSpec, TrainConfig, WireConfig, to_mapping
from tap_core.model.tap_model import ComponentValues
from tap_testing.dirs import FederationDirs
from tap_testing.proxy import FaultProxy

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # what subprocesses must import (this checkout, not another)

SHAPES = {
    "name": "shapes",
    "kind": "classification",
    "modalities": ["image"],
    "family": "image_classification",
    "domain": "general",
}
REVIEWS = {
    "name": "reviews",
    "kind": "classification",
    "modalities": ["text"],
    "family": "text_classification",
    "domain": "general",
}
#: silo -> (task, seed of its data): alpha and gamma share the image task, so their updates are averaged
SILOS: dict[str, tuple[dict[str, Any], int]] = {"alpha": (SHAPES, 0), "beta": (REVIEWS, 1), "gamma": (SHAPES, 2)}

FAULT_CONFIG = FederationConfig(
    name="faults",
    algorithm="tap",
    rounds=2,
    seed=0,
    model=ModelSpec(size="tiny"),
    train=TrainConfig(
        local_steps=2, ft_steps=1, kd_steps=1, batch_size=4, eval_batch_size=16, max_val_examples=8, threads=1
    ),
    # small frames: every tensor stream is several frames, so "mid-stream" exists
    wire=WireConfig(chunk_bytes=64 * 1024, max_message_bytes=1024 * 1024),
    deadlines=Deadlines(join_s=600, round_s=600, finish_s=600, heartbeat_s=1.0),
)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_data(directory: Path, task: dict[str, Any], seed: int, examples: int = 30) -> dict[str, Any]:
    """A small data file for ``task`` (npz images or csv texts); returns the task's ``data:`` entry."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    if task["modalities"] == ["image"]:
        labels = np.array(["circle", "square", "triangle"] * (examples // 3))
        images = rng.integers(0, 255, size=(len(labels), 16, 16, 3), dtype=np.uint8)
        for i, label in enumerate(labels):  # learnable: the class brightens one channel
            images[i, :, :, ["circle", "square", "triangle"].index(label)] //= 4
        np.savez(directory / "data.npz", images=images, labels=labels)
        return {"format": "npz", "path": "data.npz", "test_fraction": 0.2}
    with open(directory / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict"])
        for i in range(examples):
            good = bool(rng.integers(0, 2))
            writer.writerow(
                [
                    f"review {i}: {'wonderful and moving' if good else 'dull and far too long'}",
                    "fresh" if good else "rotten",
                ]
            )
    return {
        "format": "csv",
        "path": "data.csv",
        "text_column": "review",
        "label_column": "verdict",
        "test_fraction": 0.2,
    }


@dataclass
class Cluster(FederationDirs):
    root: Path
    config: FederationConfig = FAULT_CONFIG
    silos: dict[str, tuple[dict[str, Any], int]] = field(default_factory=lambda: dict(SILOS))
    port: int = 0
    health_port: int = 0
    server: subprocess.Popen | None = None
    agents: dict[str, subprocess.Popen] = field(default_factory=dict)
    proxy: FaultProxy | None = None
    server_starts: int = 0
    metrics_port: int = 0  # 0: the server exports no metrics
    max_retry_delay_s: float | None = None  # agents' longest backoff (None: the real 30 s)

    # ------------------------------------------------------------ set-up

    @classmethod
    def create(
        cls,
        root: Path,
        config: FederationConfig = FAULT_CONFIG,
        silos: dict[str, tuple[dict[str, Any], int]] | None = None,
        *,
        data: bool = True,
        metrics: bool = False,
        max_retry_delay_s: float | None = None,
    ) -> "Cluster":
        """Kits and federation.yaml for ``silos``; with ``data``, each silo's data and silo.yaml (agents need
        them, light silos do not); with ``metrics``, the server exports Prometheus metrics; ``max_retry_delay_s``
        caps the agents' backoff (tests: a restarted server is found in seconds)."""
        from tap_server.provision import provision

        cluster = cls(Path(root), config, dict(silos or SILOS), max_retry_delay_s=max_retry_delay_s)
        cluster.root.mkdir(parents=True, exist_ok=True)
        provision(cluster.kits, sorted(cluster.silos), ["127.0.0.1"])
        federation = to_mapping(dataclasses.replace(config, expected_silos=len(cluster.silos)))
        cluster.federation_yaml.write_text(yaml.safe_dump(federation, sort_keys=False))
        for silo, (task, seed) in cluster.silos.items() if data else ():
            entry = write_data(cluster.root / "data" / silo, task, seed)
            cluster.silo_yaml(silo).write_text(yaml.safe_dump({"tasks": [dict(task, data=entry)]}, sort_keys=False))
        cluster.logs.mkdir(exist_ok=True)
        cluster.port, cluster.health_port = free_port(), free_port()
        cluster.metrics_port = free_port() if metrics else 0
        return cluster

    @property
    def federation_yaml(self) -> Path:
        return self.root / "federation.yaml"

    def silo_yaml(self, silo: str) -> Path:
        return self.data / silo / "silo.yaml"

    def client_state(self, silo: str) -> Path:
        return self.root / "clients" / silo

    # ------------------------------------------------------------ processes

    def _spawn(self, command: list[str], log_name: str, env: dict[str, str] | None) -> subprocess.Popen:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TAP_FAULT_")}
        full_env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            }
        )
        full_env.update(env or {})
        with open(self.logs / f"{log_name}.log", "ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')} {sorted((env or {}).items())}\n".encode())
            log.flush()
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)

    def start_server(
        self, fault: str | None = None, env: dict[str, str] | None = None, wait_healthy: bool = True
    ) -> subprocess.Popen:
        from tap_cli.demo import wait_healthy as healthy

        command = [
            sys.executable,
            "-m",
            "tap_testing.faults",
            "tap-server",
            "serve",
            "--kit",
            str(self.kits / "server"),
            "--config",
            str(self.federation_yaml),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state",
            str(self.state),
            "--metrics-port",
            str(self.metrics_port or -1),
            "--health-port",
            str(self.health_port),
            "--exit-when-done",
        ]
        self.server = self._spawn(command, "server", {**({"TAP_FAULT_POINT": fault} if fault else {}), **(env or {})})
        self.server_starts += 1
        if wait_healthy:
            healthy(self.health_port, self.server, self.logs / "server.log", timeout=600)
        return self.server

    def start_agent(self, silo: str, fault: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        address = self.proxy.address if self.proxy is not None else f"127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "tap_testing.faults",
            "tap-client",
            "run",
            "--kit",
            str(self.kits / silo),
            "--server",
            address,
            "--config",
            str(self.silo_yaml(silo)),
            "--state",
            str(self.client_state(silo)),
            "--threads",
            "1",
        ]
        knobs = {"TAP_FAULT_POINT": fault} if fault else {}
        if self.max_retry_delay_s is not None:
            knobs["TAP_FAULT_MAX_RETRY_DELAY_S"] = str(self.max_retry_delay_s)
        self.agents[silo] = self._spawn(command, silo, {**knobs, **(env or {})})
        return self.agents[silo]

    def use_proxy(self) -> FaultProxy:
        self.proxy = FaultProxy(self.port).start()
        return self.proxy

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.log(name).splitlines()[-lines:])

    def wait_exit(self, process: subprocess.Popen, timeout: float, name: str) -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} still running after {timeout:.0f}s:\n{self.tail(name)}") from None

    def wait_all(self, timeout: float) -> dict[str, int]:
        """Wait for the server and every agent to exit; their exit codes ("server" included)."""
        deadline = time.monotonic() + timeout
        codes = {}
        for name, process in [("server", self.server), *self.agents.items()]:
            assert process is not None
            codes[name] = self.wait_exit(process, max(1.0, deadline - time.monotonic()), name)
        return codes

    def kill(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in [self.server, *self.agents.values()]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        if self.proxy is not None:
            self.proxy.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # ------------------------------------------------------------ outcomes

    def report(self) -> dict[str, Any]:
        return json.loads((self.state / "report.json").read_text())

    def final_values(self) -> ComponentValues:
        from tap_core.store import CheckpointStore

        _, values = CheckpointStore(self.state, "state").load()
        return values or {}

    def results(self) -> dict[str, dict[str, Any]]:
        """Each agent's results.json (its stage-2 metrics)."""
        return {silo: json.loads((self.client_state(silo) / "results.json").read_text()) for silo in self.silos}

    def killed(self, name: str) -> int:
        """How many times the process ``name`` killed itself at a fault point (from its log)."""
        from tap_testing.faults import KILLED_MARK

        return self.log(name).count(KILLED_MARK)


@dataclass
class Reference:
    """What an uninterrupted run ends with: the report and the final global model."""

    report: dict[str, Any]
    values: ComponentValues


def in_process(cluster: Cluster) -> tuple[FederationConfig, dict[str, Any]]:
    """The cluster's federation config and its silos as in-process ``SiloRuntime``s (what the agents build)."""
    import torch

    from tap_core.runtime import configure_threads, load_silo_data
    from tap_core.scenario import load_silo_config
    from tap_core.silo import SiloRuntime

    configure_threads(cluster.config.train.threads)
    config = dataclasses.replace(cluster.config, expected_silos=len(cluster.silos))
    runtimes = {}
    for silo in sorted(cluster.silos):
        spec, _ = load_silo_config(cluster.silo_yaml(silo))
        spec = dataclasses.replace(spec, id=silo)
        data = load_silo_data(spec, config, str(cluster.silo_yaml(silo)))
        runtimes[silo] = SiloRuntime(spec, data, config, torch.device("cpu"))
    return config, runtimes


def reference_run(cluster: Cluster, state_dir: Path) -> Reference:
    """The cluster's federation, uninterrupted, in this process (``tap simulate``'s path; no gRPC, no faults)."""
    from tap_cli.simulate import run_federation
    from tap_server.federation import Federation

    config, runtimes = in_process(cluster)
    federation = Federation(config, state_dir=state_dir, expected_silos=len(runtimes))
    report = run_federation(runtimes, config, federation=federation)
    return Reference(report, federation.global_values())


def compare(cluster: Cluster, reference: Reference, tolerance: float = 1e-5) -> tuple[bool, str, dict[str, float]]:
    """Does the cluster's finished federation (server state, report, every agent's results.json) equal ``reference``?"""
    agents = {(silo, t["task"]): t["metrics"] for silo, r in cluster.results().items() for t in r["tasks"]}
    return compare_run(cluster.report(), cluster.final_values(), reference, agents, tolerance)


def compare_run(
    report: dict[str, Any],
    values: ComponentValues,
    reference: Reference,
    agent_metrics: dict[tuple[str, str], dict[str, float]] | None = None,
    tolerance: float = 1e-5,
) -> tuple[bool, str, dict[str, float]]:
    """A finished federation against ``reference``: (verdict, what differs, the largest gaps)."""
    problems: list[str] = []
    model_gap = 0.0
    if set(values) != set(reference.values):
        problems.append(f"components differ: {sorted(set(values) ^ set(reference.values))}")
    for component, tensors in reference.values.items():
        for name, tensor in tensors.items():
            other = values.get(component, {}).get(name)
            if other is None or other.shape != tensor.shape:
                problems.append(f"{component}/{name} missing or reshaped")
                continue
            model_gap = max(model_gap, float((other.float() - tensor.float()).abs().max()))
    if model_gap > tolerance:
        problems.append(f"final global model differs by up to {model_gap:.3g}")
    ours = {(t["silo"], t["task"]): t["metrics"] for t in report["tasks"]}
    theirs = {(t["silo"], t["task"]): t["metrics"] for t in reference.report["tasks"]}
    if set(ours) != set(theirs):
        problems.append(f"reported tasks differ: {sorted(set(ours) ^ set(theirs))}")
    metric_gap = 0.0
    for key, metrics in theirs.items():
        for source in [ours] + ([agent_metrics] if agent_metrics is not None else []):
            got = source.get(key, {})
            for metric, value in metrics.items():
                gap = abs(float(got.get(metric, float("nan"))) - float(value))
                metric_gap = max(metric_gap, gap) if gap == gap else float("inf")
    if metric_gap > tolerance:
        problems.append(f"metrics differ by up to {metric_gap:.3g}")
    numbers = {"model_max_abs_diff": model_gap, "metrics_max_abs_diff": metric_gap}
    return (
        not problems,
        "; ".join(problems) or "final global model and every silo's metrics equal the reference",
        numbers,
    )
