"""The demo's process launcher: forked processes behave like the subprocesses they replace."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tap_cli.launcher import Launcher


@pytest.fixture(scope="module")
def launcher():
    return Launcher()


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher_target", *args]


def test_a_forked_process_starts_with_the_model_stack_imported_and_logs_to_its_file(launcher, tmp_path):
    log = tmp_path / "target.log"
    process = launcher.start(command("--exit-code", "3"), log, {})
    assert process.wait(timeout=120) == 3 and process.returncode == 3 and process.poll() == 3
    assert log.read_text().strip() == "torch imported before main: True"


def test_a_forked_process_runs_with_the_environment_it_was_given(launcher, tmp_path):
    log = tmp_path / "env.log"
    process = launcher.start(command("--show-env", "TAP_PROBE"), log, {"TAP_PROBE": "given"})
    assert process.wait(timeout=120) == 0
    assert log.read_text().splitlines()[-1] == "TAP_PROBE=given"


def test_a_fresh_process_imports_for_itself(tmp_path):
    log = tmp_path / "target.log"
    process = Launcher(fresh=True).start(command(), log, {"PYTHONPATH": ":".join(sys.path)})
    assert process.wait(timeout=120) == 0
    assert log.read_text().strip() == "torch imported before main: False"


def test_a_cli_usage_error_is_the_exit_status_and_the_log(launcher, tmp_path):
    log = tmp_path / "client.log"
    process = launcher.start([sys.executable, "-m", "tap_client.cli", "run"], log, {})
    assert process.wait(timeout=120) == 2
    assert "Missing option '--kit'" in log.read_text()


def test_sigterm_and_wait_timeouts_behave_as_with_popen(launcher, tmp_path):
    process = launcher.start(command("--sleep", "60"), tmp_path / "sleeper.log", {})
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.5)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM
    process.kill()  # already gone: a no-op, as Popen.kill on a reaped process


def test_only_python_module_commands_can_be_forked(launcher, tmp_path):
    with pytest.raises(ValueError, match="python -m"):
        launcher.start(["/bin/true"], tmp_path / "x.log", {})
