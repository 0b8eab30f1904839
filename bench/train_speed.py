"""Training and evaluation speed per model preset, task kind, batch size and device — before and after in one run.

    python bench/train_speed.py                                   # small + minilm, every task kind, batch 16, CPU
    python bench/train_speed.py --compare main --json out.json    # the same on a git worktree of `main`, interleaved
    python bench/train_speed.py --quick --compare main            # a few steps each: a smoke check in about a minute
    python bench/train_speed.py --presets minilm --tasks vqa --profile   # top ops of the training step

Every measurement runs the project's own code path: a :class:`SiloRuntime` over
synthetic data of realistic shape (64x64 images; easy-VQA-length questions of
6-12 words; review-length sentences of 10-35 words, so texts go through the real
tokenizer and the per-batch padding), its ``Trainer.train`` for training steps
(one task per model, as a single-task silo) and ``Trainer.evaluate`` on the
test split for evaluation. Reported: optimizer steps/s, training samples/s and
evaluation examples/s; the median of ``--repeats`` timed runs with the spread.

``--compare REF`` runs the very same measurement on the code of REF (a git ref,
checked out into a temporary worktree, or a directory) in a second worker
process with the same thread count; the two workers take turns for every
measurement (the order alternating per repeat), so drift in the machine's load
hits both columns alike. The table then shows both columns and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TASK_KINDS = ("image_cls", "text_cls", "vqa", "image_gen")
RESULT = "RESULT "  # prefix of the worker's answer lines (anything else on stdout is ignored)


# ---------------------------------------------------------------------------
# Worker side: runs inside a process whose PYTHONPATH is the tree under test.

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
WORDS = (
    "the film is a moving and funny story about love loss and family with a great cast but the plot "
    "drags in its second half and the ending feels rushed yet it remains charming sharp and warm"
).split()


def synthetic_examples(kind: str, n: int, image_size: int, rng) -> Any:
    """``n`` examples of one task kind with realistic shapes (content is random; speed does not depend on it)."""
    from tap_core.data.types import Examples

    images = rng.integers(0, 256, size=(n, 3, image_size, image_size), dtype="uint8")
    if kind == "image_cls":
        return Examples(images=images, labels=[str(int(i)) for i in rng.integers(0, 10, n)])
    if kind == "image_gen":
        return Examples(images=images)
    if kind == "text_cls":  # Rotten Tomatoes: ~21 words on average
        texts = [" ".join(rng.choice(WORDS, int(rng.integers(10, 36)))) for _ in range(n)]
        return Examples(texts=texts, labels=[["negative", "positive"][int(i)] for i in rng.integers(0, 2, n)])
    # easy-VQA: "what shape is in the image?", "is there a red triangle in the image?" ... and a one-word answer
    templates = (
        "what shape is in the image?",
        "what color is the shape?",
        "what is the color of the {s}?",
        "is there a {c} {s} in the image?",
        "does the image not contain a {c} {s}?",
        "is there a {s} present?",
        "what shape does the image contain?",
    )
    texts, targets = [], []
    for _ in range(n):
        shape, color = SHAPES[int(rng.integers(3))], COLORS[int(rng.integers(8))]
        texts.append(templates[int(rng.integers(len(templates)))].format(s=shape, c=color))
        targets.append([shape, color, "yes", "no"][int(rng.integers(4))])
    return Examples(images=images, texts=texts, targets=targets)


def task_spec(kind: str) -> Any:
    from tap_core.config import TaskSpec

    if kind == "image_cls":
        return TaskSpec(
            "clothing", "classification", ("image",), domain="clothing", labels=tuple(str(i) for i in range(10))
        )
    if kind == "text_cls":
        return TaskSpec("reviews", "classification", ("text",), domain="reviews", labels=("negative", "positive"))
    if kind == "vqa":
        return TaskSpec("vqa", "text_generation", ("image", "text"), domain="shapes")
    return TaskSpec("shapes", "image_generation", ("image",), domain="shapes")


@dataclass
class Bench:
    """One built silo runtime and its model for one (device, preset, task, batch, phase)."""

    runtime: Any
    model: Any
    distill: Any


class Worker:
    def __init__(self, threads: int, train_examples: int, eval_examples: int):
        from tap_core.runtime import configure_threads

        configure_threads(threads)
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.cache: dict[tuple, Bench] = {}

    def build(self, device: str, preset: str, task: str, batch: int, phase: str) -> Bench:
        import numpy as np

        from tap_cli.compose import MODEL_PRESETS
        from tap_core.config import FederationConfig, ModelSpec, SiloSpec, TrainConfig
        from tap_core.data.types import TaskData
        from tap_core.model.backbone import build_backbone
        from tap_core.model.tap_model import ModelPlan
        from tap_core.silo import SiloRuntime
        from tap_core.training.trainer import Distillation, select_device

        name, _, overrides = preset.partition(":")  # e.g. "minilm:tower_lora_layers=2,lora_rank=4"
        extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in overrides.split(",") if item)}
        spec = ModelSpec(**{**MODEL_PRESETS[name], **extra})
        size = build_backbone(spec).image_size
        rng = np.random.default_rng(0)
        kind = task_spec(task)
        data = TaskData(
            train=synthetic_examples(task, self.train_examples, size, rng),
            val=synthetic_examples(task, 16, size, rng),
            test=synthetic_examples(task, self.eval_examples, size, rng),
        )
        config = FederationConfig(model=spec, train=TrainConfig(batch_size=batch, device=device))
        runtime = SiloRuntime(SiloSpec("bench", (kind,)), {kind.name: data}, config, select_device(device))
        runtime.set_plan(ModelPlan((kind,)))
        model = runtime.new_model()
        distill = None
        if phase == "distill":
            distill = Distillation(runtime.fresh_copy(model.values()), {kind.name: 1.0}, 2.0)
        return Bench(runtime, model, distill)

    def measure(
        self, device: str, preset: str, task: str, batch: int, phase: str, steps: int, warmup: int, eval_runs: bool
    ) -> dict[str, Any]:
        import torch

        from tap_core.training.trainer import constant_schedule

        key = (device, preset, task, batch, phase)
        fresh = key not in self.cache
        if fresh:
            self.cache[key] = self.build(device, preset, task, batch, phase)
        bench = self.cache[key]
        runtime, trainer = bench.runtime, bench.runtime.trainer

        def sync() -> None:
            if runtime.device.type == "cuda":
                torch.cuda.synchronize(runtime.device)

        def train(n: int, seed: int):
            return trainer.train(bench.model, runtime.tensors, n, seed, constant_schedule(1e-4), bench.distill)

        if fresh and warmup:
            train(warmup, seed=1)  # first-call costs: allocator, kernels, lazy init
        sync()
        started, cpu_started = time.perf_counter(), time.process_time()
        result = train(steps, seed=2)
        sync()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        row = {
            "steps_per_s": steps / seconds,
            "samples_per_s": result.samples / seconds,
            "train_seconds": seconds,
            # per CPU-second of this process: on a shared machine far less noisy than wall time (CPU only)
            "steps_per_cpu_s": steps / cpu_seconds,
        }
        if eval_runs:
            tensors = next(iter(runtime.tensors.values()))
            if fresh:
                trainer.evaluate(bench.model, tensors, runtime.end_id)
            sync()
            started, cpu_started = time.perf_counter(), time.process_time()
            trainer.evaluate(bench.model, tensors, runtime.end_id)
            sync()
            row["eval_examples_per_s"] = len(tensors.test) / (time.perf_counter() - started)
            row["eval_examples_per_cpu_s"] = len(tensors.test) / (time.process_time() - cpu_started)
        return row

    def profile(self, device: str, preset: str, task: str, batch: int, phase: str, steps: int, rows: int) -> str:
        from torch.profiler import ProfilerActivity, profile

        self.measure(device, preset, task, batch, phase, 1, 2, False)
        bench = self.cache[(device, preset, task, batch, phase)]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        from tap_core.training.trainer import constant_schedule

        with profile(activities=activities) as prof:
            bench.runtime.trainer.train(
                bench.model, bench.runtime.tensors, steps, 3, constant_schedule(1e-4), bench.distill
            )
        sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::")) / steps
        launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel")) / steps
        table = events.table(sort_by=sort, row_limit=rows, max_name_column_width=60)
        return f"{table}\naten ops per step: {ops:.0f}" + (
            f"; kernel launches per step: {launches:.0f}" if launches else ""
        )


def worker_main(threads: int, train_examples: int, eval_examples: int) -> None:
    """Answer one JSON request per stdin line with one RESULT line on stdout."""
    from tap_core.runtime import configure_logging

    configure_logging("error")
    worker = Worker(threads, train_examples, eval_examples)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            command = request.pop("cmd")
            if command == "ping":  # the driver waits for every worker's imports before timing anything
                import tap_core.silo  # noqa: F401

                answer = {"ready": True}
            elif command == "profile":
                answer = {"text": worker.profile(**request)}
            else:
                answer = worker.measure(**request)
        except Exception as exc:  # report it and keep serving: one failing config must not end the run
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(RESULT + json.dumps(answer), flush=True)


# ---------------------------------------------------------------------------
# Driver side.


class WorkerProcess:
    """A worker subprocess importing the code of ``tree``."""

    def __init__(self, label: str, tree: Path, args: argparse.Namespace):
        self.label = label
        env = dict(
            os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads)
        )
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "--threads",
            str(args.threads),
            "--train-examples",
            str(args.train_examples),
            "--eval-examples",
            str(args.eval_examples),
        ]
        self.process = subprocess.Popen(
            command, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        raise RuntimeError(f"worker {self.label} exited with status {self.process.wait()}")

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def checkout(ref: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """A directory holding the code of ``ref``: the directory itself, or a temporary git worktree."""
    if Path(ref).is_dir():
        return Path(ref).resolve(), None
    holder = tempfile.TemporaryDirectory(prefix="train-speed-")
    tree = Path(holder.name) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), ref], check=True)
    return tree, holder


def remove_checkout(tree: Path, holder: tempfile.TemporaryDirectory | None) -> None:
    if holder is not None:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        holder.cleanup()


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


MEASURES = {  # key -> column title
    "steps_per_s": "steps/s",
    "steps_per_cpu_s": "steps/CPU-s",
    "samples_per_s": "samples/s",
    "eval_examples_per_s": "eval ex/s",
    "eval_examples_per_cpu_s": "eval ex/CPU-s",
}
SPEEDUPS = ("steps_per_s", "steps_per_cpu_s", "eval_examples_per_s", "eval_examples_per_cpu_s")
CONFIG_KEYS = ("device", "preset", "task", "batch", "phase")


def summarise(runs: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """One row per configuration: the median and spread of each measure per code version, and speed-ups."""
    configs: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        key = tuple(run["config"][k] for k in CONFIG_KEYS)
        configs.setdefault(key, {}).setdefault(run["label"], []).append(run["result"])
    rows = []
    for key, by_label in configs.items():
        row: dict[str, Any] = dict(zip(CONFIG_KEYS, key))
        for label in labels:
            results = [r for r in by_label.get(label, []) if "error" not in r]
            errors = [r["error"] for r in by_label.get(label, []) if "error" in r]
            row[label] = {m: spread([r[m] for r in results]) for m in MEASURES if results and m in results[0]}
            if errors:
                row[label]["error"] = errors[0]
        if len(labels) == 2:
            after, before = row[labels[0]], row[labels[1]]
            row["speedup"] = {
                m: after[m]["median"] / before[m]["median"] for m in SPEEDUPS if m in after and m in before
            }
        rows.append(row)
    return rows


def cell(stats: dict[str, Any], measure: str) -> str:
    if measure not in stats:
        return "error" if "error" in stats else "-"
    s = stats[measure]
    digits = 2 if s["median"] < 100 else 0
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    """A markdown table: per configuration, every measure of every code version, then the speed-ups."""
    measures = [m for m in MEASURES if any(m in row[label] for row in rows for label in labels)]
    head = list(CONFIG_KEYS) + [f"{MEASURES[m]} {label}" for label in labels for m in measures]
    speedups = [m for m in SPEEDUPS if any(m in row.get("speedup", {}) for row in rows)]
    head += [f"x {MEASURES[m]}" for m in speedups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row[k]) for k in CONFIG_KEYS]
        cells += [cell(row[label], m) for label in labels for m in measures]
        cells += [f"{row['speedup'][m]:.2f}x" if m in row.get("speedup", {}) else "-" for m in speedups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["small", "minilm"],
        help="tiny, small, minilm, base; NAME:KEY=VALUE,... sets ModelSpec keys (JSON values)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASK_KINDS), choices=TASK_KINDS)
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="training batch sizes")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["train"],
        choices=["train", "distill"],
        help="distill: steps of stage 2 (a frozen teacher's forward pass as well)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (the project default is 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before a configuration's first run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration and code version")
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation measurement")
    parser.add_argument(
        "--compare",
        metavar="REF",
        default=None,
        help="also measure the code of REF (git ref or directory), interleaved with this tree's",
    )
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 warm-up, 1 repeat, 64 eval examples")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops instead of timing")
    parser.add_argument("--json", default=None, help="also write the runs and the summary here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.threads, args.train_examples, args.eval_examples)
        return
    if args.quick:
        args.steps, args.warmup, args.repeats, args.eval_examples = 3, 1, 1, 64
    devices = args.devices or default_devices()
    configs = [
        dict(device=d, preset=p, task=t, batch=b, phase=ph)
        for d in devices
        for p in args.presets
        for t in args.tasks
        for b in args.batch
        for ph in args.phases
    ]

    if args.profile:
        worker = WorkerProcess("current", REPO, args)
        try:
            for config in configs:
                answer = worker.ask({"cmd": "profile", **config, "steps": max(args.steps, 1), "rows": 25})
                print(f"\n== {config}\n{answer.get('text') or answer.get('error')}", flush=True)
        finally:
            worker.close()
        return

    trees = [("current", REPO, None)]
    if args.compare:
        tree, holder = checkout(args.compare)
        trees.append((args.compare, tree, holder))
    labels = [label for label, _, _ in trees]
    workers = [WorkerProcess(label, tree, args) for label, tree, _ in trees]
    for worker in workers:
        worker.ask({"cmd": "ping"})
    runs: list[dict[str, Any]] = []
    total, done, started = len(configs) * len(workers) * args.repeats, 0, time.perf_counter()
    try:
        for repeat in range(args.repeats):
            for config in configs:
                order = workers if repeat % 2 == 0 else workers[::-1]
                for worker in order:
                    request = {
                        "cmd": "measure",
                        **config,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "eval_runs": not args.no_eval,
                    }
                    result = worker.ask(request)
                    runs.append({"label": worker.label, "repeat": repeat, "config": config, "result": result})
                    done += 1
                    elapsed = time.perf_counter() - started
                    shown = result.get("error") or f"{result['steps_per_s']:.2f} steps/s"
                    print(
                        f"[{done}/{total}] {worker.label:<8} {config['preset']:<6} {config['task']:<9} "
                        f"b{config['batch']:<3} {config['device']} {config['phase']}: {shown}  "
                        f"(elapsed {elapsed:.0f}s, eta {elapsed / done * (total - done):.0f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for worker in workers:
            worker.close()
        for _, tree, holder in trees[1:]:
            remove_checkout(tree, holder)
    rows = summarise(runs, labels)
    print(f"threads per worker: {args.threads}; {args.steps} timed steps x {args.repeats} repeats; median (min-max)")
    print(table(rows, labels))
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "worker"}
        Path(args.json).write_text(json.dumps({"args": meta, "labels": labels, "rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
