"""Results table and plots of a federation report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(report: dict[str, Any]) -> str:
    """Per-silo, per-task metrics beside each task's trivial baseline and step budget, plus the means."""
    header = f"{'silo':<16} {'task':<18} {'kind':<17} {'primary':>8} {'baseline':>8} {'steps':>6}  metrics"
    lines = [
        f"{report['algorithm']} on {report['scenario']} (seed {report['seed']}, {report['rounds']} rounds)",
        header,
        "-" * len(header),
    ]
    for t in report["tasks"]:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(t["metrics"].items()))
        lines.append(
            f"{t['silo']:<16} {t['task']:<18} {t['kind']:<17} {t['primary']:>8.4f} "
            f"{_fmt(t.get('baseline')):>8} {t.get('steps', '-'):>6}  {metrics}"
        )
    lines.append("-" * len(header))
    for name, info in report.get("per_task", {}).items():
        lines.append(
            f"{'mean':<16} {name:<18} {'':<17} {info['mean_primary']:>8.4f} "
            f"{_fmt(info.get('mean_baseline')):>8} {'':>6}  ({info['silos']} silos)"
        )
    lines.append(f"{'mean over silos':<53} {_fmt(report['mean_primary']):>8}")
    replacements = sum(sum(v.values()) for v in report.get("replacements", {}).values())
    wire = report.get("wire", {})
    lines.append(
        "baseline: the task's trivial predictor on the same test split (majority class, most frequent "
        "answer per question, mean image); steps: optimizer steps of the final model"
    )
    lines.append(
        f"replacements: {replacements}   wire: {wire.get('bytes_down', 0) / 1e6:.2f} MB down, "
        f"{wire.get('bytes_up', 0) / 1e6:.2f} MB up ({wire.get('dtype', 'fp32')})"
    )
    transport = report.get("transport")
    if transport:
        lines.append(
            f"transport: {transport['wire_bytes'] / 1e6:.2f} MB on the wire, framing overhead "
            f"{100 * transport['framing_overhead']:.2f}%, max per client-round "
            f"{_fmt(transport['max_ratio_per_client_round'], 3)} x trainable x2"
        )
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Per-task primary scores (per silo) and the mean training loss per round, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{t['silo']}\n{t['task']}" for t in report["tasks"]]
    names = sorted({t["task"] for t in report["tasks"]})
    palette = matplotlib.colormaps["tab10"]
    colours = {name: palette(i % 10) for i, name in enumerate(names)}
    left.bar(
        range(len(labels)), [t["primary"] for t in report["tasks"]], color=[colours[t["task"]] for t in report["tasks"]]
    )
    baselines = [(i, t["baseline"]) for i, t in enumerate(report["tasks"]) if t.get("baseline") is not None]
    if baselines:
        left.hlines(
            [b for _, b in baselines],
            [i - 0.4 for i, _ in baselines],
            [i + 0.4 for i, _ in baselines],
            colors="black",
            linewidth=2,
            label="trivial baseline",
        )
        left.legend(fontsize=7, loc="lower right")
    left.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    left.set_ylabel("primary score (higher is better)")
    left.set_title(f"{report['algorithm']}: per-task scores (mean {_fmt(report['mean_primary'], 3)})")
    if report["mean_primary"] is not None:
        left.axhline(report["mean_primary"], color="tab:red", linestyle="--", linewidth=1)
    history = report.get("history", [])
    tasks = sorted({t for h in history for t in h.get("task_losses", {})})
    for task in tasks:
        rounds = [h["round"] for h in history if task in h["task_losses"]]
        right.plot(
            rounds, [h["task_losses"][task] for h in history if task in h["task_losses"]], marker="o", label=task
        )
    right.set_xlabel("round")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel("global-copy training loss")
    right.set_yscale("log")
    right.set_title("loss per round")
    if tasks:
        right.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
