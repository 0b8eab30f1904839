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
from tap_core.runtime import Stopwatch, configure_threads
from tap_core.silo import SiloRuntime
from tap_core.silo_pool import InProcessSilos, SiloPool, open_pool
from tap_core.training.trainer import select_device
from tap_core.wire_dtype import quantize
from tap_server.federation import FINISHING, TRAINING, Federation

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, dict[str, Any]], None]


def run_simulation(
    scenario: Scenario, config: FederationConfig, progress: ProgressFn | None = None, workers: int = 1
) -> dict[str, Any]:
    """Load every silo's data (all of it first: nothing trains on a half-valid scenario), then run.

    ``workers`` > 1 runs the silos in that many worker processes (tap_core.silo_pool); the report is the same.
    """
    clock = Stopwatch()
    configure_threads(config.train.threads)
    device = select_device(config.train.device)
    with open_pool(scenario.silos, config, workers, scenario.source or scenario.name) as pool:
        if progress:
            progress("data", {"seconds": clock.seconds()})
        report = run_federation(pool, config, progress)
    report["timing"]["total_seconds"] = clock.seconds()
    report["timing"]["device"] = str(device)
    report["timing"]["workers"] = pool.workers
    return report


def run_federation(
    silos: dict[str, SiloRuntime] | SiloPool,
    config: FederationConfig,
    progress: ProgressFn | None = None,
    federation: Federation | None = None,
) -> dict[str, Any]:
    """Drive ``federation`` (a fresh one by default) with the silos until done; returns the report."""
    notify = progress or (lambda event, info: None)
    pool = silos if isinstance(silos, SiloPool) else InProcessSilos(silos, get_algorithm(config))
    federation = federation or Federation(config, expected_silos=len(pool.silo_ids))
    for declaration in pool.declarations():
        federation.register(declaration)
    pool.set_plans({silo_id: federation.silo_plan(silo_id) for silo_id in pool.silo_ids})
    dtype = config.wire.dtype

    while (status := federation.status()).phase == TRAINING:
        round_index = status.round
        payloads = {
            silo_id: quantize(federation.payload(silo_id, round_index).values, dtype) for silo_id in status.selected
        }
        for update in pool.local_rounds(round_index, payloads):
            update.values = quantize(update.values, dtype)
            federation.submit_update(update)
            notify("update", {"round": round_index, "silo": update.silo, "losses": update.stats.task_losses})
        notify("round", {"round": round_index})

    assert status.phase == FINISHING, status.phase
    payloads = {
        silo_id: quantize(federation.payload(silo_id, status.round).values, dtype) for silo_id in sorted(pool.silo_ids)
    }
    for result in pool.finish(payloads):
        federation.submit_result(result)
        notify("result", {"silo": result.silo, "primary": [t.primary for t in result.tasks]})
    return federation.report()
