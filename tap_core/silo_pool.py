"""Where the silos of a simulated federation do their work: in this process, or in worker processes.

A silo's work in a round is one call with plain inputs and outputs —
:func:`silo_round` (runtime, algorithm, round, global values) -> :class:`ClientUpdate`
and :func:`silo_finish` (runtime, algorithm, final values) -> :class:`SiloResult` —
so it can run wherever the silo's runtime lives:

- :class:`InProcessSilos`: every runtime in this process, one silo after another
  (``tap simulate --workers 1``, the tests).
- :class:`ProcessSilos`: ``workers`` spawned processes, each holding the runtimes
  of the silos assigned to it for the whole run (its data loaded once), each with
  the configured torch thread count. Every random draw is seeded by name
  (tap_core.seeding) and the results come back in the order a sequential run
  produces them, so the report is bitwise the same as with one worker.

Messages between the processes are JSON headers and safetensors blobs, no pickle:
the same plain data that a distributed engine (Ray, see ROADMAP.md) would move.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import struct
import threading
import time
import traceback
from abc import ABC, abstractmethod
from multiprocessing.connection import Connection, wait
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from tap_core import errors
from tap_core.algorithms import Algorithm, get_algorithm
from tap_core.config import FederationConfig, SiloSpec, from_mapping, to_mapping
from tap_core.messages import ClientUpdate, RoundStats, SiloDeclaration, SiloResult
from tap_core.model.tap_model import ComponentValues, ModelPlan
from tap_core.silo import SiloRuntime

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# The per-silo work: plain inputs, plain outputs.


def silo_round(runtime: SiloRuntime, algorithm: Algorithm, round_index: int, values: ComponentValues) -> ClientUpdate:
    """One silo's work in one round, from the server's values of its shared components."""
    return algorithm.local_round(runtime, round_index, values)


def silo_finish(runtime: SiloRuntime, algorithm: Algorithm, values: ComponentValues) -> SiloResult:
    """Stage 2 and evaluation, from the final global values; the final model stays with the runtime."""
    result, _ = algorithm.finish(runtime, values)
    return result


class SiloPool(ABC):
    """The silos of one federation, wherever they run. Results always come back in the order asked."""

    workers: int = 1

    @property
    @abstractmethod
    def silo_ids(self) -> list[str]: ...

    @abstractmethod
    def declarations(self) -> list[SiloDeclaration]: ...

    @abstractmethod
    def set_plans(self, plans: dict[str, ModelPlan]) -> None: ...

    @abstractmethod
    def local_rounds(self, round_index: int, payloads: dict[str, ComponentValues]) -> Iterator[ClientUpdate]:
        """Every listed silo's update for ``round_index``, yielded in ``payloads``' order."""

    @abstractmethod
    def finish(self, payloads: dict[str, ComponentValues]) -> Iterator[SiloResult]:
        """Every listed silo's results, yielded in ``payloads``' order."""

    def close(self) -> None:  # noqa: B027 - optional: the in-process pool holds nothing to release
        pass

    def __enter__(self) -> "SiloPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessSilos(SiloPool):
    """Runtimes in this process, run one after another."""

    def __init__(self, runtimes: dict[str, SiloRuntime], algorithm: Algorithm):
        self.runtimes = runtimes
        self.algorithm = algorithm

    @property
    def silo_ids(self) -> list[str]:
        return list(self.runtimes)

    def declarations(self) -> list[SiloDeclaration]:
        return [runtime.declaration() for runtime in self.runtimes.values()]

    def set_plans(self, plans: dict[str, ModelPlan]) -> None:
        for silo_id, plan in plans.items():
            self.runtimes[silo_id].set_plan(plan)

    def local_rounds(self, round_index: int, payloads: dict[str, ComponentValues]) -> Iterator[ClientUpdate]:
        for silo_id, values in payloads.items():
            yield silo_round(self.runtimes[silo_id], self.algorithm, round_index, values)

    def finish(self, payloads: dict[str, ComponentValues]) -> Iterator[SiloResult]:
        for silo_id, values in payloads.items():
            yield silo_finish(self.runtimes[silo_id], self.algorithm, values)


# ---------------------------------------------------------------------------
# Messages: an 8-byte header length, a JSON header, then a safetensors blob of component values.


def encode(header: dict[str, Any], values: ComponentValues | None = None) -> bytes:
    layout: list[list[str]] = []
    tensors: dict[str, torch.Tensor] = {}
    for component, named in (values or {}).items():
        for name, tensor in named.items():
            tensors[str(len(layout))] = tensor.detach().to("cpu").contiguous()
            layout.append([component, name])
    head = json.dumps({**header, "layout": layout}).encode()
    return struct.pack("<Q", len(head)) + head + (save_tensors(tensors) if tensors else b"")


def decode(frame: bytes) -> tuple[dict[str, Any], ComponentValues]:
    (size,) = struct.unpack_from("<Q", frame)
    header = json.loads(frame[8 : 8 + size])
    values: ComponentValues = {}
    if header["layout"]:
        tensors = load_tensors(frame[8 + size :])
        for i, (component, name) in enumerate(header["layout"]):
            values.setdefault(component, {})[name] = tensors[str(i)]
    return header, values


def update_header(update: ClientUpdate) -> dict[str, Any]:
    return {"silo": update.silo, "round": update.round, "weights": update.weights, "stats": update.stats.to_json()}


def update_from(header: dict[str, Any], values: ComponentValues) -> ClientUpdate:
    return ClientUpdate(
        header["silo"],
        int(header["round"]),
        values,
        {k: float(v) for k, v in header["weights"].items()},
        RoundStats.from_json(header["stats"]),
    )


class WorkerFailed(errors.TapError):
    """A worker process died or failed in a way that is not one of the project's own errors."""


def error_header(exc: BaseException) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}}


def raise_error(error: dict[str, Any]) -> None:
    """Re-raise a worker's error here: the project's own errors keep their class and message."""
    cls = getattr(errors, error["type"], None)
    if isinstance(cls, type) and issubclass(cls, errors.TapError):
        exc = cls.__new__(cls)
        Exception.__init__(exc, error["message"])
        if isinstance(exc, errors.ConfigError):  # attributes its __init__ would have set
            exc.where, exc.problem, exc.fix = "", error["message"], None
        if isinstance(exc, errors.WireError):
            exc.reason = "worker"
        raise exc
    log.error("worker traceback:\n%s", error["traceback"])
    raise WorkerFailed(f"a silo worker failed: {error['type']}: {error['message']}")


# ---------------------------------------------------------------------------
# Worker process.


def exit_with_parent(parent: int, every_s: float = 2.0) -> None:
    """End this worker when the driver is gone (killed without closing the pool): no orphan keeps training."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(conn: Connection, config_json: str, silos_json: str, where: str, log_level: int, parent: int) -> None:
    """Load the assigned silos' data, then answer requests until told to stop (runs in a spawned process)."""
    from tap_core.runtime import configure_threads, load_silo_data
    from tap_core.training.trainer import select_device

    exit_with_parent(parent)
    logging.basicConfig(level=log_level, format="%(asctime)s worker %(levelname)s %(message)s", datefmt="%H:%M:%S")
    runtimes: dict[str, SiloRuntime] = {}
    try:
        config = from_mapping(FederationConfig, json.loads(config_json), "federation")
        configure_threads(config.train.threads)
        device = select_device(config.train.device)
        algorithm = get_algorithm(config)
        silos = [from_mapping(SiloSpec, s, "silo") for s in json.loads(silos_json)]
        for silo in silos:
            runtimes[silo.id] = SiloRuntime(silo, load_silo_data(silo, config, where), config, device)
        conn.send_bytes(encode({"declarations": [r.declaration().to_json() for r in runtimes.values()]}))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the driver
        conn.send_bytes(encode(error_header(exc)))
        return
    while True:
        try:
            header, values = decode(conn.recv_bytes())
        except EOFError:
            return
        command = header["cmd"]
        if command == "stop":
            return
        try:
            runtime = runtimes[header["silo"]]
            if command == "plan":
                runtime.set_plan(from_mapping(ModelPlan, header["plan"], "plan"))
                reply = encode({"ok": True})
            elif command == "round":
                update = silo_round(runtime, algorithm, int(header["round"]), values)
                reply = encode(update_header(update), update.values)
            else:  # finish
                reply = encode({"result": silo_finish(runtime, algorithm, values).to_json()})
        except BaseException as exc:  # noqa: BLE001
            reply = encode(error_header(exc))
        conn.send_bytes(reply)


# ---------------------------------------------------------------------------
# Driver side.


def default_workers(threads: int, silos: int) -> int:
    """As many workers as the CPUs allow at ``threads`` each, at most one per silo."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores // max(threads, 1), silos))


def silo_cost(silo: SiloSpec) -> int:
    """A rough relative cost of one silo's step: one per task, plus one per modality tower it reads."""
    return sum(1 + len(task.modalities) for task in silo.tasks)


def assign(silos: Iterable[SiloSpec], workers: int) -> list[list[SiloSpec]]:
    """Sticky silo -> worker assignment balancing the estimated cost (longest first onto the least loaded)."""
    groups: list[list[SiloSpec]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for silo in sorted(silos, key=lambda s: (-silo_cost(s), s.id)):
        target = loads.index(min(loads))
        groups[target].append(silo)
        loads[target] += silo_cost(silo)
    return [group for group in groups if group]


class ProcessSilos(SiloPool):
    """Silos spread over spawned worker processes; each worker keeps its silos' runtimes for the whole run."""

    def __init__(self, silos: Iterable[SiloSpec], config: FederationConfig, workers: int, where: str = ""):
        silos = list(silos)
        self._order = [silo.id for silo in silos]
        self._groups = assign(silos, workers)
        self.workers = len(self._groups)
        context = multiprocessing.get_context("spawn")  # no fork: torch's thread pools do not survive it
        self._conns: list[Connection] = []
        self._processes = []
        self._owner: dict[str, int] = {}
        self._failed = False  # after a failure close() does not wait for workers still busy
        config_json = json.dumps(to_mapping(config))
        for index, group in enumerate(self._groups):
            parent, child = context.Pipe()
            process = context.Process(
                target=worker_main,
                name=f"tap-silo-worker-{index}",
                daemon=True,
                args=(
                    child,
                    config_json,
                    json.dumps([to_mapping(s) for s in group]),
                    where,
                    logging.getLogger().getEffectiveLevel(),
                    os.getpid(),
                ),
            )
            process.start()
            child.close()
            self._conns.append(parent)
            self._processes.append(process)
            for silo in group:
                self._owner[silo.id] = index
        self._declarations: dict[str, SiloDeclaration] = {}
        try:
            for index in range(self.workers):  # every worker loads its data before anything trains
                for decl in self._receive(index)["declarations"]:
                    self._declarations[decl["silo"]] = SiloDeclaration.from_json(decl)
        except BaseException:
            self.close()
            raise

    @property
    def silo_ids(self) -> list[str]:
        return list(self._order)

    def _receive(self, index: int) -> dict[str, Any]:
        try:
            frame = self._conns[index].recv_bytes()
        except EOFError:
            self._failed = True
            self._processes[index].join(5)
            code = self._processes[index].exitcode
            raise WorkerFailed(f"silo worker {index} exited unexpectedly (exit code {code})") from None
        header, values = decode(frame)
        if "error" in header:
            self._failed = True
            raise_error(header["error"])
        header["values"] = values
        return header

    def _run(self, requests: dict[str, bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Send each silo's request to its worker (one in flight per worker), yield replies in the order asked."""
        queues: dict[int, list[str]] = {}
        for silo_id in requests:
            queues.setdefault(self._owner[silo_id], []).append(silo_id)
        busy: dict[int, str] = {}

        def feed(index: int) -> None:
            if queues.get(index):
                silo_id = queues[index].pop(0)
                self._conns[index].send_bytes(requests[silo_id])
                busy[index] = silo_id

        for index in queues:
            feed(index)
        done: dict[str, dict[str, Any]] = {}
        for silo_id in requests:
            while silo_id not in done:
                ready = wait([self._conns[i] for i in busy])
                for conn in ready:
                    index = self._conns.index(conn)  # type: ignore[arg-type]  # wait() returns our connections
                    done[busy.pop(index)] = self._receive(index)
                    feed(index)
            yield silo_id, done.pop(silo_id)

    def declarations(self) -> list[SiloDeclaration]:
        return [self._declarations[silo_id] for silo_id in self._order]

    def set_plans(self, plans: dict[str, ModelPlan]) -> None:
        requests = {s: encode({"cmd": "plan", "silo": s, "plan": to_mapping(plan)}) for s, plan in plans.items()}
        for _ in self._run(requests):
            pass

    def local_rounds(self, round_index: int, payloads: dict[str, ComponentValues]) -> Iterator[ClientUpdate]:
        requests = {s: encode({"cmd": "round", "silo": s, "round": round_index}, v) for s, v in payloads.items()}
        for _, header in self._run(requests):
            yield update_from(header, header.pop("values"))

    def finish(self, payloads: dict[str, ComponentValues]) -> Iterator[SiloResult]:
        requests = {s: encode({"cmd": "finish", "silo": s}, v) for s, v in payloads.items()}
        for _, header in self._run(requests):
            yield SiloResult.from_json(header["result"])

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send_bytes(encode({"cmd": "stop"}))
            except (OSError, ValueError):
                pass
        for process in self._processes:
            process.join(timeout=1 if self._failed else 60)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._processes = [], []


def open_pool(silos: Iterable[SiloSpec], config: FederationConfig, workers: int, where: str = "") -> SiloPool:
    """``workers`` == 1: every silo in this process (data loaded here); more: worker processes."""
    silos = list(silos)
    if workers <= 1 or len(silos) <= 1:
        from tap_core.runtime import load_silo_data
        from tap_core.training.trainer import select_device

        device = select_device(config.train.device)
        data = {silo.id: load_silo_data(silo, config, where) for silo in silos}
        runtimes = {silo.id: SiloRuntime(silo, data[silo.id], config, device) for silo in silos}
        return InProcessSilos(runtimes, get_algorithm(config))
    return ProcessSilos(silos, config, workers, where)


__all__ = ["InProcessSilos", "ProcessSilos", "SiloPool", "default_workers", "open_pool", "silo_finish", "silo_round"]
