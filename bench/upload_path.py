"""What the server does with an upload after its bytes arrived, step by step, in one process.

    python bench/upload_path.py --mb 100 500

For N MB of fp32 in 8 tensors (encoded by the real codec in 2 MiB frames): the decode (the one copy
into place and the CRC), the finite check, the update-norm distance to the global values, and the fold
into the float64 sums — the functions ``tap_server`` calls, best of ``--repeats``, one thread. The
decode runs while the stream arrives; the rest runs after it, under the federation lock
(docs/performance.md, "Transport").
"""

from __future__ import annotations

import argparse
import time

import torch

from tap_core.finite import all_finite
from tap_core.runtime import configure_threads
from tap_core.wire import StreamDecoder, StreamInfo, encode_frames
from tap_server.aggregation import fold, squared_distance, weighted

TENSORS = 8


def best(repeats: int, step) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(megabytes: float, repeats: int, chunk_bytes: int) -> dict[str, float]:
    n = int(megabytes * 1e6) // 4 // TENSORS
    generator = torch.Generator().manual_seed(0)
    update = {f"component{i}": {"w": torch.randn(n, generator=generator)} for i in range(TENSORS)}
    current = {c: {"w": t["w"] + 0.01} for c, t in update.items()}
    layout = {c: [("w", (n,))] for c in update}
    info = StreamInfo(1, "{}", {c: 1.0 for c in update})
    frames = list(encode_frames(update, layout, "fp32", chunk_bytes, info))

    def decode():
        decoder = StreamDecoder(layout, "fp32")
        for frame in frames:
            decoder.feed(frame)
        return decoder.finish()

    values = decode()
    sums = {c: weighted(values[c]["w"], 1.0) for c in values}
    return {
        "decode": best(repeats, decode),
        "finite": best(repeats, lambda: [all_finite(t["w"]) for t in values.values()]),
        "norm": best(repeats, lambda: [squared_distance(values[c]["w"], current[c]["w"]) for c in values]),
        "fold": best(repeats, lambda: [fold(sums[c], values[c]["w"], 2.0) for c in values]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, nargs="+", default=[100.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=2 << 20)
    args = parser.parse_args()
    configure_threads(1)
    print(f"{'MB':>6} {'step':<8} {'ms':>8} {'MB/s':>8}")
    for megabytes in args.mb:
        steps = measure(megabytes, args.repeats, args.chunk_bytes)
        for step, seconds in steps.items():
            print(f"{megabytes:6g} {step:<8} {seconds * 1000:8.1f} {megabytes / seconds:8.0f}")
        after = sum(v for k, v in steps.items() if k != "decode")
        print(f"{megabytes:6g} {'after':<8} {after * 1000:8.1f}   (finite + norm + fold: after the stream)")


if __name__ == "__main__":
    main()
