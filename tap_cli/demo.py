"""``tap demo``: the deployed federation on one machine — one server, one agent per silo, mTLS on loopback.

It provisions kits, writes federation.yaml and one silo.yaml per silo, starts
``tap-server serve`` and one ``tap-client run`` per silo as separate processes,
follows the server's Prometheus metrics for live progress, then prints the
results table and writes the report and a plot. Everything stays in the
workdir (kits, configs, state, logs, RERUN.md) so any piece can be rerun by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from tap_core.config import FederationConfig, Scenario, to_mapping
from tap_core.errors import TapError
from tap_cli.launcher import Launcher, Process
from tap_cli.options import config_from_options, friendly_errors, training_options, write_outputs

GENERATED = ("kits", "state", "clients", "logs", "silos", "samples", "models", "predictions")
# new records for the predict command in RERUN.md (text tasks); made up, not from any dataset
SAMPLE_TEXTS = (
    "A warm, funny and beautifully acted film.",
    "Two hours of my life I will never get back.",
    "The plot is thin, but the performances carry it.",
)
MARKER = ".tap-demo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_metrics(port: int) -> dict[str, float]:
    """Unlabelled samples of the server's /metrics (plus the current phase)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "tap_phase" and sample.value == 1.0:
                values["phase:" + sample.labels["phase"]] = 1.0
            elif not sample.labels:
                values[sample.name] = sample.value
    return values


def wait_healthy(port: int, process: Process, log_path: Path, timeout: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise TapError(f"tap-server exited with status {process.returncode} during start-up:\n{tail(log_path)}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TapError(f"tap-server did not become healthy within {timeout:.0f}s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class DemoLayout:
    """Where the demo puts things inside the workdir."""

    root: Path

    @property
    def kits(self) -> Path:
        return self.root / "kits"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def federation_yaml(self) -> Path:
        return self.root / "federation.yaml"

    def silo_yaml(self, silo: str) -> Path:
        return self.root / "silos" / f"{silo}.yaml"

    def client_state(self, silo: str) -> Path:
        return self.root / "clients" / silo

    def exported_model(self, silo: str) -> Path:
        return self.root / "models" / silo

    def sample_input(self, task: str) -> Path:
        return self.root / "samples" / f"{task}.jsonl"

    def predictions(self, silo: str, task: str) -> Path:
        return self.root / "predictions" / f"{silo}-{task}.jsonl"


@dataclass
class Processes:
    server: Process | None = None
    clients: dict[str, Process] = field(default_factory=dict)

    def all(self) -> list[Process]:
        return ([self.server] if self.server else []) + list(self.clients.values())

    def stop(self) -> None:
        for process in self.all():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.all():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def prepare_workdir(layout: DemoLayout, scenario: Scenario, config: FederationConfig, device: str | None) -> None:
    from tap_server.provision import provision

    marker = layout.root / MARKER
    if layout.root.is_dir() and any(layout.root.iterdir()) and not marker.is_file():
        raise TapError(
            f"--workdir {layout.root} is not empty and was not made by tap demo: "
            "choose a new or empty folder (the demo replaces its own output there)"
        )
    for name in GENERATED:  # only the demo's own output, in a folder the demo made
        shutil.rmtree(layout.root / name, ignore_errors=True)
    layout.root.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"made by tap demo; its next run replaces {' '.join(n + '/' for n in GENERATED)} here\n")
    provision(layout.kits, [s.id for s in scenario.silos], ["127.0.0.1", "localhost"])
    federation = to_mapping(config)
    federation["expected_silos"] = len(scenario.silos)
    federation["deadlines"] = {"join_s": 600.0, "round_s": 3600.0, "finish_s": 3600.0, "heartbeat_s": 5.0}
    layout.federation_yaml.write_text(yaml.safe_dump(federation, sort_keys=False))
    for silo in scenario.silos:
        tasks = []
        for task in silo.tasks:
            entry = {k: v for k, v in to_mapping(task).items() if v is not None}
            tasks.append(entry)
        path = layout.silo_yaml(silo.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        silo_config: dict[str, Any] = {"tasks": tasks}
        if device:
            silo_config["device"] = device
        path.write_text(yaml.safe_dump(silo_config, sort_keys=False))


def serve_command(kit: Path, config: Path, state: Path, port: int, health: int, metrics: int, *extra: str) -> list[str]:
    """`tap-server serve` on 127.0.0.1:PORT (the demo's server, and the test federations')."""
    listen = f"127.0.0.1:{port}"
    return [sys.executable, "-m", "tap_server.cli", "serve", "--kit", str(kit), "--config", str(config),
            "--listen", listen, "--state", str(state), "--metrics-port", str(metrics), "--health-port", str(health),
            *extra]  # fmt: skip


def run_command(kit: Path, port: int, config: Path, state: Path, *extra: str) -> list[str]:
    """`tap-client run` against 127.0.0.1:PORT (the demo's agents, and the test federations')."""
    server = f"127.0.0.1:{port}"
    return [sys.executable, "-m", "tap_client.cli", "run", "--kit", str(kit), "--server", server,
            "--config", str(config), "--state", str(state), *extra]  # fmt: skip


def server_command(layout: DemoLayout, port: int, health: int, metrics: int, *extra: str) -> list[str]:
    return serve_command(layout.kits / "server", layout.federation_yaml, layout.state, port, health, metrics, *extra)


def client_command(layout: DemoLayout, silo: str, port: int) -> list[str]:
    return run_command(layout.kits / silo, port, layout.silo_yaml(silo), layout.client_state(silo))


def export_command(layout: DemoLayout, silo: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tap_client.cli",
        "export",
        "--state",
        str(layout.client_state(silo)),
        "--out",
        str(layout.exported_model(silo)),
    ]


def predict_command(layout: DemoLayout, silo: str, task: str, input_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tap_client.cli",
        "predict",
        "--model",
        str(layout.exported_model(silo)),
        "--task",
        task,
        "--input",
        str(input_path),
        "--output",
        str(layout.predictions(silo, task)),
    ]


def prediction_notes(layout: DemoLayout, scenario: Scenario) -> list[str]:
    """RERUN.md's "after the federation" lines for one silo; a text task gets a small input file to try."""
    from tap_core.data.inputs import trained_columns

    text_task = next(((s.id, t) for s in scenario.silos for t in s.tasks if t.modalities == ("text",)), None)
    if text_task is not None:
        silo, task = text_task
        input_path = layout.sample_input(task.name)
        input_path.parent.mkdir(parents=True, exist_ok=True)
        column = trained_columns(task).get("texts", "text")
        input_path.write_text("".join(json.dumps({column: text}) + "\n" for text in SAMPLE_TEXTS))
    else:
        silo, task = scenario.silos[0].id, scenario.silos[0].tasks[0]
        input_path = Path("YOUR_INPUT.csv")
    title = "After the federation: export a silo's model and predict new records with it (README.md):"
    return [
        title,
        "",
        "    " + " ".join(export_command(layout, silo)),
        "    " + " ".join(predict_command(layout, silo, task.name, input_path)),
        "",
    ]


def write_rerun_notes(
    layout: DemoLayout, port: int, health: int, metrics: int, silos: list[str], after: list[str] | None = None
) -> None:
    lines = [
        "# Rerun any piece of this demo by hand",
        "",
        "Server:",
        "",
        "    " + " ".join(server_command(layout, port, health, metrics)),
        "",
        "One agent per silo:",
        "",
    ]
    lines += ["    " + " ".join(client_command(layout, silo, port)) for silo in silos]
    lines += [
        "",
        f"Metrics: http://127.0.0.1:{metrics}/metrics   Logs: {layout.logs}/",
        f"Report: {layout.state / 'report.json'}   Status: tap-server status --state {layout.state}",
        "",
    ]
    lines += after or []
    (layout.root / "RERUN.md").write_text("\n".join(lines))


def follow(
    processes: Processes,
    layout: DemoLayout,
    metrics_port: int,
    config: FederationConfig,
    silos: int,
    per_round: int,
    show_progress: bool,
) -> None:
    """Live progress from the server's metrics until the server exits; fail fast if an agent fails."""
    from tap_cli.progress import FederationProgress

    bar = FederationProgress(config.rounds, per_round, silos, f"demo {config.algorithm}") if show_progress else None
    shown = 0
    try:
        while processes.server.poll() is None:
            for silo, process in processes.clients.items():
                if process.poll() not in (None, 0):
                    raise TapError(
                        f"agent {silo} exited with status {process.returncode}:\n{tail(layout.logs / f'{silo}.log')}"
                    )
            try:
                m = read_metrics(metrics_port)
            except OSError:
                m = {}
            if bar and m:
                done = int(m.get("tap_updates_received_total", 0) + m.get("tap_results_received", 0))
                phase = next((k.split(":", 1)[1] for k in m if k.startswith("phase:")), "?")
                bar.bar.set_postfix_str(
                    f"round {int(m.get('tap_round', 0))}/{config.rounds} {phase} "
                    f"clients {int(m.get('tap_clients_connected', 0))}/{silos}"
                )
                if done > shown:
                    bar.bar.update(done - shown)
                    shown = done
            time.sleep(1.0)  # a metrics scrape costs CPU the silos share
    finally:
        if bar:
            bar.close()
    if processes.server.returncode != 0:
        raise TapError(
            f"tap-server exited with status {processes.server.returncode}:\n{tail(layout.logs / 'server.log')}"
        )


def run_demo(
    scenario: Scenario,
    config: FederationConfig,
    workdir: Path,
    device: str | None = None,
    show_progress: bool = True,
    fresh_processes: bool = False,
) -> dict[str, Any]:
    layout = DemoLayout(workdir.resolve())
    prepare_workdir(layout, scenario, config, device)
    layout.logs.mkdir(parents=True, exist_ok=True)
    port, health, metrics = free_port(), free_port(), free_port()
    write_rerun_notes(layout, port, health, metrics, [s.id for s in scenario.silos], prediction_notes(layout, scenario))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = Launcher(fresh=fresh_processes)
    processes = Processes()
    try:
        processes.server = launcher.start(
            server_command(layout, port, health, metrics, "--exit-when-done"), layout.logs / "server.log", env
        )
        # the agents start while the server loads its backbone (they retry until it answers): their
        # data loading overlaps the server's start instead of following it
        for silo in scenario.silos:
            processes.clients[silo.id] = launcher.start(
                client_command(layout, silo.id, port), layout.logs / f"{silo.id}.log", env
            )
        wait_healthy(health, processes.server, layout.logs / "server.log")
        per_round = min(config.clients_per_round or len(scenario.silos), len(scenario.silos))
        follow(processes, layout, metrics, config, len(scenario.silos), per_round, show_progress)
        for silo, process in processes.clients.items():
            try:
                code = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                raise TapError(
                    f"agent {silo} did not exit after the federation finished:\n{tail(layout.logs / f'{silo}.log')}"
                ) from None
            if code != 0:
                raise TapError(f"agent {silo} exited with status {code}:\n{tail(layout.logs / f'{silo}.log')}")
    finally:
        processes.stop()
    report_path = layout.state / "report.json"
    if not report_path.is_file():
        raise TapError(f"the server finished without a report:\n{tail(layout.logs / 'server.log')}")
    return json.loads(report_path.read_text())


@click.command()
@training_options
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("tap-demo"),
    show_default=True,
    help="Kits, configs, state and logs go here (previous demo output in it is replaced).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the report here (it is always in WORKDIR/report.json).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG of the results (default WORKDIR/results.png).",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option(
    "--fresh-processes",
    is_flag=True,
    help="Start every process with its own interpreter instead of forking it from one that already "
    "imported torch (slower start; the processes and their results are the same).",
)
@friendly_errors
def demo(
    workdir: Path,
    report_path: Path | None,
    plot_path: Path | None,
    progress: bool,
    fresh_processes: bool,
    **opts: Any,
) -> None:
    """Run the deployed federation on this machine: tap-server + one tap-client per silo over mTLS."""
    scenario, config = config_from_options(opts)
    started = time.perf_counter()
    report = run_demo(scenario, config, workdir, opts["device"], progress, fresh_processes)
    report["timing"]["total_seconds"] = time.perf_counter() - started
    (workdir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    write_outputs(report, report_path, plot_path or workdir / "results.png")
    click.echo(f"workdir: {workdir} (kits, configs, state, logs; RERUN.md has the commands)")
