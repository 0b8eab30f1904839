"""A real round's transport through tap-server and K tap-client processes, against raw gRPC in the same run.

    python bench/transport.py                        # 10, 100, 500 MB with 2 clients; 2, 8, 32 clients at 10 MB
    python bench/transport.py --quick                # about a minute: 10 and 100 MB, 2 clients, 2 rounds
    python bench/transport.py --overhead             # also: tap demo against tap simulate, same configuration
    python bench/transport.py --sizes 100 --clients 2 --rounds 5 --json out.json --plot out.png

Throughput: one ``tap-server`` and K ``tap-client`` processes over mTLS on loopback,
started through ``tap_testing.synthetic`` (the global model is N MB of fp32 spread over
the plan's real components; training is a no-op, so a round is transport + validation
+ aggregation). Beside them, in the same run, ``tap_testing.raw_stream``: a raw grpcio
server and K clients moving the same bytes with the same TLS, chunk size and channel
options. Every round is interleaved: tap download (all K at once), raw download, raw
upload, tap upload. Per direction: K x N MB over the wall time from the first stream's
start to the last one's end (upload: to the moment the server has decoded, validated and
folded the last update — the round's closing, aggregation result and state write, is
reported apart as ``close_s``). Medians over rounds (round 1 included), with min–max of
the tap/raw ratio. Peak RSS: per round (``/proc/self/clear_refs``), the highest.

Round overhead (``--overhead``): ``tap demo`` against ``tap simulate`` with the same
scenario, model and rounds, alternated; wall time of the whole command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tap_cli.demo import free_port, tail, wait_healthy  # noqa: E402
from tap_core.config import Deadlines, FederationConfig, ModelSpec, TrainConfig, WireConfig, to_mapping  # noqa: E402

TASK = {"name": "shapes", "kind": "classification", "modalities": ["image"], "domain": "general"}
STEP_TIMEOUT_S = 900.0


@dataclass
class Federation:
    """One synthetic federation and its raw twin: processes, files, events."""

    root: Path
    megabytes: float
    clients: int
    rounds: int
    chunk_bytes: int
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def silos(self) -> list[str]:
        return [f"s{i:02d}" for i in range(self.clients)]

    def events(self, name: str) -> list[dict[str, Any]]:
        path = self.root / "events" / f"{name}.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }


def prepare(fed: Federation) -> None:
    from tap_server.provision import provision

    for name in ("kits", "events", "logs", "gate", "state", "clients"):
        (fed.root / name).mkdir(parents=True, exist_ok=True)
    provision(fed.root / "kits", fed.silos, ["127.0.0.1"])
    rng = np.random.default_rng(0)
    np.savez(
        fed.root / "shapes.npz",
        images=rng.integers(0, 255, size=(24, 16, 16, 3), dtype=np.uint8),
        labels=np.array(["circle", "square", "triangle"] * 8),
    )
    task = dict(TASK, data={"format": "npz", "path": "shapes.npz", "test_fraction": 0.25})
    for silo in fed.silos:
        (fed.root / f"{silo}.yaml").write_text(yaml.safe_dump({"tasks": [task]}))
    config = FederationConfig(
        name="transport-bench",
        rounds=fed.rounds,
        seed=0,
        expected_silos=fed.clients,
        model=ModelSpec(size="tiny"),
        train=TrainConfig(local_steps=1, ft_steps=0, kd_steps=0, batch_size=4, eval_batch_size=16, max_val_examples=4),
        wire=WireConfig(chunk_bytes=fed.chunk_bytes, max_message_bytes=max(8 << 20, fed.chunk_bytes + (1 << 20))),
        deadlines=Deadlines(join_s=STEP_TIMEOUT_S, round_s=3600, finish_s=3600, heartbeat_s=5.0),
    )
    (fed.root / "federation.yaml").write_text(yaml.safe_dump(to_mapping(config), sort_keys=False))


def spawn(fed: Federation, name: str, command: list[str], **kwargs) -> subprocess.Popen:
    log = open(fed.log(name), "wb")
    process = subprocess.Popen(command, stdout=kwargs.pop("stdout", log), stderr=log, env=env(), cwd=fed.root, **kwargs)
    fed.processes.append(process)
    return process


def start_raw(fed: Federation) -> list[subprocess.Popen]:
    """The raw server and K raw clients, connected and warmed up, waiting for commands."""
    port_file = fed.root / "raw.port"
    raw = [sys.executable, "-m", "tap_testing.raw_stream"]
    common = ["--config", str(fed.root / "federation.yaml"), "--mb", str(fed.megabytes)]
    server = spawn(
        fed,
        "raw-server",
        [*raw, "server", "--kit", str(fed.root / "kits/server"), *common, "--port-file", str(port_file)],
    )
    wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), "the raw server's port", [server], fed)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    clients = [
        spawn(
            fed,
            f"raw-{silo}",
            [*raw, "client", "--kit", str(fed.root / "kits" / silo), *common, "--server", address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for silo in fed.silos
    ]
    for client in clients:
        json.loads(client.stdout.readline() or "{}")["ready"]
    return clients


def raw_phase(clients: list[subprocess.Popen], command: str) -> tuple[float, float, int]:
    """(first start, last end, bytes) of ``command`` run by every raw client at once."""
    for client in clients:
        client.stdin.write(command + "\n")
        client.stdin.flush()
    answers = [json.loads(client.stdout.readline()) for client in clients]
    if os.environ.get("TAP_BENCH_DEBUG"):
        print(f"    raw {command}: " + ", ".join(f"{a['start']:.2f}-{a['end']:.2f}" for a in answers), flush=True)
    return min(a["start"] for a in answers), max(a["end"] for a in answers), sum(a["bytes"] for a in answers)


def start_tap(fed: Federation) -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    synthetic = [sys.executable, "-m", "tap_testing.synthetic"]
    port, health = free_port(), free_port()
    server = spawn(
        fed,
        "server",
        [
            *synthetic,
            "--mb",
            str(fed.megabytes),
            "--events",
            str(fed.root / "events/server.jsonl"),
            "server",
            "serve",
            "--kit",
            str(fed.root / "kits/server"),
            "--config",
            str(fed.root / "federation.yaml"),
            "--listen",
            f"127.0.0.1:{port}",
            "--state",
            str(fed.root / "state"),
            "--metrics-port",
            "-1",
            "--health-port",
            str(health),
            "--exit-when-done",
            "--log-level",
            "warning",
        ],
    )
    wait_healthy(health, server, fed.log("server"))
    agents = [
        spawn(
            fed,
            silo,
            [
                *synthetic,
                "--events",
                str(fed.root / "events" / f"{silo}.jsonl"),
                "--gate",
                str(fed.root / "gate"),
                "client",
                "run",
                "--kit",
                str(fed.root / "kits" / silo),
                "--server",
                f"127.0.0.1:{port}",
                "--config",
                str(fed.root / f"{silo}.yaml"),
                "--state",
                str(fed.root / "clients" / silo),
                "--threads",
                "1",
                "--log-level",
                "warning",
            ],
        )
        for silo in fed.silos
    ]
    return server, agents


def wait_for(
    condition, what: str, watched: list[subprocess.Popen], fed: Federation, timeout: float = STEP_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for process in watched:
            if process.poll() not in (None, 0):
                name = Path(process.args[-1]).name if process.args else "?"
                raise RuntimeError(
                    f"waiting for {what}: a process exited with {process.returncode} ({name})\n"
                    f"{tail(fed.root / 'logs' / 'server.log')}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what} in {fed.root}")
        time.sleep(0.05)


def has_event(fed: Federation, process: str, event: str, round_index: int) -> bool:
    return any(e["event"] == event and e["round"] == round_index for e in fed.events(process))


def measure(fed: Federation) -> list[dict[str, Any]]:
    """Run the federation and its raw twin round by round; one record per round."""
    prepare(fed)
    raw_clients = start_raw(fed)
    server, agents = start_tap(fed)
    watched = [server, *agents]
    rows = []
    for round_index in range(1, fed.rounds + 1):
        wait_for(
            lambda r=round_index: all(has_event(fed, s, "waiting", r) for s in fed.silos),
            f"round {round_index}'s downloads",
            watched,
            fed,
        )
        raw_down = raw_phase(raw_clients, "down")
        raw_up = raw_phase(raw_clients, "up")
        (fed.root / "gate" / f"round-{round_index}").write_text("go")
        wait_for(
            lambda r=round_index: (
                has_event(fed, "server", "round_closed", r)
                and all(has_event(fed, s, "upload_end", r) for s in fed.silos)
            ),
            f"round {round_index} to close",
            watched,
            fed,
        )
        rows.append(round_record(fed, round_index, raw_down, raw_up))
        show_round(fed, rows[-1])
    for client in raw_clients:
        client.stdin.write("quit\n")
        client.stdin.flush()
    wait_for(lambda: server.poll() is not None, "the server to finish", watched, fed)
    stop(fed)
    return rows


def round_record(fed: Federation, round_index: int, raw_down, raw_up) -> dict[str, Any]:
    def of(silo: str, event: str) -> dict[str, Any]:
        return next(e for e in fed.events(silo) if e["event"] == event and e["round"] == round_index)

    down_start = min(of(s, "download_start")["t"] for s in fed.silos)
    down_end = max(of(s, "download_end")["t"] for s in fed.silos)
    up_start = min(of(s, "upload_start")["t"] for s in fed.silos)
    closed = next(e for e in fed.events("server") if e["event"] == "round_closed" and e["round"] == round_index)
    payload = sum(of(s, "download_end")["bytes"] for s in fed.silos)
    agents_peak = max(of(s, "upload_end")["peak_rss_mb"] for s in fed.silos)
    mb = 1e6
    return {
        "round": round_index,
        "payload_mb": payload / mb,
        "down": {
            "tap_mb_s": payload / mb / (down_end - down_start),
            "raw_grpc_mb_s": raw_down[2] / mb / (raw_down[1] - raw_down[0]),
        },
        "up": {
            "tap_mb_s": payload / mb / (closed["close_start"] - up_start),
            "raw_grpc_mb_s": raw_up[2] / mb / (raw_up[1] - raw_up[0]),
        },
        "down_s": down_end - down_start,
        "up_s": closed["close_start"] - up_start,
        "close_s": closed["close_seconds"],
        "round_s": (down_end - down_start) + (closed["close_start"] - up_start) + closed["close_seconds"],
        "server_peak_rss_mb": closed["peak_rss_mb"],
        "agent_peak_rss_mb": agents_peak,
    }


def show_round(fed: Federation, row: dict[str, Any]) -> None:
    parts = [f"{d} tap {row[d]['tap_mb_s']:7.1f} raw {row[d]['raw_grpc_mb_s']:7.1f} MB/s" for d in ("down", "up")]
    print(
        f"  {fed.megabytes:g} MB x {fed.clients} clients, round {row['round']}/{fed.rounds}: {'; '.join(parts)}; "
        f"round {row['round_s']:.2f}s, server peak {row['server_peak_rss_mb']:.0f} MB, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def stop(fed: Federation) -> None:
    for process in fed.processes:
        if process.poll() is None:
            process.terminate()
    for process in fed.processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    fed.processes.clear()


def summarise(
    megabytes: float, clients: int, rows: list[dict[str, Any]], load: tuple[float, float]
) -> list[dict[str, Any]]:
    out = []
    for direction in ("down", "up"):
        ratios = [r[direction]["tap_mb_s"] / r[direction]["raw_grpc_mb_s"] for r in rows]
        out.append(
            {
                "mb": megabytes,
                "clients": clients,
                "direction": direction,
                "tap_mb_s": statistics.median(r[direction]["tap_mb_s"] for r in rows),
                "raw_grpc_mb_s": statistics.median(r[direction]["raw_grpc_mb_s"] for r in rows),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "round_s": statistics.median(r["round_s"] for r in rows),
                "close_s": statistics.median(r["close_s"] for r in rows),
                "server_peak_rss_mb": max(r["server_peak_rss_mb"] for r in rows),
                "agent_peak_rss_mb": max(r["agent_peak_rss_mb"] for r in rows),
                "rounds": len(rows),
                "load_before": load[0],
                "load_after": load[1],
                "per_round": [
                    {"tap_mb_s": r[direction]["tap_mb_s"], "raw_grpc_mb_s": r[direction]["raw_grpc_mb_s"]} for r in rows
                ],
            }
        )
    return out


def print_table(rows: list[dict[str, Any]], chunk_bytes: int) -> None:
    print(
        f"\n{'MB':>5} {'K':>3} {'dir':<4} {'tap MB/s':>9} {'raw MB/s':>9} {'ratio':>6} {'(min-max)':>11} "
        f"{'round s':>8} {'close s':>8} {'server peak':>12} {'agent peak':>11}   "
        f"(mTLS loopback, {chunk_bytes >> 10} KiB chunks, medians)"
    )
    for r in rows:
        print(
            f"{r['mb']:>5g} {r['clients']:>3} {r['direction']:<4} {r['tap_mb_s']:>9.1f} {r['raw_grpc_mb_s']:>9.1f} "
            f"{r['ratio']:>6.2f} {r['ratio_min']:>5.2f}-{r['ratio_max']:<5.2f} {r['round_s']:>8.2f} {r['close_s']:>8.2f} "
            f"{r['server_peak_rss_mb']:>9.0f} MB {r['agent_peak_rss_mb']:>8.0f} MB"
        )


# ------------------------------------------------------------------------- demo vs simulate


def overhead(repeats: int, options: list[str], workdir: Path, fresh: bool = False) -> dict[str, Any]:
    """Wall time of ``tap demo`` over ``tap simulate`` with the same options, alternated (simulate first).

    ``fresh``: also ``tap demo --fresh-processes`` (every process imports torch itself) in the same rotation,
    the demo's start-up before the forked launcher (tap_cli.launcher)."""
    tap = [sys.executable, "-m", "tap_cli.cli"]
    kinds = ["simulate", "demo"] + (["demo-fresh"] if fresh else [])
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(repeats):
        for kind in kinds:
            command = [*tap, kind.split("-")[0], *options, "--no-progress"]
            if kind.startswith("demo"):
                command += ["--workdir", str(workdir / "demo")]
            if kind == "demo-fresh":
                command += ["--fresh-processes"]
            started = time.perf_counter()
            result = subprocess.run(command, env=env(), cwd=workdir, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
            times[kind].append(seconds)
            print(
                f"  overhead run {i + 1}/{repeats}: tap {kind} {seconds:.1f}s (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    simulate, demo = statistics.median(times["simulate"]), statistics.median(times["demo"])
    out: dict[str, Any] = {
        "options": options,
        "simulate_s": times["simulate"],
        "demo_s": times["demo"],
        "ratio": demo / simulate,
        "ratios": [d / s for d, s in zip(times["demo"], times["simulate"])],
    }
    if fresh:
        out["demo_fresh_s"] = times["demo-fresh"]
        out["fresh_ratio"] = statistics.median(times["demo-fresh"]) / simulate
    return out


# ------------------------------------------------------------------------- plot, main


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, direction in zip(axes, ("down", "up")):
        picked = [r for r in rows if r["direction"] == direction]
        labels = [f"{r['mb']:g} MB\nK={r['clients']}" for r in picked]
        x = np.arange(len(picked))
        ax.bar(x - 0.2, [r["raw_grpc_mb_s"] for r in picked], 0.4, label="raw gRPC")
        ax.bar(x + 0.2, [r["tap_mb_s"] for r in picked], 0.4, label="tap-server + tap-client")
        for xi, r in zip(x, picked):
            ax.text(xi + 0.2, r["tap_mb_s"], f"{r['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{'download (server -> K agents)' if direction == 'down' else 'upload (K agents -> server)'}")
        ax.set_ylabel("MB/s, all streams together")
    axes[0].legend()
    fig.suptitle("A round's transport, mTLS on loopback (bar labels: tap / raw)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", type=float, default=[10, 100, 500], help="MB of the global model")
    parser.add_argument("--clients", type=int, default=2, help="K for the throughput sizes")
    parser.add_argument("--scale-clients", nargs="*", type=int, default=[2, 8, 32], help="K for the encode-once rows")
    parser.add_argument("--scale-mb", type=float, default=10, help="MB of the encode-once rows")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per federation (each one interleaved with raw)")
    parser.add_argument("--chunk-bytes", type=int, default=WireConfig().chunk_bytes)
    parser.add_argument("--quick", action="store_true", help="10 and 100 MB, 2 clients, 2 rounds (about a minute)")
    parser.add_argument("--overhead", action="store_true", help="also time tap demo against tap simulate")
    parser.add_argument("--overhead-only", action="store_true", help="only the demo-vs-simulate comparison")
    parser.add_argument("--overhead-repeats", type=int, default=2)
    parser.add_argument(
        "--overhead-fresh", action="store_true", help="also time tap demo --fresh-processes (no forked launcher)"
    )
    parser.add_argument(
        "--overhead-options",
        default="--scenario tap-bench-mini --model tiny --rounds 2",
        help="options given to both tap simulate and tap demo",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="draw the throughput rows here (PNG)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep kits, logs and events here")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.scale_clients, args.rounds = [10, 100], [], 2
    if args.overhead_only:
        args.sizes, args.scale_clients, args.overhead = [], [], True
    root = args.workdir or Path(tempfile.mkdtemp(prefix="tap-transport-"))
    runs = [(mb, args.clients) for mb in args.sizes]
    runs += [(args.scale_mb, k) for k in args.scale_clients if (args.scale_mb, k) not in runs]
    print(f"{len(runs)} federations x {args.rounds} rounds; {os.cpu_count()} cores, load {os.getloadavg()}", flush=True)
    results: dict[str, Any] = {
        "throughput": [],
        "overhead_ratio": None,
        "chunk_bytes": args.chunk_bytes,
        "command": " ".join(sys.argv),
        "cpus": os.cpu_count(),
    }
    try:
        for megabytes, clients in runs:
            fed = Federation(root / f"mb{megabytes:g}-k{clients}", megabytes, clients, args.rounds, args.chunk_bytes)
            load_before = os.getloadavg()[0]
            try:
                rows = measure(fed)
            finally:
                stop(fed)
            results["throughput"] += summarise(megabytes, clients, rows, (load_before, os.getloadavg()[0]))
            if args.workdir is None:
                shutil.rmtree(fed.root, ignore_errors=True)  # 500 MB runs leave GBs of state
        if results["throughput"]:
            print_table(results["throughput"], args.chunk_bytes)
        if args.overhead:
            options = args.overhead_options.split()
            result = overhead(args.overhead_repeats, options, root, args.overhead_fresh)
            results["overhead"] = result
            results["overhead_ratio"] = result["ratio"]
            print(
                f"\ntap demo / tap simulate ({' '.join(options)}): median {result['ratio']:.3f} "
                f"(runs: {', '.join(f'{r:.3f}' for r in result['ratios'])}; simulate "
                f"{', '.join(f'{s:.1f}' for s in result['simulate_s'])} s, demo {', '.join(f'{s:.1f}' for s in result['demo_s'])} s)"
            )
            if "fresh_ratio" in result:
                fresh_runs = ", ".join(f"{s:.1f}" for s in result["demo_fresh_s"])
                print(f"tap demo --fresh-processes / tap simulate: median {result['fresh_ratio']:.3f} ({fresh_runs} s)")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"json: {args.json}")
    if args.plot and results["throughput"]:
        plot(results["throughput"], args.plot)


if __name__ == "__main__":
    main()
