"""A synthetic federation for transport benchmarks: components of a chosen size, training replaced by a no-op.

Activated only by starting a process through this module (``bench/transport.py`` does)::

    python -m tap_testing.synthetic --mb 100 --events DIR/server.jsonl server serve --kit ... --exit-when-done
    python -m tap_testing.synthetic --events DIR/s00.jsonl --gate DIR/gate client run --kit ... --server ...

The rest of the command line goes to ``tap-server`` / ``tap-client`` unchanged, so the
real daemon, servicer, agent, codec, validation and aggregation run; only these change:

- server: the global model is ``--mb`` MB of random fp32 tensors spread over the plan's
  real component names (so every silo's layout, selection and weights are the real ones);
- agent: a round's "training" returns the downloaded values unchanged (no optimizer step),
  and stage 2 evaluates the untouched model (the synthetic values do not fit it);
- both: a JSON line per event (download/upload start and end, update submitted, round closed) with
  ``time.monotonic()`` (one clock for every process of the machine) and the process's
  peak RSS since the previous event of the same kind (``/proc/self/clear_refs``);
- agent, with ``--gate``: after downloading round *r* it waits for the file
  ``GATE/round-r`` before uploading, so the bench can run its raw gRPC comparison
  between the two directions of the same round.

Nothing in a deployed server or agent imports this module.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from tap_core.layout import Layout
from tap_core.messages import ClientUpdate, RoundStats
from tap_core.model.tap_model import ComponentValues

BIG_TENSOR_ELEMENTS = 512 * 512  # 1 MiB of fp32: most bytes travel in tensors of this size
GATE_POLL_S = 0.01


# ------------------------------------------------------------------------- measurement


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # pragma: no cover - not Linux / not permitted: the peak then spans the whole process
        pass


class EventLog:
    """JSON lines: one per event, flushed at once (the bench reads them while the process runs)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, event: str, reset_peak: bool = False, **fields: Any) -> None:
        record = {
            "event": event,
            "t": time.monotonic(),
            "rss_mb": _proc_status_mb("VmRSS"),
            "peak_rss_mb": _proc_status_mb("VmHWM"),
            **fields,
        }
        if reset_peak:
            reset_peak_rss()
        with self._lock, open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------- server side


def synthetic_layout(components: list[str], megabytes: float) -> Layout:
    """``megabytes`` MB of fp32 spread evenly over ``components``: 1 MiB tensors, plus a small vector and a scalar each."""
    per_component = int(megabytes * 1e6 / 4 / max(1, len(components)))
    layout: Layout = {}
    for component in components:
        tensors: list[tuple[str, tuple[int, ...]]] = [("bias", (64,)), ("scale", ())]
        left = max(0, per_component - 65)
        index = 0
        while left > 0:
            take = min(left, BIG_TENSOR_ELEMENTS)
            tensors.append((f"w{index:05d}", (take // 512, 512) if take % 512 == 0 else (take,)))
            left -= take
            index += 1
        layout[component] = sorted(tensors)
    return layout


def synthetic_values(layout: Layout, seed: int = 0) -> ComponentValues:
    generator = torch.Generator().manual_seed(seed)
    return {
        c: {name: torch.randn(shape, generator=generator) for name, shape in tensors} for c, tensors in layout.items()
    }


class SyntheticModel:
    """Stands in for ``TapModel`` inside ``Federation._start``: the plan's components, synthetic tensors."""

    megabytes = 10.0

    def __init__(self, plan, backbone, seed: int):
        self._layout = synthetic_layout(plan.components, self.megabytes)
        self._values = synthetic_values(self._layout, seed)

    def layout(self) -> Layout:
        return self._layout

    def values(self) -> ComponentValues:
        return self._values


def install_server_hooks(megabytes: float, events: EventLog) -> None:
    import tap_server.federation as federation_module

    SyntheticModel.megabytes = megabytes
    federation_module.TapModel = SyntheticModel  # type: ignore[misc,assignment]
    federation = federation_module.Federation
    original_start, original_close, original_submit = (
        federation._start,
        federation._close_round,
        federation.submit_update,
    )

    def start(self) -> None:
        original_start(self)
        events.write("started", reset_peak=True)

    def close_round(self) -> None:
        round_index = self.status().round
        started = time.monotonic()
        original_close(self)
        events.write(
            "round_closed",
            reset_peak=True,
            round=round_index,
            close_start=started,
            close_seconds=time.monotonic() - started,
        )

    def submit_update(self, update) -> None:
        events.write("submit_start", round=update.round, silo=update.silo)
        original_submit(self, update)
        events.write("submit_end", round=update.round, silo=update.silo)

    federation._start = start  # type: ignore[method-assign]
    federation.submit_update = submit_update  # type: ignore[method-assign]
    federation._close_round = close_round  # type: ignore[method-assign]


# ------------------------------------------------------------------------- agent side


class NoOpTraining:
    """An algorithm whose round sends back what it downloaded; stage 2 evaluates the model as it is."""

    federated = True

    def __init__(self, config, events: EventLog, gate: Path | None):
        self.config, self.events, self.gate = config, events, gate

    def local_round(self, silo, round_index: int, global_values: ComponentValues) -> ClientUpdate:
        if self.gate is not None:
            self.events.write("waiting", round=round_index)
            signal = self.gate / f"round-{round_index}"
            while not signal.exists():
                time.sleep(GATE_POLL_S)
        components = list(global_values)
        stats = RoundStats(task_losses={task.name: 1.0 for task in silo.plan.tasks})
        return ClientUpdate(silo.id, round_index, global_values, silo.component_weights(components), stats)

    def finish(self, silo, final_values: ComponentValues):
        from tap_core.messages import SiloResult

        model = silo.personal
        return SiloResult(silo=silo.id, tasks=silo.evaluate(model)), model


def install_agent_hooks(events: EventLog, gate: Path | None) -> None:
    import tap_client.agent as agent_module

    agent = agent_module.Agent
    original_download, original_upload = agent.download, agent.upload
    agent_module.get_algorithm = lambda config: NoOpTraining(config, events, gate)  # type: ignore[assignment,return-value]

    def download(self, round_index: int, layout: Layout) -> ComponentValues:
        events.write("download_start", reset_peak=True, round=round_index)
        values = original_download(self, round_index, layout)
        nbytes = sum(t.numel() * t.element_size() for tensors in values.values() for t in tensors.values())
        events.write("download_end", round=round_index, bytes=nbytes)
        return values

    def upload(self, update: ClientUpdate, layout: Layout) -> None:
        events.write("upload_start", round=update.round)
        original_upload(self, update, layout)
        events.write("upload_end", round=update.round)

    agent.download = download  # type: ignore[method-assign]
    agent.upload = upload  # type: ignore[method-assign]


# ------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=10.0, help="server: MB of fp32 in the global model")
    parser.add_argument("--events", type=Path, required=True, help="JSON lines of this process's events")
    parser.add_argument("--gate", type=Path, default=None, help="agent: wait for GATE/round-N before uploading")
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="tap-server / tap-client arguments")
    args = parser.parse_args(argv)
    events = EventLog(args.events)
    if args.role == "server":
        from tap_server.cli import main as cli

        install_server_hooks(args.mb, events)
    else:
        from tap_client.cli import main as cli

        install_agent_hooks(events, args.gate)
    cli.main(args=args.args, prog_name=f"tap-{args.role} (synthetic)")


if __name__ == "__main__":
    main(sys.argv[1:])
