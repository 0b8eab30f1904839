"""``tap simulate``: the whole federation in one process, through the same logic as the deployed system.

The server side is :class:`tap_server.federation.Federation`, the silos are
:class:`tap_core.silo.SiloRuntime`; payloads pass through the wire dtype's
rounding exactly as they would over gRPC, so a deployed run with the same
scenario, algorithm and seed reproduces these numbers.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from tap_core.algorithms import get_algorithm
from tap_core.config import FederationConfig, Scenario
from tap_core.runtime import Stopwatch, configure_threads, load_silo_data
from tap_core.silo import SiloRuntime
from tap_core.training.trainer import select_device
from tap_core.wire_dtype import quantize
from tap_server.federation import FINISHING, TRAINING, Federation

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, dict[str, Any]], None]


def run_simulation(scenario: Scenario, config: FederationConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Load every silo's data (all of it first: nothing trains on a half-valid scenario), then run."""
    clock = Stopwatch()
    configure_threads(config.train.threads)
    device = select_device(config.train.device)
    data = {silo.id: load_silo_data(silo, config, scenario.source or scenario.name) for silo in scenario.silos}
    if progress:
        progress("data", {"seconds": clock.seconds()})
    silos = {silo.id: SiloRuntime(silo, data[silo.id], config, device) for silo in scenario.silos}
    report = run_federation(silos, config, progress)
    report["timing"]["total_seconds"] = clock.seconds()
    report["timing"]["device"] = str(device)
    return report


def run_federation(silos: dict[str, SiloRuntime], config: FederationConfig, progress: ProgressFn | None = None,
                   federation: Federation | None = None) -> dict[str, Any]:
    """Drive ``federation`` (a fresh one by default) with in-process silos until done; returns the report."""
    notify = progress or (lambda event, info: None)
    federation = federation or Federation(config, expected_silos=len(silos))
    for runtime in silos.values():
        federation.register(runtime.declaration())
    for silo_id, runtime in silos.items():
        runtime.set_plan(federation.silo_plan(silo_id))
    algorithm = get_algorithm(config)
    dtype = config.wire.dtype

    while (status := federation.status()).phase == TRAINING:
        round_index = status.round
        for silo_id in status.selected:
            values = quantize(federation.payload(silo_id, round_index).values, dtype)
            update = algorithm.local_round(silos[silo_id], round_index, values)
            update.values = quantize(update.values, dtype)
            federation.submit_update(update)
            notify("update", {"round": round_index, "silo": silo_id, "losses": update.stats.task_losses})
        notify("round", {"round": round_index})

    assert status.phase == FINISHING, status.phase
    for silo_id in sorted(silos):
        values = quantize(federation.payload(silo_id, status.round).values, dtype)
        result, _ = algorithm.finish(silos[silo_id], values)
        federation.submit_result(result)
        notify("result", {"silo": silo_id, "primary": [t.primary for t in result.tasks]})
    return federation.report()
