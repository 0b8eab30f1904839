"""bench/accuracy.py: the study's JSON, tables and curves are computed from real reports."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import synthetic_data, synthetic_silos, tiny_config
from tap_cli.simulate import run_federation
from tap_core.silo import SiloRuntime

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reports():
    out = []
    for algorithm in ("tap", "local"):
        for seed in (0, 1):
            config = tiny_config(algorithm, rounds=2, local_steps=2, ft_steps=2, kd_steps=2)
            config = dataclasses.replace(
                config, seed=seed, train=dataclasses.replace(config.train, eval_every_round=True)
            )
            silos = synthetic_silos()
            data = synthetic_data(silos)
            runtimes = {s.id: SiloRuntime(s, data[s.id], config, torch.device("cpu")) for s in silos}
            out.append(run_federation(runtimes, config))
    return out


def test_the_study_json_has_the_documented_keys_and_numbers_from_the_reports(reports):
    bench = load_bench()
    rows = [bench.result_row(r) for r in reports]
    assert set(rows[0]) >= {"algorithm", "seed", "mean_primary", "steps_per_silo", "by_task"}
    assert {row["steps_per_silo"] for row in rows} == {2 * 2 + 2}
    summary = bench.summarise(rows, ["tap", "local"])
    tap_scores = [r["mean_primary"] for r in reports if r["algorithm"] == "tap"]
    assert summary["tap"]["mean"] == pytest.approx(sum(tap_scores) / 2)
    assert summary["tap"]["std"] == pytest.approx(abs(tap_scores[0] - tap_scores[1]) / 2**0.5)
    baselines = bench.baselines(reports)
    assert set(baselines) == {"colour", "vqa", "recon", "caption"}
    paired = bench.paired_against(rows, "tap", "local")
    local_scores = [r["mean_primary"] for r in reports if r["algorithm"] == "local"]
    assert paired["mean_difference"] == pytest.approx(sum(tap_scores) / 2 - sum(local_scores) / 2)
    assert paired["seeds"] == 2


def test_learning_curves_have_a_point_per_round_and_end_with_the_final_score(reports):
    bench = load_bench()
    curve = bench.curves(reports)
    assert sorted(curve["tap"]) == [1, 2, 3]  # after rounds 1 and 2, then after stage 2
    tap_final = [r["mean_primary"] for r in reports if r["algorithm"] == "tap"]
    assert curve["tap"][3][0] == pytest.approx(sum(tap_final) / 2)
    for report in reports:  # every selected silo scored its model after every round
        assert all(set(record["scores"]) == set(record["received"]) for record in report["history"])
    replaced = bench.replacements_by_task_and_round(reports)
    assert replaced and all(per_round.get(1) == 1.0 for task, per_round in replaced.items() if task != "colour")
