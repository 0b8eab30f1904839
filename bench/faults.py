"""Reliability report: fault scenarios, attacks, fuzz campaign and load; a table and (``--json``) the issue's JSON.

    python bench/faults.py --json bench/results/faults/full.json            # everything at the issue's sizes
    python bench/faults.py --quick --json out.json                          # small sizes, minutes
    python bench/faults.py --only faults load                               # some sections

Sections:

- ``faults``: the server SIGKILLed at every phase (one federation, restarted
  after each kill; with ``--each-point`` also one federation per point), agents
  SIGKILLed mid-training and mid-upload, a bad network (drops, cuts mid-stream,
  a partition, a stall, latency, a slow link), minutes of silent local training
  behind an idle-dropping middlebox, a full and a read-only state volume, an
  unwritable state dir at start, a silo that dies for good and one that returns
  late (``tap_testing.fault_scenarios``, ``tap_testing.dropout``). Each ends by
  comparing with an uninterrupted run of the same seed (1e-5) or with the exactly
  known aggregate.
- ``attacks`` and ``fuzz``: ``tap_testing.attacks.run_all`` and
  ``tap_testing.fuzz.run_campaign`` (the hostile-silo half of issue 9); where this
  checkout has no such module the section says so and counts nothing.
- ``load``: 64 light silos (the real protocol over mTLS, trivial training) for
  several rounds, then the same with one flooding Polls and one stalling uploads
  (``tap_testing.load``); with ``--plot`` the server's memory per round is drawn.

Every scenario runs its own processes on 127.0.0.1 (free ports) under a temporary
directory (``--keep`` keeps it, with every process's log). Agents use their real
backoff unless ``--retry-s`` caps it. Exit status 1 when anything did not hold.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tap_testing.outcome import ScenarioOutcome  # noqa: E402

SECTIONS = ("faults", "attacks", "fuzz", "load")
log = logging.getLogger("bench.faults")


def _guarded(name: str, run: Callable[[], ScenarioOutcome]) -> ScenarioOutcome:
    """Run one scenario; an exception (a hang past its timeout included) is a failed row saying what happened."""
    started = time.monotonic()
    log.info("%s ...", name)
    try:
        outcome = run()
    except Exception as exc:  # noqa: BLE001 - the report shows it
        outcome = ScenarioOutcome(name, False, f"the scenario itself failed: {type(exc).__name__}: {str(exc)[:2000]}")
    outcome.numbers.setdefault("seconds", round(time.monotonic() - started, 1))
    log.info("%s: %s in %.0fs", outcome.name, "held" if outcome.passed else "FAILED", time.monotonic() - started)
    return outcome


def fault_scenarios(root: Path, args: argparse.Namespace) -> list[ScenarioOutcome]:
    from tap_testing.cluster import Cluster, reference_run
    from tap_testing.dropout import vanished_silo
    from tap_testing.fault_scenarios import (
        SERVER_CHAIN,
        agent_disk_full,
        agent_kills,
        network_faults,
        server_kills,
        silent_training,
        state_volume_fault,
        unwritable_state_dir,
    )

    log.info("the uninterrupted reference run ...")
    reference = reference_run(Cluster.create(root / "reference" / "cluster"), root / "reference" / "state")
    retry = args.retry_s
    runs: list[tuple[str, Callable[[], ScenarioOutcome]]] = [
        ("server kills", lambda: server_kills(root / "server-chain", SERVER_CHAIN, reference, retry_s=retry)),
    ]
    if args.each_point:
        runs += [
            (
                f"server kill {point}",
                lambda p=point: server_kills(root / f"server-{p.replace(':', '-')}", [p], reference, retry_s=retry),
            )
            for point in SERVER_CHAIN
        ]
    sleep_s = 10.0 if args.quick else 60.0
    runs += [
        ("agent kills", lambda: agent_kills(root / "agents", None, reference, retry_s=retry)),
        ("network", lambda: network_faults(root / "network", reference, retry_s=retry)),
        (
            "silent training",
            lambda: silent_training(
                root / "silent", train_sleep_s=sleep_s, idle_timeout_s=5.0, reference=reference, retry_s=retry
            ),
        ),
        ("agent disk full", lambda: agent_disk_full(root / "agent-full", reference=reference, retry_s=retry)),
        ("disk full", lambda: state_volume_fault(root / "full", "full", reference=reference)),
        ("read-only", lambda: state_volume_fault(root / "ro", "read_only", reference=reference)),
        ("unwritable at start", lambda: unwritable_state_dir(root / "unwritable")),
        ("silo never returns", lambda: vanished_silo(root / "vanish", retry=False, round_s=5.0)),
        ("silo returns late", lambda: vanished_silo(root / "late", retry=True, round_s=5.0)),
    ]
    return [_guarded(name, run) for name, run in runs if not args.match or any(m in name for m in args.match)]


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None


def attack_scenarios(args: argparse.Namespace) -> list[ScenarioOutcome]:
    attacks = _optional("tap_testing.attacks")
    if attacks is None:
        log.warning("no tap_testing.attacks in this checkout: the attacks are not run")
        return []
    return list(attacks.run_all(quick=args.quick))


def fuzz_campaign(args: argparse.Namespace) -> dict[str, Any] | None:
    fuzz = _optional("tap_testing.fuzz")
    if fuzz is None:
        log.warning("no tap_testing.fuzz in this checkout: no fuzz campaign")
        return None
    log.info("fuzz campaign, %d cases per handler ...", args.fuzz_cases)
    return fuzz.run_campaign(cases_per_handler=args.fuzz_cases).to_json()


def load_scenarios(root: Path, args: argparse.Namespace) -> list[ScenarioOutcome]:
    from tap_testing.load import load_run

    silos, rounds = args.load_silos, 3 if args.quick else 5
    return [
        _guarded(f"load {silos}", lambda: load_run(root / "load", silos=silos, rounds=rounds)),
        _guarded(
            f"load {silos} with attackers",
            lambda: load_run(root / "load-hostile", silos=silos, rounds=rounds, attackers=True, round_s=30.0),
        ),
    ]


def print_table(outcomes: list[ScenarioOutcome]) -> None:
    if not outcomes:  # e.g. --only fuzz: the campaign prints its own line
        return
    width = max(len(o.name) for o in outcomes)
    print(f"\n{'scenario':<{width}}  held  seconds  evidence")
    print(f"{'-' * width}  ----  -------  --------")
    for o in outcomes:
        evidence = o.detail if not o.passed else _evidence(o.numbers)
        print(
            f"{o.name:<{width}}  {'yes' if o.passed else 'NO':<4}  {o.numbers.get('seconds', ''):>7}  {evidence[:160]}"
        )


def _evidence(numbers: dict[str, Any]) -> str:
    """The few numbers a reader compares, when a scenario held."""
    keys = [
        "model_max_abs_diff",
        "metrics_max_abs_diff",
        "aggregate_max_abs_error",
        "server_starts",
        "rss_growth_after_round_2_mb",
        "peak_rss_mb",
        "rounds_per_s",
        "accepted_per_round",
        "volume",
        "missed_rounds",
    ]
    shown = {k: numbers[k] for k in keys if k in numbers}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def plot_load(outcomes: list[ScenarioOutcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for o in outcomes:
        rows = o.numbers.get("per_round", [])
        if rows:
            axis.plot([r["round"] for r in rows], [r["rss_mb"] for r in rows], marker="o", label=o.name)
    axis.set_xlabel("round (the last point: finishing)")
    axis.set_ylabel("tap-server RSS (MB)")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (16 load silos, 30 fuzz cases per handler)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--plot", type=Path, default=None, help="draw the load runs' server memory per round (PNG)")
    parser.add_argument("--load-silos", type=int, default=None, help="silos in the load runs (64; --quick: 16)")
    parser.add_argument("--fuzz-cases", type=int, default=None, help="fuzz cases per handler (1000; --quick: 30)")
    parser.add_argument("--each-point", action="store_true", help="also one federation per server kill point")
    parser.add_argument("--retry-s", type=float, default=None, help="cap the agents' backoff (default: the real 30 s)")
    parser.add_argument(
        "--match",
        nargs="+",
        default=None,
        help="only the fault scenarios whose key contains one of these (e.g. 'server kill' 'network')",
    )
    parser.add_argument("--keep", type=Path, default=None, help="run under this directory and keep it (logs)")
    args = parser.parse_args(argv)
    args.load_silos = args.load_silos or (16 if args.quick else 64)
    args.fuzz_cases = args.fuzz_cases or (30 if args.quick else 1000)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("tap_client", "tap_testing", "tap_server", "tap_core"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # the in-process silos' retries: the table has the verdict

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tap-faults-") as scratch:
        root = args.keep or Path(scratch)
        outcomes: list[ScenarioOutcome] = []
        if "faults" in args.only:
            outcomes += fault_scenarios(root / "faults", args)
        if "attacks" in args.only:
            outcomes += attack_scenarios(args)
        fuzz = fuzz_campaign(args) if "fuzz" in args.only else None
        load = load_scenarios(root / "load", args) if "load" in args.only else []
        outcomes += load
    print_table(outcomes)
    report: dict[str, Any] = {
        "scenarios": [{"name": o.name, "passed": o.passed, "detail": o.detail} for o in outcomes],
        "fuzz_cases": fuzz["cases"] if fuzz else 0,
        "crashes": fuzz["crashes"] if fuzz else 0,
        "internal_errors": fuzz["internal_errors"] if fuzz else 0,
        "aggregate_corruptions": fuzz["aggregate_corruptions"] if fuzz else 0,
        "load_clients": args.load_silos if load else 0,
        "numbers": {o.name: o.numbers for o in outcomes},
        "fuzz": fuzz,
        "command": " ".join(["python", "bench/faults.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": round(time.monotonic() - started, 1),
    }
    if fuzz is not None:
        print(
            f"\nfuzz: {fuzz['cases']} cases, {fuzz['crashes']} crashes, {fuzz['internal_errors']} INTERNAL answers, "
            f"{fuzz['aggregate_corruptions']} aggregate corruptions"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    if args.plot and load:
        plot_load(load, args.plot)
    failed = [o.name for o in outcomes if not o.passed]
    fuzz_bad = bool(fuzz and (fuzz["crashes"] or fuzz["internal_errors"] or fuzz["aggregate_corruptions"]))
    return 1 if failed or fuzz_bad else 0


if __name__ == "__main__":
    sys.exit(main())
