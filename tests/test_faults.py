"""Faults survived (issue 9): processes SIGKILLed at every phase, a bad network, a full or read-only state volume,
a silo that dies for good, many silos at once. Each test runs a scenario of tap_testing and asserts its verdict;
the scenario compares against an uninterrupted run (or the exactly known aggregate) and says what differed.

Servers and agents are real processes on 127.0.0.1, free ports, tiny model and data; agents' backoff is capped at
2 s (TAP_FAULT_MAX_RETRY_DELAY_S) so a restarted server is found at once. ``bench/faults.py`` runs the same
scenarios (with the real backoff) and the 64-silo load.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tap_testing import faults
from tap_testing.cluster import Cluster, reference_run
from tap_testing.dropout import vanished_silo
from tap_testing.fault_scenarios import (
    SERVER_CHAIN,
    agent_disk_full,
    agent_kills,
    network_faults,
    server_kills,
    silent_training,
    state_volume_fault,
    unwritable_state_dir,
)
from tap_testing.load import load_run

RETRY_S = 2.0
AGENT_VICTIMS = {"alpha": "train:1", "beta": "upload_frame:2"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The faults' federation, uninterrupted (every scenario's cluster has the same config and data)."""
    root = tmp_path_factory.mktemp("reference")
    return reference_run(Cluster.create(root / "cluster"), root / "state")


def _held(outcome) -> None:
    assert outcome.passed, f"{outcome.name}: {outcome.detail}"


def test_every_kill_point_is_exercised_and_unknown_ones_refused():
    used = {spec.split(":")[0] for spec in [*SERVER_CHAIN, *AGENT_VICTIMS.values()]}
    assert used == set(faults.POINTS)  # the two tests below fire each point and check it fired
    assert faults.parse_point("upload:3") == ("upload", 3)
    with pytest.raises(ValueError, match="unknown point 'uplaod'"):
        faults.parse_point("uplaod:1")
    with pytest.raises(ValueError, match=">= 1"):
        faults.parse_point("upload:0")


def test_environment_knobs_last_for_the_whole_process(tmp_path):
    """TAP_FAULT_DISK_FULL and TAP_FAULT_MAX_RETRY_DELAY_S are still in force after start-up (garbage collected)."""
    script = (
        f"import gc; from pathlib import Path; from tap_testing import faults\n"
        f"faults.install_from_environment(); gc.collect()\n"
        f"import tap_client.connection as c; from tap_core.atomic_files import atomic_write_json as w\n"
        f"w(Path({str(tmp_path / 'a.json')!r}), 1)\n"
        f"try:\n    w(Path({str(tmp_path / 'b.json')!r}), 2)\nexcept OSError as e:\n    print('refused', e.errno)\n"
        f"print('delay', c.MAX_RETRY_DELAY_S)"
    )
    env = {**os.environ, "TAP_FAULT_DISK_FULL": "2", "TAP_FAULT_MAX_RETRY_DELAY_S": "1.5"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["refused", "28", "delay", "1.5"]
    assert (tmp_path / "a.json").is_file() and not (tmp_path / "b.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


@pytest.mark.slow
def test_server_sigkill_at_every_phase_resumes_to_the_same_result(tmp_path, reference):
    outcome = server_kills(tmp_path, SERVER_CHAIN, reference, retry_s=RETRY_S)
    _held(outcome)
    assert outcome.numbers["server_starts"] == len(SERVER_CHAIN) + 1
    assert outcome.numbers["model_max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_agent_sigkill_mid_training_and_mid_upload(tmp_path, reference):
    outcome = agent_kills(tmp_path, AGENT_VICTIMS, reference, retry_s=RETRY_S)
    _held(outcome)


@pytest.mark.slow
def test_network_drops_cuts_partition_stall_latency_slow_link(tmp_path, reference):
    outcome = network_faults(tmp_path, reference, retry_s=RETRY_S)
    _held(outcome)
    proxy = outcome.numbers["proxy"]
    assert proxy["dropped"] >= 3 and proxy["cut"] >= 2 and proxy["refused"] + outcome.numbers["reset_by_partition"] >= 1


@pytest.mark.slow
def test_silent_local_training_keeps_connections(tmp_path, reference):
    outcome = silent_training(tmp_path, train_sleep_s=6.0, idle_timeout_s=2.5, reference=reference, retry_s=RETRY_S)
    _held(outcome)


@pytest.mark.slow
def test_agent_state_dir_full_is_a_clear_error_and_a_restart_resumes(tmp_path, reference):
    _held(agent_disk_full(tmp_path, reference=reference, retry_s=RETRY_S))


@pytest.mark.parametrize("kind", ["full", "read_only"])
@pytest.mark.parametrize("real", [False, None], ids=["injected", "tmpfs-when-root"])
def test_state_volume_full_or_read_only(tmp_path, reference, kind, real):
    _held(state_volume_fault(tmp_path, kind, real=real, reference=reference))


def test_unwritable_state_dir_is_refused_at_start(tmp_path):
    _held(unwritable_state_dir(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("retry", [False, True], ids=["never-returns", "returns-late"])
def test_a_silo_that_dies_is_dropped_at_the_deadline(tmp_path, retry):
    outcome = vanished_silo(tmp_path, silos=4, rounds=2, round_s=4.0, retry=retry)
    _held(outcome)


@pytest.mark.slow
def test_many_silos_every_round_exact_and_memory_flat(tmp_path):
    outcome = load_run(tmp_path, silos=12, rounds=3)
    _held(outcome)
    assert outcome.numbers["aggregate_max_abs_error"] < 1e-5


@pytest.mark.slow
def test_honest_silos_finish_beside_a_poll_flood_and_a_stalled_upload(tmp_path):
    outcome = load_run(tmp_path, silos=6, rounds=2, attackers=True, round_s=5, flood_polls=60)
    _held(outcome)
