"""Silos in worker processes: bitwise the same report as one process, errors that keep their class and message."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tap_cli.compose import compose_config
from tap_cli.simulate import run_simulation
from tap_core.config import SiloSpec, TaskSpec
from tap_core.errors import DataError
from tap_core.scenario import load_scenario
from tap_core.silo_pool import assign, decode, default_workers, encode, silo_cost

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synthetic_scenario(tmp_path_factory):
    """Three silos with every task kind, as npz files (bench/synthetic_scenario.py)."""
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "synthetic_scenario.py"), "--out", str(out), "--examples", "48"],
        check=True,
        capture_output=True,
    )
    return load_scenario(str(out / "scenario.yaml"))


def config_for(scenario, algorithm: str):
    return compose_config(
        scenario,
        algorithm=algorithm,
        rounds=2,
        seed=3,
        train=dict(local_steps=2, ft_steps=2, kd_steps=2, batch_size=8, eval_batch_size=16),
    )


def without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timing"}


@pytest.mark.parametrize("algorithm", ["tap", "local"])
def test_two_workers_give_the_report_of_one_process(synthetic_scenario, algorithm):
    config = config_for(synthetic_scenario, algorithm)
    sequential = run_simulation(synthetic_scenario, config, workers=1)
    parallel = run_simulation(synthetic_scenario, config, workers=2)
    assert sequential["timing"]["workers"] == 1 and parallel["timing"]["workers"] == 2
    # every number — metrics, losses per round, replacements, wire bytes — bit for bit
    assert without_timing(parallel) == without_timing(sequential)
    assert parallel["tasks"] and parallel["history"]


def test_a_workers_data_error_reaches_the_caller_with_its_class_and_message(synthetic_scenario, tmp_path):
    broken = dataclasses.replace(
        synthetic_scenario.silos[1],
        tasks=tuple(
            dataclasses.replace(t, data={**t.data, "path": str(tmp_path / "missing.npz")})
            for t in synthetic_scenario.silos[1].tasks
        ),
    )
    scenario = dataclasses.replace(synthetic_scenario, silos=(synthetic_scenario.silos[0], broken))
    with pytest.raises(DataError, match="missing.npz: file not found|file not found: .*missing.npz"):
        run_simulation(scenario, config_for(scenario, "tap"), workers=2)


def test_component_values_cross_the_process_boundary_bit_for_bit():
    values = {
        "head.a": {"out.weight": torch.randn(3, 4), "out.bias": torch.randn(3)},
        "encoder.image": {"proj.weight": torch.randn(2, 2).to(torch.bfloat16)},
    }
    header, back = decode(encode({"cmd": "round", "round": 2}, values))
    assert header["cmd"] == "round" and header["round"] == 2
    assert back.keys() == values.keys()
    for component, tensors in values.items():
        for name, tensor in tensors.items():
            assert back[component][name].dtype == tensor.dtype and torch.equal(back[component][name], tensor)
    assert decode(encode({"cmd": "stop"}))[1] == {}


def test_assignment_is_sticky_complete_and_balanced():
    task = {m: TaskSpec(f"t{m}", "classification", m) for m in (("image",), ("text",), ("image", "text"))}
    silos = [
        SiloSpec("big", (task[("image", "text")], task[("image",)])),
        SiloSpec("a", (task[("image",)],)),
        SiloSpec("b", (task[("text",)],)),
        SiloSpec("c", (task[("image",)],)),
    ]
    groups = assign(silos, 2)
    assert sorted(s.id for g in groups for s in g) == ["a", "b", "big", "c"]
    assert sorted(sum(silo_cost(s) for s in g) for g in groups) == [5, 6]
    assert groups == assign(list(reversed(silos)), 2)  # depends on the silos, not on their order
    assert len(assign(silos, 8)) == 4  # never an idle worker


def test_default_workers_respects_threads_and_silos(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert default_workers(threads=1, silos=6) == 6
    assert default_workers(threads=2, silos=6) == 4
    assert default_workers(threads=16, silos=6) == 1


def test_a_worker_ends_when_its_driver_is_killed(tmp_path):
    """SIGKILL to the driver: its workers notice and exit instead of training on as orphans."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from tap_core.silo_pool import exit_with_parent\n"
        "def child(parent, watching):\n"
        "    exit_with_parent(parent, every_s=0.1)\n"
        "    watching.set()\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    watching = ctx.Event()\n"
        "    p = ctx.Process(target=child, args=(os.getpid(), watching))\n"
        "    p.start(); watching.wait(300)  # the spawned child imports torch first: seconds on a busy machine\n"
        "    print(p.pid, flush=True); time.sleep(60)\n"
    )
    driver = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    child = int(driver.stdout.readline())
    driver.kill()
    driver.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the worker outlived its driver")
