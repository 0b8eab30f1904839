"""The deployed federation as separate processes over mTLS: parity with simulate, agent restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import FAST_OPTIONS
from tap_cli.cli import main
from tap_cli.demo import DemoLayout, client_command, free_port, prepare_workdir, server_command, wait_healthy
from tap_cli.options import config_from_options
from tap_cli.simulate import run_simulation
from tap_core.errors import TapError

OPTIONS = dict(
    scenario="tap-bench-mini",
    algorithm="tap",
    rounds=2,
    seed=0,
    model="tiny",
    clients_per_round=None,
    local_steps=2,
    batch_size=8,
    grad_accum=None,
    peak_lr=None,
    min_lr=None,
    replacement=None,
    margin=None,
    ft_steps=2,
    kd_steps=2,
    kd_temperature=None,
    device=None,
    threads=None,
    wire_dtype=None,
)


@pytest.fixture(scope="module")
def simulated():
    scenario, config = config_from_options(OPTIONS)
    return run_simulation(scenario, config)


def assert_same_metrics(a: dict, b: dict) -> None:
    assert [(t["silo"], t["task"]) for t in a["tasks"]] == [(t["silo"], t["task"]) for t in b["tasks"]]
    for x, y in zip(a["tasks"], b["tasks"]):
        for key, value in x["metrics"].items():
            assert abs(value - y["metrics"][key]) <= 1e-4, (x["silo"], x["task"], key, value, y["metrics"][key])
    assert a["replacements"] == b["replacements"]
    assert a["wire"] == b["wire"]


def test_demo_matches_simulate_and_stays_within_the_wire_budget(tmp_path, simulated):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", *FAST_OPTIONS, "--workdir", str(workdir), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "report.json").read_text())
    assert_same_metrics(report, simulated)
    transport = report["transport"]
    assert transport["max_ratio_per_client_round"] <= 1.05
    assert transport["framing_overhead"] < 0.05
    for silo in ("fashion-a", "vqa-a"):
        client = workdir / "clients" / silo
        assert (client / "results.json").is_file() and (client / "final_model.safetensors").is_file()
    assert (workdir / "results.png").is_file() and (workdir / "RERUN.md").is_file()
    for key in (workdir / "kits").rglob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key
    assert "mean over silos" in result.output


def test_an_agent_killed_mid_federation_resumes_from_disk(tmp_path, simulated):
    """SIGKILL one agent after its first round; a restarted agent finishes with identical results."""
    scenario, config = config_from_options(OPTIONS)
    layout = DemoLayout(tmp_path)
    prepare_workdir(layout, scenario, config, None)
    layout.logs.mkdir()
    port, health, metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(cmd, name):
        return subprocess.Popen(cmd, stdout=open(layout.logs / f"{name}.log", "ab"), stderr=subprocess.STDOUT, env=env)

    server = start(server_command(layout, port, health, metrics, "--exit-when-done"), "server")
    clients = {}
    try:
        wait_healthy(health, server, layout.logs / "server.log")
        clients = {s.id: start(client_command(layout, s.id, port), s.id) for s in scenario.silos}
        victim = "mixed-gen"
        marker = layout.client_state(victim) / "silo.json"
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, "the agent never finished round 1"
            time.sleep(0.2)
        clients[victim].send_signal(signal.SIGKILL)
        clients[victim].wait()
        clients[victim] = start(client_command(layout, victim, port), victim)
        assert server.wait(timeout=240) == 0
        for silo, process in clients.items():
            assert process.wait(timeout=60) == 0, (layout.logs / f"{silo}.log").read_text()[-2000:]
    finally:
        for process in [server, *clients.values()]:
            if process.poll() is None:
                process.kill()
    report = json.loads((layout.state / "report.json").read_text())
    assert_same_metrics(report, simulated)
    log = (layout.logs / "mixed-gen.log").read_text()
    assert "resumed local state" in log


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("do not delete")
    scenario, config = config_from_options(OPTIONS)
    with pytest.raises(TapError, match="not made by tap demo"):
        prepare_workdir(DemoLayout(tmp_path), scenario, config, None)
    assert (tmp_path / "precious.txt").exists()


def test_tap_server_and_client_commands_are_installed():
    for module in ("tap_server.cli", "tap_client.cli", "tap_cli.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Usage" in out.stdout


def test_sigterm_stops_the_server_cleanly(tmp_path):
    scenario, config = config_from_options(OPTIONS)
    layout = DemoLayout(tmp_path)
    prepare_workdir(layout, scenario, config, None)
    layout.logs.mkdir()
    port, health, metrics = free_port(), free_port(), free_port()
    log = layout.logs / "server.log"
    server = subprocess.Popen(
        server_command(layout, port, health, metrics),
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_healthy(health, server, log)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    text = log.read_text()
    assert "finishing the state write in progress" in text and "stopped" in text
