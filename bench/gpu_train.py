"""Training throughput of the TAP model through the project's own trainer, on CUDA or CPU.

    python bench/gpu_train.py --size base --device cuda --steps 30
    python bench/gpu_train.py --size tiny --device cpu --steps 10

Builds the model from random weights of the chosen size (no downloads, no
tokenizer: synthetic token ids and images), trains three tasks (image
classification, VQA-style text generation from image + text, image
reconstruction) with ``Trainer.train`` — device placement and bf16 autocast as
in a real run — and prints a table: samples/s per configuration, step time and
peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tap_core.config import ModelSpec, TaskSpec, TrainConfig
from tap_core.model.backbone import backbone_on
from tap_core.model.tap_model import ModelPlan, TapModel
from tap_core.training.batches import SplitTensors, TaskTensors
from tap_core.silo import frozen_dtype
from tap_core.training.trainer import Trainer, constant_schedule, select_device


def synthetic_tasks(n: int, image_size: int, vocab: int, seed: int = 0) -> dict[str, TaskTensors]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    ids = torch.randint(1000, vocab, (n, 32), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 10, (n,), generator=g)
    targets = torch.zeros(n, 8, dtype=torch.long)
    targets[:, 0] = torch.randint(1000, vocab, (n,), generator=g)
    targets[:, 1] = 102  # [SEP]
    specs = {
        "cls": TaskSpec("cls", "classification", ("image",), labels=tuple(str(i) for i in range(10))),
        "vqa": TaskSpec("vqa", "text_generation", ("image", "text")),
        "gen": TaskSpec("gen", "image_generation", ("image",)),
    }
    split = {
        "cls": SplitTensors(images, None, None, labels, None),
        "vqa": SplitTensors(images, ids, mask, None, targets),
        "gen": SplitTensors(images, None, None, None, None),
    }
    return {name: TaskTensors(specs[name], split[name], split[name], split[name]) for name in specs}


def measure(size: str, device_name: str, steps: int, batch: int, amp: bool, tokenizer: str | None = None) -> dict:
    spec = ModelSpec(size=size, tokenizer=tokenizer)
    device = select_device(device_name)
    backbone = backbone_on(spec, device, frozen_dtype(device, amp))
    tasks = synthetic_tasks(max(4 * batch, 64), backbone.image_size, backbone.word_embeddings.shape[0])
    model = TapModel(ModelPlan(tuple(t.task for t in tasks.values())), backbone, seed=0)
    cfg = TrainConfig(batch_size=batch, amp=amp, local_steps=steps)
    trainer = Trainer(cfg, device)
    norm = model.part("expert.mote.shared.shared.0").norm.weight
    norm_before = norm.detach().clone()
    trainer.train(model, tasks, 2, seed=1, schedule=constant_schedule(1e-4))  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train(model, tasks, steps, seed=2, schedule=constant_schedule(1e-4))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return {
        "size": size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp_bf16": trainer.autocast_enabled,
        "batch": batch,
        "steps": steps,
        "samples_per_s": result.samples / seconds,
        "step_ms": 1000 * seconds / steps,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "trainable_params": trainable,
        "total_params": total,
        "final_losses": {k: round(v, 4) for k, v in result.losses.items()},
        "trainable_dtypes": sorted({str(p.dtype) for p in model.trainable_parameters()}),
        "norm_moved": float((norm.detach() - norm_before).abs().max()),
    }


def profile(size: str, device_name: str, batch: int, tokenizer: str | None = None) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    device = select_device(device_name)
    backbone = backbone_on(ModelSpec(size=size, tokenizer=tokenizer), device, frozen_dtype(device, True))
    tasks = synthetic_tasks(max(4 * batch, 64), backbone.image_size, backbone.word_embeddings.shape[0])
    model = TapModel(ModelPlan(tuple(t.task for t in tasks.values())), backbone, seed=0)
    trainer = Trainer(TrainConfig(batch_size=batch), device)
    trainer.train(model, tasks, 2, seed=1, schedule=constant_schedule(1e-4))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        trainer.train(model, tasks, 3, seed=2, schedule=constant_schedule(1e-4))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=50))
    events = prof.key_averages()
    print("kernel launches per step:", sum(e.count for e in events if e.key.startswith("cudaLaunchKernel")) / 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", default=["tiny"], choices=["tiny", "small", "base"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--amp", choices=["on", "off", "both"], default="both")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--profile", action="store_true", help="print the top kernels/ops of 3 steps (last size, bf16)")
    parser.add_argument("--tokenizer", default=None, help="local BERT tokenizer directory (default: MiniLM's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    amps = {"on": [True], "off": [False], "both": [False, True]}[args.amp]
    for size in args.size:
        for batch in args.batch:
            for amp in amps:
                rows.append(measure(size, args.device, args.steps, batch, amp, args.tokenizer))
                r = rows[-1]
                print(
                    f"{r['size']:<6} {r['device']:<24} bf16={str(r['amp_bf16']):<5} batch={r['batch']:<4} "
                    f"{r['samples_per_s']:9.1f} samples/s  {r['step_ms']:8.1f} ms/step  "
                    f"peak {r['peak_gpu_mib'] or 0:8.0f} MiB  trainable {r['trainable_params'] / 1e6:.2f}M / "
                    f"{r['total_params'] / 1e6:.1f}M  losses {r['final_losses']}  trainable {r['trainable_dtypes']} "
                    f"norm moved {r['norm_moved']:.2e}",
                    flush=True,
                )
    if args.profile:
        profile(args.size[-1], args.device, args.batch[-1], args.tokenizer)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
