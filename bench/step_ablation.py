"""What each training-step optimisation is worth on its own: every one switched off in turn, interleaved.

    python bench/step_ablation.py --presets small minilm --tasks image_cls vqa --repeats 5

For each (preset, task) it times ``--steps`` training steps (CPU seconds of this
process, one torch thread) of the current code ("all on") and of the current code
with one optimisation switched back to the old way:

- ``lean_lora``: peft's own LoRA forward instead of the single addmm (bit-identical numbers),
- ``shared_entry``: every route computes its first mote block and adapter itself,
- ``fused_adamw``: the for-each-tensor AdamW instead of the fused kernel.

Configurations take turns within each repeat; the table gives the median step
time and how much slower the step is without the optimisation.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Iterator

import torch

from train_speed import TASK_KINDS, Worker

ABLATIONS = ("all_on", "lean_lora", "shared_entry", "fused_adamw")


def features_every_route(self, task_name, batch):
    """TapModel.features before the shared entry: each route from the tokens."""
    from tap_core.model import components as C

    task = self.plan.task(task_name)
    tokens = self.encode(task, batch)
    pooled = []
    for modality_side, family_side, reads in C.routing_paths(task):
        h = torch.cat([tokens[m][0] for m in reads], dim=1)
        mask = torch.cat([tokens[m][1] for m in reads], dim=1)
        pooled.append(self.route(h, mask, modality_side, family_side, task.domain))
    return torch.stack(pooled).mean(0)


@contextlib.contextmanager
def switched_off(name: str) -> Iterator[None]:
    from tap_core.model.tap_model import TapModel
    from tap_core.training import trainer

    if name == "shared_entry":
        original = TapModel.features
        TapModel.features = features_every_route
        try:
            yield
        finally:
            TapModel.features = original
    elif name == "fused_adamw":
        original = trainer.make_optimizer
        trainer.make_optimizer = lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        try:
            yield
        finally:
            trainer.make_optimizer = original
    else:
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "minilm"])
    parser.add_argument("--tasks", nargs="+", default=list(TASK_KINDS), choices=TASK_KINDS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from tap_core.model import layers
    from tap_core.training.trainer import constant_schedule

    worker = Worker(threads=1, train_examples=256, eval_examples=16)
    print(
        f"CPU seconds per step ({args.steps} steps x {args.repeats} repeats, batch {args.batch}, 1 thread): "
        "median; the slow-down when one optimisation is off"
    )
    print("| preset | task | all on | " + " | ".join(f"without {a}" for a in ABLATIONS[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(ABLATIONS) - 1))
    for preset in args.presets:
        for task in args.tasks:
            benches = {}
            for name in ABLATIONS:  # peft's forward is chosen when the model is built
                layers.LEAN_LORA = name != "lean_lora"
                benches[name] = worker.build("cpu", preset, task, args.batch, "train")
            layers.LEAN_LORA = True
            times: dict[str, list[float]] = {name: [] for name in ABLATIONS}
            for repeat in range(args.repeats + 1):
                for name in ABLATIONS if repeat % 2 else ABLATIONS[::-1]:
                    bench = benches[name]
                    with switched_off(name):
                        started = time.process_time()
                        bench.runtime.trainer.train(
                            bench.model, bench.runtime.tensors, args.steps, repeat, constant_schedule(1e-4)
                        )
                        if repeat:  # the first round warms up
                            times[name].append((time.process_time() - started) / args.steps)
            base = statistics.median(times["all_on"])
            cells = [
                f"{statistics.median(times[n]) * 1000:.0f} ms (x{statistics.median(times[n]) / base:.2f})"
                for n in ABLATIONS[1:]
            ]
            print(f"| {preset} | {task} | {base * 1000:.0f} ms | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
