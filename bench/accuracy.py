"""The accuracy study: every algorithm over several seeds on the same system, data, model and budget.

    python bench/accuracy.py --quick                                   # minutes on 2 CPU cores
    python bench/accuracy.py --json bench/results/accuracy/mini.json   # the study in docs/results.md
    python bench/accuracy.py --scenario tap-bench --device cuda        # the 30-silo benchmark (GPU)

Each (algorithm, seed) run goes through ``tap simulate``'s code (the same
federation logic, silos, data and evaluation as a deployed run), in parallel
processes (``--jobs``; each with the federation's fixed thread count, so results
equal sequential runs). Every algorithm gets the same stage-2 budget
(``--stage2-steps`` sets ``ft_steps`` = ``kd_steps``), so tap, tap-nokd,
fedavg-ft and local give each task the same optimizer steps; plain FedAvg ends
with the global model by definition (no stage 2). Every run scores each silo's
model on its test split after each round (``train.eval_every_round``) for the
learning curves.

Prints per algorithm the mean ± std over seeds of the mean-over-silos primary
score and of each task's score, beside each task's trivial baseline (majority
class, question-only answer, mean image); the steps per silo; replacements; wire
MB; and, against TAP, the paired per-seed difference of every other algorithm
with how many seeds TAP won. Writes every report, ``accuracy.json`` (``--json``)
and three plots: scores per algorithm, score against round, replacements per
task and round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ALGORITHMS = ["tap", "tap-nokd", "fedavg", "fedavg-ft", "local"]
REFERENCE = "tap"


# ---------------------------------------------------------------------------- running


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One (algorithm, seed) federation through tap simulate's code path; returns its report."""
    from tap_cli.options import config_from_options
    from tap_cli.simulate import run_simulation
    from tap_core.runtime import configure_logging

    configure_logging("error")
    scenario, config = config_from_options(spec)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, eval_every_round=True))
    return run_simulation(scenario, config)


def run_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = []
    for seed in args.seeds:
        for algorithm in args.algorithms:
            specs.append(
                dict(
                    scenario=args.scenario,
                    algorithm=algorithm,
                    rounds=args.rounds,
                    seed=seed,
                    model=args.model,
                    clients_per_round=args.clients_per_round,
                    local_steps=args.local_steps,
                    batch_size=args.batch_size,
                    grad_accum=None,
                    peak_lr=args.peak_lr,
                    min_lr=None,
                    replacement=None,
                    margin=None,
                    ft_steps=args.stage2_steps,
                    kd_steps=args.stage2_steps,
                    kd_temperature=None,
                    kd_weight=None,
                    device=args.device,
                    threads=args.threads,
                    wire_dtype=None,
                )
            )
    return specs


def run_all(specs: list[dict[str, Any]], jobs: int, out: Path) -> list[dict[str, Any]]:
    """Run every spec (reusing reports already in ``out`` from an interrupted study), with progress and ETA."""
    reports, todo = [], []
    for spec in specs:
        path = out / f"{spec['algorithm']}-seed{spec['seed']}.json"
        cached = json.loads(path.read_text()) if path.is_file() else None
        if (
            cached is not None
            and cached.get("config", {}).get("train", {}).get("eval_every_round")
            and _same_run(cached, spec)
        ):
            reports.append(cached)
        else:
            todo.append(spec)
    if reports:
        print(f"reusing {len(reports)} finished runs from {out}", file=sys.stderr)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_one, spec): spec for spec in todo}
        for done, future in enumerate(as_completed(futures), 1):
            spec = futures[future]
            report = future.result()
            reports.append(report)
            (out / f"{spec['algorithm']}-seed{spec['seed']}.json").write_text(json.dumps(report, indent=2))
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(todo) - done)
            print(
                f"[{done}/{len(todo)}] {spec['algorithm']} seed {spec['seed']}: mean primary "
                f"{report['mean_primary']:.4f} ({elapsed / 60:.1f} min elapsed, ETA {eta / 60:.1f} min)",
                file=sys.stderr,
                flush=True,
            )
    return reports


def _same_run(report: dict[str, Any], spec: dict[str, Any]) -> bool:
    config = report["config"]
    train = config["train"]
    wanted = {"rounds": spec["rounds"], "seed": spec["seed"], "algorithm": spec["algorithm"]}
    if any(config[k] != v for k, v in wanted.items()) or report["scenario"] != _scenario_name(spec["scenario"]):
        return False
    for key, option in (
        ("local_steps", "local_steps"),
        ("ft_steps", "ft_steps"),
        ("kd_steps", "kd_steps"),
        ("batch_size", "batch_size"),
        ("peak_lr", "peak_lr"),
    ):
        if spec[option] is not None and train[key] != spec[option]:
            return False
    return spec["model"] is None or config["model"]["size"] in spec["model"]


def _scenario_name(scenario: str) -> str:
    return Path(scenario).stem if scenario.endswith((".yaml", ".yml")) else scenario


# ---------------------------------------------------------------------------- summarising


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def result_row(report: dict[str, Any]) -> dict[str, Any]:
    """One run, as the study's JSON lists it."""
    by_task: dict[str, list[float]] = {}
    for task in report["tasks"]:
        by_task.setdefault(task["task"], []).append(task["primary"])
    steps = sorted({task["steps"] for task in report["tasks"]})
    return {
        "algorithm": report["algorithm"],
        "seed": report["seed"],
        "mean_primary": report["mean_primary"],
        "steps_per_silo": steps[0] if len(steps) == 1 else steps,
        "by_task": {name: statistics.mean(values) for name, values in sorted(by_task.items())},
        "replacements": sum(sum(c.values()) for c in report["replacements"].values()),
        "wire_mb": (report["wire"]["bytes_down"] + report["wire"]["bytes_up"]) / 1e6,
        "seconds": report["timing"].get("total_seconds"),
    }


def baselines(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Each task's trivial baseline, averaged over the silos holding it (identical in every run: data is fixed)."""
    per_task: dict[str, list[float]] = {}
    for task in reports[0]["tasks"]:
        per_task.setdefault(task["task"], []).append(task["baseline"])
    return {name: statistics.mean(values) for name, values in sorted(per_task.items())}


def summarise(rows: list[dict[str, Any]], algorithms: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in algorithms:
        runs = [r for r in rows if r["algorithm"] == name]
        if not runs:
            continue
        mean, std = mean_std([r["mean_primary"] for r in runs])
        tasks = sorted({t for r in runs for t in r["by_task"]})
        summary[name] = {
            "mean": mean,
            "std": std,
            "seeds": [r["seed"] for r in runs],
            "by_task": {t: dict(zip(("mean", "std"), mean_std([r["by_task"][t] for r in runs]))) for t in tasks},
            "steps_per_silo": runs[0]["steps_per_silo"],
            "replacements": statistics.mean(r["replacements"] for r in runs),
            "wire_mb": statistics.mean(r["wire_mb"] for r in runs),
        }
    return summary


def paired_against(rows: list[dict[str, Any]], reference: str, other: str) -> dict[str, Any] | None:
    """reference − other per seed (same seed: same data order for both): mean, std, t and seeds won."""
    ref = {r["seed"]: r["mean_primary"] for r in rows if r["algorithm"] == reference}
    oth = {r["seed"]: r["mean_primary"] for r in rows if r["algorithm"] == other}
    seeds = sorted(set(ref) & set(oth))
    if not seeds:
        return None
    diffs = [ref[s] - oth[s] for s in seeds]
    mean, std = mean_std(diffs)
    t = mean / max(std / math.sqrt(len(diffs)), 1e-12) if mean else 0.0
    return {"mean_difference": mean, "std": std, "t": t, "seeds_won": sum(d > 0 for d in diffs), "seeds": len(seeds)}


def curves(reports: list[dict[str, Any]]) -> dict[str, dict[int, tuple[float, float]]]:
    """Per algorithm: the mean-over-silos test score after each round (mean ± std over seeds), final included."""
    per_run: dict[str, dict[int, list[float]]] = {}
    for report in reports:
        points: dict[int, list[float]] = {}
        for record in report["history"]:
            for entry in record.get("scores", {}).values():
                points.setdefault(entry["round"], []).append(statistics.mean(entry["primary"].values()))
        points[report["rounds"] + 1] = [report["mean_primary"]]  # after stage 2
        for round_index, values in points.items():
            per_run.setdefault(report["algorithm"], {}).setdefault(round_index, []).append(statistics.mean(values))
    return {name: {r: mean_std(v) for r, v in sorted(points.items())} for name, points in per_run.items()}


def replacements_by_task_and_round(reports: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """TAP's replacement events per task and round, averaged over seeds."""
    runs = [r for r in reports if r["algorithm"] == REFERENCE]
    counts: dict[str, dict[int, float]] = {}
    for report in runs:
        for record in report["history"]:
            for tasks in record.get("replacements", {}).values():
                for task in tasks:
                    counts.setdefault(task, {}).setdefault(record["round"], 0.0)
                    counts[task][record["round"]] += 1 / len(runs)
    return counts


# ---------------------------------------------------------------------------- output


def print_tables(summary: dict[str, Any], base: dict[str, float], rows: list[dict[str, Any]]) -> None:
    tasks = list(base)
    header = (
        f"{'algorithm':<10} {'mean over silos':>15} "
        + " ".join(f"{t:>15}" for t in tasks)
        + f" {'steps':>6} {'repl.':>6} {'wire MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, row in summary.items():
        cells = " ".join(f"{row['by_task'][t]['mean']:>7.3f} ± {row['by_task'][t]['std']:.3f}" for t in tasks)
        steps = row["steps_per_silo"]
        print(
            f"{name:<10} {row['mean']:>7.3f} ± {row['std']:.3f} {cells} {str(steps):>6} "
            f"{row['replacements']:>6.1f} {row['wire_mb']:>8.1f}"
        )
    cells = " ".join(f"{base[t]:>15.3f}" for t in tasks)
    print(f"{'baseline':<10} {'':>15} {cells}   (trivial predictor on the same test split)")
    if REFERENCE in summary:
        print(f"\n{REFERENCE} minus each algorithm, paired by seed (mean-over-silos primary):")
        for name in summary:
            if name == REFERENCE:
                continue
            paired = paired_against(rows, REFERENCE, name)
            if paired:
                t = f"{paired['t']:+.1f}" if abs(paired["t"]) < 1e3 else ("≫ 0" if paired["t"] > 0 else "≪ 0")
                print(
                    f"  vs {name:<10} {paired['mean_difference']:+.4f} ± {paired['std']:.4f}  t = {t}"
                    f"  {REFERENCE} better on {paired['seeds_won']}/{paired['seeds']} seeds"
                )


def plot(
    summary: dict[str, Any],
    base: dict[str, float],
    curve: dict[str, Any],
    replaced: dict[str, Any],
    out: Path,
    title: str,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = list(base)
    groups = ["mean over silos", *tasks]
    names = list(summary)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(groups), 4.8))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        row = summary[name]
        means = [row["mean"]] + [row["by_task"][t]["mean"] for t in tasks]
        stds = [row["std"]] + [row["by_task"][t]["std"] for t in tasks]
        ax.bar([g + i * width for g in range(len(groups))], means, width, yerr=stds, capsize=3, label=name)
    for g, task in enumerate(tasks, start=1):
        ax.hlines(
            base[task],
            g - 0.05,
            g + 0.85,
            colors="black",
            linestyles="--",
            linewidth=1.5,
            label="trivial baseline" if g == 1 else None,
        )
    ax.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("primary score (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    paths.append(out / "scores.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curve.items():
        xs = list(points)
        ax.errorbar(xs, [points[x][0] for x in xs], yerr=[points[x][1] for x in xs], marker="o", capsize=3, label=name)
    if curve:
        last = max(max(points) for points in curve.values())
        ax.set_xticks(range(0, last + 1), [*map(str, range(0, last)), "final"])
    ax.set_xlabel("rounds completed (final: after stage 2)")
    ax.set_ylabel("mean-over-silos test score")
    ax.set_title("score against round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "rounds.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rounds = sorted({r for per_round in replaced.values() for r in per_round})
    width = 0.8 / max(len(replaced), 1)
    for i, (task, per_round) in enumerate(sorted(replaced.items())):
        ax.bar([r + i * width for r in rounds], [per_round.get(r, 0.0) for r in rounds], width, label=task)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{REFERENCE}: replacement events (mean over seeds)")
    ax.set_title("adaptive replacements per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "replacements.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def device_name(device: str | None) -> str:
    import torch

    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="tap-bench-mini", help="built-in scenario or YAML path")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="default: the scenario's study budget (its study: block, else its rounds) (--quick: 2)",
    )
    parser.add_argument("--local-steps", type=int, default=None, help="E (default: the scenario's study budget)")
    parser.add_argument(
        "--stage2-steps",
        type=int,
        default=None,
        help="ft_steps = kd_steps: the same stage-2 budget for every algorithm (default: the scenario's study budget)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the scenario's study budget")
    parser.add_argument("--peak-lr", type=float, default=None)
    parser.add_argument("--clients-per-round", type=int, default=None)
    parser.add_argument("--model", default=None, help="model preset (default: the scenario's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: cores / threads)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, 2 seeds: a few minutes")
    parser.add_argument("--out", type=Path, default=None, help="folder for reports and plots")
    parser.add_argument("--json", type=Path, default=None, help="write the study's JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.model = args.model or "tiny"
        args.rounds = args.rounds or 2
        args.local_steps = args.local_steps or 4
        args.stage2_steps = args.stage2_steps if args.stage2_steps is not None else 4
        args.seeds = args.seeds if args.seeds != [0, 1, 2] else [0, 1]
    budget = study_budget(args.scenario)  # what the command line leaves open
    args.rounds = args.rounds or budget.rounds
    args.local_steps = args.local_steps or budget.local_steps
    args.batch_size = args.batch_size or budget.batch_size
    if args.stage2_steps is None:
        args.stage2_steps = budget.stage2_steps
    out = args.out or Path("bench/results/accuracy") / (
        ("quick-" if args.quick else "") + _scenario_name(args.scenario)
    )
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // (args.threads or 1))

    specs = run_specs(args)
    print(
        f"{len(specs)} runs ({', '.join(args.algorithms)} x seeds {args.seeds}) on {args.scenario}, "
        f"{args.rounds} rounds, {jobs} at a time",
        file=sys.stderr,
    )
    reports = run_all(specs, jobs, out)
    order = {a: i for i, a in enumerate(args.algorithms)}
    reports.sort(key=lambda r: (order[r["algorithm"]], r["seed"]))
    rows = [result_row(r) for r in reports]
    summary = summarise(rows, args.algorithms)
    base = baselines(reports)
    print_tables(summary, base, rows)
    study = {
        "results": rows,
        "summary": summary,
        "baselines": base,
        "paired": {name: paired_against(rows, REFERENCE, name) for name in summary if name != REFERENCE},
        "curves": {name: {str(r): v for r, v in points.items()} for name, points in curves(reports).items()},
        "replacements_by_task_and_round": replacements_by_task_and_round(reports),
        "setup": {
            "scenario": args.scenario,
            "rounds": args.rounds,
            "seeds": args.seeds,
            "config": reports[0]["config"],
            "device": device_name(args.device),
            "test_examples": test_sizes(reports[0]),
        },
    }
    title = f"{args.scenario}: {args.rounds} rounds, {len(args.seeds)} seeds"
    paths = plot(summary, base, curves(reports), replacements_by_task_and_round(reports), out, title)
    json_path = args.json or out / "accuracy.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(study, indent=2))
    print(f"\nreports in {out}; {json_path}; plots: {', '.join(str(p) for p in paths)}")
    return 0


def test_sizes(report: dict[str, Any]) -> dict[str, int]:
    return {f"{t['silo']}/{t['task']}": t.get("test_examples", 0) for t in report["tasks"]}


def study_budget(scenario: str):
    """The scenario's ``study:`` budget, or (without one) its own rounds and train settings."""
    from tap_core.config import StudyBudget
    from tap_core.scenario import load_scenario

    loaded = load_scenario(scenario)
    if loaded.study is not None:
        return loaded.study
    train = loaded.train
    return StudyBudget(loaded.rounds, train.local_steps, train.batch_size, train.kd_steps)


if __name__ == "__main__":
    sys.exit(main())
