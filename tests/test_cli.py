"""Small command-line behaviours: report printing, server status, readable errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from conftest import tiny_config
from tap_cli.cli import main as tap
from tap_cli.simulate import run_federation
from tap_server.cli import main as tap_server
from tap_server.federation import Federation


def test_report_and_status_commands(tmp_path, make_runtimes):
    config = tiny_config("fedavg", rounds=1)
    runtimes = make_runtimes(config)
    federation = Federation(config, state_dir=tmp_path / "state", expected_silos=len(runtimes))
    report = run_federation(runtimes, config, federation=federation)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    result = CliRunner().invoke(tap, ["report", str(path), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "mean over silos" in result.output and f"{report['mean_primary']:.4f}" in result.output
    assert (tmp_path / "p.png").stat().st_size > 0
    status = CliRunner().invoke(tap_server, ["status", "--state", str(tmp_path / "state")])
    assert status.exit_code == 0, status.output
    assert "phase done, round 1/1, 3 silos joined, 3 results" in status.output


def test_status_of_an_empty_directory_says_so(tmp_path):
    result = CliRunner().invoke(tap_server, ["status", "--state", str(tmp_path)])
    assert result.exit_code == 2 and "no federation state" in result.output


def test_serve_with_a_bad_config_is_a_one_line_error(tmp_path):
    config = tmp_path / "federation.yaml"
    config.write_text("algoritm: tap\n")
    result = CliRunner().invoke(
        tap_server,
        ["serve", "--kit", str(tmp_path), "--config", str(config), "--metrics-port", "-1", "--health-port", "-1"],
    )
    assert result.exit_code == 2
    assert "algoritm: unknown key" in result.output and "did you mean 'algorithm'" in result.output


def test_provision_needs_silos_and_a_host(tmp_path):
    result = CliRunner().invoke(tap_server, ["provision", "--out", str(tmp_path / "k"), "--silo", "a"])
    assert result.exit_code != 0 and "--server-host" in result.output
    result = CliRunner().invoke(
        tap_server, ["provision", "--out", str(tmp_path / "k"), "--server-host", "h", "--silo", "bad.name"]
    )
    assert result.exit_code == 2 and "silo ids are" in result.output
