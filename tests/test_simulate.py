"""``tap simulate`` end to end on the built-in mini scenario (real offline data, tiny model)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import FAST_OPTIONS
from tap_cli.cli import main

FAST = [*FAST_OPTIONS, "--no-progress"]


def simulate(tmp_path, *args: str) -> dict:
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main, ["simulate", "--scenario", "tap-bench-mini", *FAST, "--report", str(report), *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text()), result.output


@pytest.mark.parametrize("algorithm", ["tap", "tap-nokd", "fedavg", "fedavg-ft", "local"])
def test_simulate_mini_scenario(tmp_path, algorithm):
    report, output = simulate(tmp_path, "--algorithm", algorithm, "--plot", str(tmp_path / "plot.png"))
    assert report["algorithm"] == algorithm and report["scenario"] == "tap-bench-mini" and report["rounds"] == 2
    kinds = {t["kind"] for t in report["tasks"]}
    assert kinds == {"classification", "image_generation", "text_generation"}
    for task in report["tasks"]:
        assert set(task) >= {"silo", "task", "kind", "metrics", "primary"}
    by_kind = {t["kind"]: t["metrics"] for t in report["tasks"]}
    assert {"exact_match", "token_accuracy"} <= set(by_kind["text_generation"])
    assert {"mse", "psnr", "r2"} <= set(by_kind["image_generation"])
    assert "mean over silos" in output and "accuracy=" in output
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    if algorithm == "local":
        assert report["wire"] == {"bytes_down": 0, "bytes_up": 0, "dtype": "fp32"}
    else:
        # wire: trainable bytes of each selected silo's components, down and up, every round (+ the final model)
        per_silo = report["trainable_bytes"]
        assert report["wire"]["bytes_up"] == 2 * sum(per_silo.values())
        assert report["wire"]["bytes_down"] == 3 * sum(per_silo.values())


def test_bf16_wire_halves_the_bytes(tmp_path):
    fp32, _ = simulate(tmp_path, "--algorithm", "fedavg")
    bf16, _ = simulate(tmp_path, "--algorithm", "fedavg", "--wire-dtype", "bf16")
    assert bf16["wire"]["bytes_up"] * 2 == fp32["wire"]["bytes_up"]
    assert bf16["tasks"] != fp32["tasks"]  # the rounding really happened


def test_bad_scenario_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["simulate", "--scenario", str(tmp_path / "missing.yaml"), "--no-progress"])
    assert result.exit_code == 2
    assert "missing.yaml: file not found" in result.output
