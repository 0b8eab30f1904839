"""TAP against the baselines on one scenario, several seeds: a mean ± std table and a plot.

    python bench/compare_algorithms.py --scenario tap-bench-mini --seeds 0 1 2 --rounds 5 --out bench/results/mini
    python bench/compare_algorithms.py --model tiny --rounds 2 --local-steps 2 --ft-steps 2 --kd-steps 2  # smoke

Every run goes through ``tap simulate``'s code (the same server logic, silos and
data); runs in parallel processes (``--jobs``, one torch thread each, so results
are identical to sequential runs). Prints, per algorithm, the mean over seeds of
the mean-over-silos primary score, then per task; writes every report, a
summary JSON and ``comparison.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ALGORITHMS = ["tap", "tap-nokd", "fedavg", "fedavg-ft", "local"]


def run_one(args: dict[str, Any]) -> dict[str, Any]:
    from tap_core.runtime import configure_logging
    from tap_cli.options import config_from_options
    from tap_cli.simulate import run_simulation

    configure_logging("error")
    scenario, config = config_from_options(args)
    return run_simulation(scenario, config)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name in dict.fromkeys(r["algorithm"] for r in reports):
        runs = [r for r in reports if r["algorithm"] == name]
        tasks: dict[str, list[float]] = {}
        for r in runs:
            for task, info in r["per_task"].items():
                tasks.setdefault(task, []).append(info["mean_primary"])
        table[name] = {
            "mean_primary": mean_std([r["mean_primary"] for r in runs]),
            "tasks": {t: mean_std(v) for t, v in sorted(tasks.items())},
            "seeds": [r["seed"] for r in runs],
            "replacements": statistics.mean(sum(sum(c.values()) for c in r["replacements"].values()) for r in runs),
            "wire_mb": statistics.mean((r["wire"]["bytes_down"] + r["wire"]["bytes_up"]) / 1e6 for r in runs),
            "seconds": statistics.mean(r["timing"].get("total_seconds", 0.0) for r in runs),
        }
    return table


def print_table(table: dict[str, Any]) -> None:
    tasks = sorted({t for row in table.values() for t in row["tasks"]})
    header = f"{'algorithm':<10} {'mean over silos':>17} " + " ".join(f"{t:>15}" for t in tasks) + \
             f" {'repl.':>6} {'wire MB':>8} {'s/run':>6}"
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        m, s = row["mean_primary"]
        cells = " ".join(f"{row['tasks'][t][0]:>8.3f} ± {row['tasks'][t][1]:.3f}" if t in row["tasks"] else f"{'-':>15}"
                         for t in tasks)
        print(f"{name:<10} {m:>9.3f} ± {s:.3f} {cells} {row['replacements']:>6.1f} {row['wire_mb']:>8.1f} "
              f"{row['seconds']:>6.0f}")


def plot(table: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for row in table.values() for t in row["tasks"]})
    names = list(table)
    groups = ["mean over silos", *tasks]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(groups), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        row = table[name]
        means = [row["mean_primary"][0]] + [row["tasks"].get(t, (float("nan"), 0))[0] for t in tasks]
        stds = [row["mean_primary"][1]] + [row["tasks"].get(t, (0, 0))[1] for t in tasks]
        ax.bar([g + i * width for g in range(len(groups))], means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("primary score (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="tap-bench-mini")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--peak-lr", type=float, default=None)
    parser.add_argument("--ft-steps", type=int, default=None)
    parser.add_argument("--kd-steps", type=int, default=None)
    parser.add_argument("--kd-weight", type=float, default=None, help="one KD weight for every task (0: no KD term)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/compare"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for algorithm in args.algorithms:
        for seed in args.seeds:
            runs.append(dict(scenario=args.scenario, algorithm=algorithm, rounds=args.rounds, seed=seed, model=args.model,
                             clients_per_round=None, local_steps=args.local_steps, batch_size=args.batch_size,
                             grad_accum=None, peak_lr=args.peak_lr, min_lr=None, replacement=None, margin=None,
                             ft_steps=args.ft_steps, kd_steps=args.kd_steps, kd_temperature=None, kd_weight=args.kd_weight,
                             device=args.device,
                             threads=None, wire_dtype=None))
    reports = []
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, r): r for r in runs}
        for done, future in enumerate(as_completed(futures), 1):
            spec = futures[future]
            report = future.result()
            reports.append(report)
            (args.out / f"{spec['algorithm']}-seed{spec['seed']}.json").write_text(json.dumps(report, indent=2))
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(runs) - done)
            print(f"[{done}/{len(runs)}] {spec['algorithm']} seed {spec['seed']}: mean primary "
                  f"{report['mean_primary']:.4f} ({elapsed:.0f}s elapsed, ETA {eta:.0f}s)", file=sys.stderr, flush=True)
    order = {a: i for i, a in enumerate(args.algorithms)}
    reports.sort(key=lambda r: (order[r["algorithm"]], r["seed"]))
    table = summarise(reports)
    print_table(table)
    (args.out / "summary.json").write_text(json.dumps(table, indent=2))
    plot(table, args.out / "comparison.png", f"{args.scenario}: {args.rounds} rounds, seeds {args.seeds}")
    print(f"reports, summary.json and comparison.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
