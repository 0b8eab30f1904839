"""bench/train_speed.py runs both columns and writes what the docs quote (tiny model, one step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_train_speed_measures_two_versions_and_their_speed_up(tmp_path):
    out = tmp_path / "speed.json"
    command = [
        sys.executable,
        str(REPO / "bench" / "train_speed.py"),
        "--presets",
        "tiny",
        "--tasks",
        "image_cls",
        "vqa",
        "--batch",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "2",
        "--train-examples",
        "8",
        "--eval-examples",
        "8",
        "--devices",
        "cpu",
        "--compare",
        str(REPO),
        "--json",
        str(out),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["labels"] == ["current", str(REPO)]
    assert [(r["task"], r["batch"]) for r in data["rows"]] == [("image_cls", 4), ("vqa", 4)]
    for row in data["rows"]:
        for label in data["labels"]:
            assert row[label]["steps_per_s"]["median"] > 0 and row[label]["eval_examples_per_s"]["median"] > 0
        assert set(row["speedup"]) >= {"steps_per_s", "eval_examples_per_s"}
    assert len(data["runs"]) == 2 * 2 * 2  # configurations x versions x repeats, taking turns
    assert "| tiny | vqa | 4 | train |" in done.stdout.replace("| cpu ", "")
