"""Server peak memory during a round vs the number of clients (streaming aggregation keeps it flat).

    python bench/aggregation_memory.py --clients 2 8 32 64 --preset small

Each measurement runs in a fresh process: a Federation (the server's state
machine) with N silos holding the same two tasks, one round of N uploads of the
silos' full component sets (random values, validated and folded in one at a
time, as the servicer does), then the round closes. Prints the process's peak
RSS and the peak RSS above the state after start-up, per N. With one running sum
per component the growth is flat in N; an aggregator that kept every update would
grow by N x the update size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(clients: int, preset: str) -> None:
    import torch

    from tap_core.config import FederationConfig, ModelSpec, TaskSpec
    from tap_core.messages import ClientUpdate, RoundStats, SiloDeclaration
    from tap_core.model import build_backbone
    from tap_cli.compose import MODEL_PRESETS
    from tap_server.federation import Federation

    spec = ModelSpec(**MODEL_PRESETS[preset])
    config = FederationConfig(algorithm="fedavg", rounds=1, model=spec)
    fingerprint = build_backbone(spec).fingerprint
    tasks = (TaskSpec("cls", "classification", ("image",)), TaskSpec("vqa", "text_generation", ("image", "text")))
    federation = Federation(config, expected_silos=clients)
    for i in range(clients):
        federation.register(
            SiloDeclaration(f"s{i:03d}", tasks, {"cls": 100, "vqa": 100}, {"cls": ["a", "b"]}, fingerprint)
        )
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    update_bytes = 0
    started = time.perf_counter()
    for silo in federation.status().selected:
        values = federation.payload(silo, 1).values
        noisy = {c: {n: t + 0.01 * torch.randn_like(t) for n, t in ts.items()} for c, ts in values.items()}
        update_bytes = sum(t.numel() * 4 for ts in noisy.values() for t in ts.values())
        plan = federation.silo_plan(silo)
        weights = {c: float(sum(100 for t in plan.tasks if c in plan.task_components(t.name))) for c in noisy}
        federation.submit_update(
            ClientUpdate(silo, 1, noisy, weights, RoundStats(task_losses={"cls": 1.0, "vqa": 2.0}))
        )
        del noisy, values
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "clients": clients,
                "update_mb": update_bytes / 1e6,
                "baseline_mb": baseline / 1024,
                "peak_mb": peak / 1024,
                "round_growth_mb": (peak - baseline) / 1024,
                "seconds": seconds,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 8, 32, 64])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.preset)
        return
    print(
        f"{'clients':>7} {'update MB':>9} {'RSS after join MB':>17} {'peak RSS MB':>11} {'growth in round MB':>18} "
        f"{'round s':>8}   (preset {args.preset})"
    )
    for n in args.clients:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--preset", args.preset],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['clients']:>7} {r['update_mb']:>9.2f} {r['baseline_mb']:>17.0f} {r['peak_mb']:>11.0f} "
            f"{r['round_growth_mb']:>18.1f} {r['seconds']:>8.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
