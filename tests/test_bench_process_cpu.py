"""bench/process_cpu.py counts the CPU of processes that /usr/bin/time cannot see (forked grandchildren)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "process_cpu.py"


def test_the_cpu_of_a_grandchild_is_counted(tmp_path):
    script = tmp_path / "tree.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "depth = int(sys.argv[1])\n"
        "if depth < 2:\n"
        "    subprocess.run([sys.executable, __file__, str(depth + 1)], check=True)\n"
        "else:\n"
        "    end = time.process_time() + 1.5\n"
        "    while time.process_time() < end:\n"
        "        pass\n"
    )
    out = tmp_path / "cpu.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--every", "0.1", "--json", str(out), "--", sys.executable, str(script), "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert len(result["processes"]) == 3
    assert 1.2 <= result["cpu_s"] <= result["wall_s"] * 2 + 0.5
    burner = max(result["processes"], key=lambda p: p["cpu_s"])
    assert burner["cpu_s"] >= 1.2 and burner["name"].endswith("tree.py 2")
    assert "CPU" in done.stdout
