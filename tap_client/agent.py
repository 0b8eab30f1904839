"""``tap-client run``: the agent at a silo. Data never leaves; component tensors and numbers do.

Flow: check the kit -> Hello (identity from the certificate, the federation's
config) -> load local data, build the model -> Join (tasks, sample counts,
base fingerprint) -> poll for assignments: train a round (download, train,
persist, upload), finish (download the final model, stage 2, evaluate, report),
done. Every step that matters is persisted before it is announced, so a restart
of the agent (or of the server) loses nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tap_core.algorithms import get_algorithm
from tap_core.config import FederationConfig, SiloSpec, from_mapping, merge, validate_federation
from tap_core.errors import MOVED_ON, WireError
from tap_core.finite import all_finite
from tap_core.layout import Layout
from tap_core.messages import NOT_JOINED, ClientUpdate
from tap_core.model.tap_model import ComponentValues
from tap_core.plan import plan_from_json
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.runtime import configure_threads, load_silo_data
from tap_core.silo import SiloRuntime
from tap_core.training.trainer import select_device
from tap_core.version import VERSION
from tap_core.wire import StreamDecoder, StreamInfo, encode_frames, layout_from_proto
from tap_client.connection import Connection, Refused, load_kit
from tap_client.export import final_model_metadata
from tap_client.metrics import ClientMetrics
from tap_client.store import ClientStore

log = logging.getLogger(__name__)

POLL_WAIT_S = 20.0
STREAM_TIMEOUT_S = 1800.0


@dataclass
class AgentOptions:
    kit: Path
    server: str
    silo: SiloSpec
    config_path: Path
    state_dir: Path
    device: str | None = None
    threads: int | None = None
    server_name: str | None = None
    metrics_port: int | None = None


@contextlib.contextmanager
def tolerate_moved_on(what: str) -> Iterator[None]:
    """A refusal because the server moved on or already has it (``MOVED_ON``): wait for the next assignment.

    Any other refusal means what was sent is invalid (NaN, shape, weights, size...); the saved copy would be
    re-sent on every poll, so the agent stops instead.
    """
    try:
        yield
    except Refused as exc:
        if exc.reason not in MOVED_ON:
            raise
        log.warning("%s not accepted: %s", what, exc)


class Heartbeats:
    """Tells the server every few seconds that long local work is alive."""

    def __init__(self, connection: Connection, interval: float, activity: str, round_index: int):
        self.connection, self.interval, self.activity, self.round = connection, interval, activity, round_index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tap-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                stub = self.connection.stub
                if stub is not None:
                    stub.Heartbeat(pb.HeartbeatRequest(round=self.round, activity=self.activity), timeout=10)
            except Exception as exc:  # a missed heartbeat is not fatal; the main loop handles the connection
                log.debug("heartbeat failed: %s", exc)

    def __enter__(self) -> "Heartbeats":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class Agent:
    def __init__(self, options: AgentOptions):
        self.options = options
        self.kit = load_kit(options.kit)
        self.connection = Connection(self.kit, options.server, server_name=options.server_name)
        self.store = ClientStore(options.state_dir)
        self.metrics = ClientMetrics(options.metrics_port) if options.metrics_port is not None else None
        self.config: FederationConfig | None = None
        self.runtime: SiloRuntime | None = None
        self._restored: ComponentValues | None = None

    @property
    def federation_config(self) -> FederationConfig:
        """The federation's config, from Hello."""
        assert self.config is not None, "hello() first"
        return self.config

    @property
    def silo_runtime(self) -> SiloRuntime:
        assert self.runtime is not None, "prepare() first"
        return self.runtime

    # -- set-up -------------------------------------------------------------------

    def hello(self) -> None:
        response = self.connection.call("hello", lambda s: s.Hello(pb.HelloRequest(client_version=VERSION), timeout=30))
        config = from_mapping(FederationConfig, json.loads(response.federation_json), "federation (from the server)")
        overrides = {"device": self.options.device, "threads": self.options.threads}
        config = dataclasses.replace(config, train=merge(config.train, overrides))
        validate_federation(config)
        self.config = config
        self.silo_id = response.silo_id
        self.store.claim(response.federation_id, response.silo_id)
        self.heartbeat_s = max(1.0, response.heartbeat_interval_s)
        self.connection.open(config)  # the federation's message limits
        log.info(
            "hello: this is silo %s; federation %s runs %s for %d rounds",
            self.silo_id,
            config.name,
            config.algorithm,
            config.rounds,
        )

    def prepare(self) -> None:
        config = self.federation_config
        configure_threads(config.train.threads)
        device = select_device(config.train.device)
        silo = dataclasses.replace(self.options.silo, id=self.silo_id)
        data = load_silo_data(silo, config, str(self.options.config_path))
        self.runtime = SiloRuntime(silo, data, config, device)
        self.algorithm = get_algorithm(config)
        saved = self.store.load_silo()
        if saved is not None:
            _, state, personal = saved  # claim() already checked the directory belongs to this silo
            self.silo_runtime.state = state
            self._restored = personal
            log.info("resumed local state: rounds done %s", state.rounds_done)

    def join(self) -> None:
        declaration = json.dumps(self.silo_runtime.declaration().to_json())
        self.connection.call(
            "join", lambda s: s.Join(pb.JoinRequest(declaration_json=declaration, client_version=VERSION), timeout=60)
        )
        log.info("joined the federation")

    # -- the loop -------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.connection.close()

    def _run(self) -> int:
        self.hello()
        self.prepare()
        self.join()
        while True:
            assignment = self.connection.call(
                "poll", lambda s: s.Poll(pb.PollRequest(wait_s=POLL_WAIT_S), timeout=POLL_WAIT_S + 30)
            )
            if assignment.action == pb.Assignment.WAIT and assignment.message == NOT_JOINED:
                log.info("the server does not know this silo (it restarted before the federation began): joining again")
                self.join()
                continue
            if assignment.plan_json:
                self.silo_runtime.set_plan(plan_from_json(json.loads(assignment.plan_json)))
                self._restore_personal()
            if assignment.action == pb.Assignment.TRAIN:
                self.train_round(assignment.round, layout_from_proto(assignment.layout))
            elif assignment.action == pb.Assignment.FINISH:
                self.finish(assignment.round, layout_from_proto(assignment.layout))
            elif assignment.action == pb.Assignment.DONE:
                log.info("federation done; results in %s", self.options.state_dir / "results.json")
                return 0

    def _restore_personal(self) -> None:
        if self._restored is not None:
            self.silo_runtime.personal.load_values(self._restored)
            self._restored = None

    def train_round(self, round_index: int, layout: Layout) -> None:
        runtime = self.silo_runtime
        update = self.store.load_update(self.silo_id, round_index) if round_index in runtime.state.rounds_done else None
        if update is None:
            values = self.download(round_index, layout)
            with Heartbeats(self.connection, self.heartbeat_s, f"training round {round_index}", round_index):
                update = self.algorithm.local_round(runtime, round_index, values)
            runtime.state.rounds_done.append(round_index)
            # persist before announcing: the upload can be repeated, training is not
            self.store.save_update(update)
            personal = runtime.personal.values() if runtime.has_personal else None
            self.store.save_silo(self.silo_id, runtime.state, personal, round_index)
            if self.metrics:
                self.metrics.record_round(update)
        else:
            log.info("round %d was trained before a restart: re-sending the saved update", round_index)
        self.upload(update, layout)

    def finish(self, round_index: int, layout: Layout) -> None:
        result = self.store.load_results()
        if result is None:
            values = self.download(round_index, layout)
            with Heartbeats(self.connection, self.heartbeat_s, "stage 2", round_index):
                result, model = self.algorithm.finish(self.silo_runtime, values)
            self.store.save_results(
                result, model.values(), final_model_metadata(self.silo_runtime, self.federation_config)
            )
            if self.metrics:
                self.metrics.record_result(result)
        payload = json.dumps(result.to_json())
        with tolerate_moved_on("results"):
            self.connection.call(
                "report results", lambda s: s.ReportResults(pb.ResultsRequest(results_json=payload), timeout=60)
            )
        for task in result.tasks:
            log.info("final %s: %s", task.task, {k: round(v, 4) for k, v in task.metrics.items()})

    # -- tensor streams -------------------------------------------------------------

    def download(self, round_index: int, layout: Layout) -> ComponentValues:
        def fetch(stub) -> ComponentValues:
            decoder = StreamDecoder(layout, self.federation_config.wire.dtype)
            for frame in stub.Download(pb.DownloadRequest(round=round_index), timeout=STREAM_TIMEOUT_S):
                decoder.feed(frame)
            values = decoder.finish()
            for component, tensors in values.items():
                for name, tensor in tensors.items():
                    if not all_finite(tensor):
                        raise WireError("non_finite", f"server sent non-finite values in {component}/{name}")
            return values

        return self.connection.call(f"download round {round_index}", fetch)

    def upload(self, update: ClientUpdate, layout: Layout) -> None:
        cfg = self.federation_config.wire
        info = StreamInfo(update.round, json.dumps(update.stats.to_json()), update.weights)

        def send(stub):
            frames = encode_frames(update.values, layout, cfg.dtype, cfg.chunk_bytes, info)
            return stub.Upload(frames, timeout=STREAM_TIMEOUT_S)

        with tolerate_moved_on(f"upload of round {update.round}"):
            ack = self.connection.call(f"upload round {update.round}", send)
            log.info("round %d uploaded (%d bytes)", update.round, ack.payload_bytes)
