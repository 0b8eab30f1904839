"""The update-norm bound's cost per upload: the server's slice-wise float64 sum against the plain torch expression.

    python bench/update_norm.py                 # 10, 100, 500 MB of fp32
    python bench/update_norm.py --mb 100 --repeats 5

The bound (``aggregation.max_update_norm_ratio``) reads every uploaded tensor and the global value it
replaces, under the federation lock, so its cost adds to every upload. ``torch`` here is
``torch.linalg.vector_norm(update - global, dtype=float64) ** 2`` (a full-size temporary);
``tap`` is ``tap_server.aggregation.squared_distance`` (float64 over cache-sized slices, no temporary).
Prints the best of ``--repeats`` seconds and MB/s of update read.
"""

from __future__ import annotations

import argparse
import time

import torch

from tap_server.aggregation import squared_distance


def plain(update: torch.Tensor, current: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(update - current, dtype=torch.float64)) ** 2


def best_of(repeats: int, fn, *args) -> tuple[float, float]:
    times, value = [], 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - started)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", nargs="+", type=float, default=[10, 100, 500])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the server's check runs on one thread
    print(f"{'MB':>6} {'torch s':>9} {'tap s':>8} {'tap MB/s':>9} {'speed-up':>9} {'relative difference':>20}")
    for mb in args.mb:
        elements = int(mb * 1e6 / 4)
        generator = torch.Generator().manual_seed(0)
        update, current = torch.randn(elements, generator=generator), torch.randn(elements, generator=generator)
        torch_s, torch_value = best_of(args.repeats, plain, update, current)
        tap_s, tap_value = best_of(args.repeats, squared_distance, update, current)
        print(
            f"{mb:>6g} {torch_s:>9.4f} {tap_s:>8.4f} {mb / tap_s:>9.0f} {torch_s / tap_s:>8.1f}x "
            f"{abs(tap_value - torch_value) / torch_value:>20.2e}"
        )


if __name__ == "__main__":
    main()
