"""How far honest local rounds move each component: the calibration of ``aggregation.max_update_norm_ratio``.

Runs the synthetic three-silo federation (the tests' tiny model and data) in process for each algorithm and
records, for every accepted update and component, ``||update - global|| / max(||global||, 0.01 sqrt(n))`` -- the
quantity the server bounds. Prints the largest ratio per component kind; the default bound (10) must sit well
above it.

    python bench/update_norms.py [--local-steps 10] [--lr 1e-3] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic silos of the test suite

from conftest import synthetic_data, synthetic_silos, tiny_config  # noqa: E402

from tap_cli.simulate import run_federation  # noqa: E402
from tap_core.config import AggregationConfig  # noqa: E402
from tap_core.silo import SiloRuntime  # noqa: E402
from tap_server.federation import Federation  # noqa: E402
from tap_server.validation import UPDATE_NORM_FLOOR_RMS  # noqa: E402

log = logging.getLogger("update_norms")


def measure(algorithm: str, local_steps: int, lr: float, rounds: int) -> list[dict]:
    config = tiny_config(algorithm, rounds=rounds, local_steps=local_steps, peak_lr=lr, min_lr=min(lr, 1e-4))
    config = dataclasses.replace(
        config, aggregation=AggregationConfig(max_update_norm_ratio=None)
    )  # measure, not refuse
    silos = synthetic_silos()
    data = synthetic_data(silos)
    runtimes = {s.id: SiloRuntime(s, data[s.id], config, torch.device("cpu")) for s in silos}
    federation = Federation(config, expected_silos=len(runtimes))
    rows: list[dict] = []
    submit = federation.submit_update

    def recording(update):
        current = federation.global_values()
        for component, tensors in update.values.items():
            delta = sum(float(((t.double() - current[component][n].double()) ** 2).sum()) for n, t in tensors.items())
            norm = sum(float((current[component][n].double() ** 2).sum()) for n in tensors)
            elements = sum(t.numel() for t in tensors.values())
            reference = max(math.sqrt(norm), UPDATE_NORM_FLOOR_RMS * math.sqrt(elements))
            rows.append(
                {
                    "algorithm": algorithm,
                    "round": update.round,
                    "silo": update.silo,
                    "kind": component.split(".")[0],
                    "component": component,
                    "ratio": math.sqrt(delta) / reference,
                }
            )
        return submit(update)

    federation.submit_update = recording  # type: ignore[method-assign]
    started = time.perf_counter()
    run_federation(runtimes, config, federation=federation)
    log.info("%s: %d updates x components in %.0fs", algorithm, len(rows), time.perf_counter() - started)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="tap,fedavg")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = [row for name in args.algorithms.split(",") for row in measure(name, args.local_steps, args.lr, args.rounds)]
    kinds = sorted({r["kind"] for r in rows})
    print(f"local_steps={args.local_steps} peak_lr={args.lr} rounds={args.rounds}")
    print(f"{'component kind':16s} {'updates':>8s} {'median ratio':>13s} {'max ratio':>10s}")
    for kind in kinds:
        ratios = sorted(r["ratio"] for r in rows if r["kind"] == kind)
        print(f"{kind:16s} {len(ratios):8d} {ratios[len(ratios) // 2]:13.3f} {ratios[-1]:10.3f}")
    print(f"{'all':16s} {len(rows):8d} {'':13s} {max(r['ratio'] for r in rows):10.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
