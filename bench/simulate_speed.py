"""End-to-end wall time of ``tap simulate``: sequential against parallel silo workers, and against another version.

    python bench/simulate_speed.py --workers 1 2 --compare main --seeds 0 1 2 --json out.json
    python bench/simulate_speed.py --workers 1 2 --seeds 0 -- --model tiny --rounds 2 --local-steps 2   # smoke

Each run is a whole ``tap simulate`` process (``--scenario``, default the README's
``tap-bench-mini`` at its default budget, plus whatever follows ``--``), one per
(seed, version, worker count), the configurations taking turns seed by seed so
that drift in the machine's load hits them alike. ``--compare REF`` adds the code
of REF (git ref or directory; run as it is, without ``--workers`` if it has no such
option). Prints per configuration the wall and CPU seconds (median, min-max) and
the mean primary score per seed, and checks that every worker count of this tree
gave the same report apart from ``timing``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from train_speed import REPO, checkout, remove_checkout, spread


def has_workers_option(tree: Path) -> bool:
    return "--workers" in (tree / "tap_cli" / "cli.py").read_text()


def run_once(tree: Path, workers: int | None, seed: int, scenario: str, extra: list[str], out: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "tap_cli.cli",
        "simulate",
        "--scenario",
        scenario,
        "--seed",
        str(seed),
        "--no-progress",
        "--report",
        str(out),
        *extra,
    ]
    if workers is not None:
        command += ["--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"tap simulate failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    report = json.loads(out.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "mean_primary": report["mean_primary"], "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="tap-bench-mini")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts of this tree")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--compare", metavar="REF", default=None, help="also run the code of REF (git ref or directory)"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("extra", nargs="*", help="more tap simulate options, after --")
    args = parser.parse_args()

    configs: list[tuple[str, Path, int | None]] = [(f"workers={n}", REPO, n) for n in args.workers]
    holder, ref_tree = None, None
    if args.compare:
        ref_tree, holder = checkout(args.compare)
        workers = 1 if has_workers_option(ref_tree) else None
        configs.insert(0, (f"{args.compare} (sequential)", ref_tree, workers))
    runs: list[dict[str, Any]] = []
    total, started = len(configs) * len(args.seeds), time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for seed in args.seeds:
                order = configs if seed % 2 == 0 else configs[::-1]
                for label, tree, workers in order:
                    result = run_once(tree, workers, seed, args.scenario, args.extra, Path(scratch) / "report.json")
                    runs.append({"label": label, "seed": seed, **result})
                    elapsed = time.perf_counter() - started
                    print(
                        f"[{len(runs)}/{total}] seed {seed} {label}: {result['wall_s']:.1f} s wall, "
                        f"{result['cpu_s']:.1f} s CPU, mean primary {result['mean_primary']:.4f} "
                        f"(elapsed {elapsed:.0f}s, eta {elapsed / len(runs) * (total - len(runs)):.0f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if ref_tree is not None:
            remove_checkout(ref_tree, holder)

    same = True
    for seed in args.seeds:
        mine = [
            {k: v for k, v in r["report"].items() if k != "timing"}
            for r in runs
            if r["seed"] == seed and r["label"].startswith("workers=")
        ]
        same &= all(report == mine[0] for report in mine)
    print(f"tap simulate --scenario {args.scenario} {' '.join(args.extra)}; seeds {args.seeds}; median (min-max)")
    print("| version | wall s | CPU s | mean primary per seed |")
    print("|---|---|---|---|")
    summary = {}
    for label, _, _ in configs:
        mine = [r for r in runs if r["label"] == label]
        wall, cpu = spread([r["wall_s"] for r in mine]), spread([r["cpu_s"] for r in mine])
        primary = {r["seed"]: r["mean_primary"] for r in mine}
        summary[label] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "mean_primary": primary,
            "mean_over_seeds": statistics.mean(primary.values()),
        }
        print(
            f"| {label} | {wall['median']:.1f} ({wall['min']:.1f}-{wall['max']:.1f}) | "
            f"{cpu['median']:.1f} ({cpu['min']:.1f}-{cpu['max']:.1f}) | "
            + ", ".join(f"{s}: {p:.4f}" for s, p in primary.items())
            + " |"
        )
    print(f"reports of every worker count identical apart from timing: {same}")
    if args.json:
        for run in runs:
            run["report"] = {k: run["report"][k] for k in ("mean_primary", "tasks", "timing") if k in run["report"]}
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "summary": summary, "identical": same, "runs": runs}, indent=2)
        )
    if not same:
        raise SystemExit("worker counts gave different reports")


if __name__ == "__main__":
    main()
