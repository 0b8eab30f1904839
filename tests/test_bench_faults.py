"""bench/faults.py writes the report the issue spells out; here its fuzz section alone, at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_fuzz_section_alone_writes_the_issue_report(tmp_path):
    out = tmp_path / "fuzz.json"
    command = [
        sys.executable,
        str(REPO / "bench" / "faults.py"),
        "--only",
        "fuzz",
        "--fuzz-cases",
        "3",
        "--json",
        str(out),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"scenarios", "fuzz_cases", "crashes", "internal_errors", "aggregate_corruptions", "load_clients"} <= set(
        report
    )
    assert report["scenarios"] == [] and report["load_clients"] == 0
    assert report["fuzz_cases"] >= 3 and (report["crashes"], report["internal_errors"]) == (0, 0)
    assert report["aggregate_corruptions"] == 0
    assert "fuzz: " in done.stdout and "0 crashes" in done.stdout
