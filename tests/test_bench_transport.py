"""bench/transport.py: a real tap-server and two tap-client processes move a synthetic model, beside raw gRPC.

One round of 2 MB keeps it short; what it proves is that the bench measures what the docs quote:
the rows and keys of the JSON the issue spells out, both directions through the real daemon and
agents (the payload is K x the model), and the raw twin in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tap_testing.synthetic import synthetic_layout, synthetic_values

REPO = Path(__file__).resolve().parent.parent


def test_synthetic_layout_spreads_the_megabytes_over_the_components():
    layout = synthetic_layout(["a", "b", "c"], 10)
    assert list(layout) == ["a", "b", "c"]
    elements = sum(torch.Size(shape).numel() for tensors in layout.values() for _, shape in tensors)
    assert abs(elements * 4 - 10e6) < 3 * 4 * 65  # within a few elements per component of 10 MB
    assert max(torch.Size(shape).numel() for tensors in layout.values() for _, shape in tensors) <= 512 * 512
    values = synthetic_values(layout, seed=1)
    assert all(tuple(values[c][n].shape) == tuple(s) for c, tensors in layout.items() for n, s in tensors)
    assert torch.equal(values["b"]["bias"], synthetic_values(layout, seed=1)["b"]["bias"])


@pytest.mark.slow
def test_one_round_through_the_real_server_and_agents_against_raw_grpc(tmp_path):
    out = tmp_path / "transport.json"
    command = [
        sys.executable,
        str(REPO / "bench" / "transport.py"),
        "--sizes",
        "2",
        "--clients",
        "2",
        "--scale-clients",
        "--rounds",
        "1",
        "--json",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["overhead_ratio"] is None  # --overhead not asked for
    rows = data["throughput"]
    assert [(r["mb"], r["clients"], r["direction"]) for r in rows] == [(2, 2, "down"), (2, 2, "up")]
    for row in rows:
        assert {"mb", "clients", "tap_mb_s", "raw_grpc_mb_s", "ratio", "server_peak_rss_mb"} <= set(row)
        assert row["tap_mb_s"] > 0 and row["raw_grpc_mb_s"] > 0
        assert row["ratio"] == pytest.approx(row["tap_mb_s"] / row["raw_grpc_mb_s"])
        assert row["server_peak_rss_mb"] > 0 and row["agent_peak_rss_mb"] > 0
    # both agents downloaded the whole synthetic model through tap-client, and uploaded it back to tap-server
    work = tmp_path / "work" / "mb2-k2"
    for silo in ("s00", "s01"):
        events = [json.loads(line) for line in (work / "events" / f"{silo}.jsonl").read_text().splitlines()]
        downloaded = next(e["bytes"] for e in events if e["event"] == "download_end")
        assert abs(downloaded - 2e6) < 2 * 4 * 65 * 8  # the plan's components, 2 MB between them
        assert any(e["event"] == "upload_end" and e["round"] == 1 for e in events)
    server = [json.loads(line) for line in (work / "events" / "server.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "submit_end" and e["round"] == 1 for e in server) == 2
    assert any(e["event"] == "round_closed" and e["round"] == 1 for e in server)
    assert "ratio" in done.stdout and "2   2 down" in done.stdout
