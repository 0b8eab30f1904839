"""Light silos: the real protocol over mTLS (Hello, Join, Poll, Download, Upload, ReportResults), trivial training.

A :class:`LightSilo` is a thread that does what ``tap-client run`` does on the
wire, through the agent's own :class:`~tap_client.connection.Connection` (same
retries, same refusal handling) and the wire codec, but "trains" by adding a
fixed ``shift`` to every value it downloaded. The server cannot tell it from a
real agent, yet it costs no model, no data and almost no CPU, so one process
can hold 64 of them (the load test), and the aggregate they must produce is
known exactly: the sample-weighted mean of the shifts is added to the global
model every round.

A silo can also misbehave on purpose (``vanish_after``: stop answering after
downloading a round, as a machine that died) — the server must then drop it at
the deadline, never hang.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tap_client.connection import Connection, Refused, load_kit
from tap_core.config import FederationConfig, from_mapping
from tap_core.errors import MOVED_ON
from tap_core.layout import Layout
from tap_core.messages import NOT_JOINED
from tap_core.model.tap_model import ComponentValues
from tap_core.plan import component_weights, plan_from_json
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.wire import StreamDecoder, StreamInfo, encode_frames, layout_from_proto
from tap_testing.harness import IMAGE_TASK

log = logging.getLogger(__name__)

LABELS = ["circle", "square", "triangle"]
POLL_WAIT_S = 10.0


def fingerprint_of(config: FederationConfig) -> str:
    from tap_core.model import build_backbone

    return build_backbone(config.model).fingerprint


@dataclass
class SiloLog:
    """What one light silo did (read by the scenarios)."""

    rounds: list[int] = field(default_factory=list)  # rounds whose update the server accepted
    first_values: ComponentValues | None = None  # what it downloaded in its first round
    final_values: ComponentValues | None = None  # the final model it downloaded
    finished: bool = False
    error: str | None = None
    seconds: float = 0.0


class LightSilo(threading.Thread):
    def __init__(
        self,
        kit: Path,
        address: str,
        fingerprint: str,
        *,
        shift: float,
        samples: int = 10,
        task: dict[str, Any] = IMAGE_TASK,
        vanish_after: int | None = None,
        give_up_after_s: float = 600.0,
    ):
        self.kit = load_kit(kit)
        super().__init__(name=f"light-{self.kit.silo}", daemon=True)
        self.connection = Connection(self.kit, address, give_up_after_s=give_up_after_s)
        self.fingerprint, self.shift, self.samples, self.task = fingerprint, shift, samples, task
        self.vanish_after = vanish_after  # stop after downloading this round (a silo that died)
        self.config = FederationConfig()
        self.record = SiloLog()
        self.stopped = threading.Event()

    @property
    def silo(self) -> str:
        return self.kit.silo

    def run(self) -> None:
        started = time.monotonic()
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - the scenario reports it
            self.record.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.record.seconds = time.monotonic() - started
            self.connection.close()

    def stop(self) -> None:
        self.stopped.set()

    # ------------------------------------------------------------ the agent's loop, trivially

    def _run(self) -> None:
        hello = self.connection.call("hello", lambda s: s.Hello(pb.HelloRequest(client_version="light"), timeout=30))
        self.config = from_mapping(FederationConfig, json.loads(hello.federation_json), "federation")
        self.connection.open(self.config)
        self._join()
        while not self.stopped.is_set():
            assignment = self.connection.call(
                "poll", lambda s: s.Poll(pb.PollRequest(wait_s=POLL_WAIT_S), timeout=POLL_WAIT_S + 30)
            )
            if assignment.action == pb.Assignment.WAIT and assignment.message == NOT_JOINED:
                self._join()
            elif assignment.action == pb.Assignment.TRAIN:
                self._train(assignment)
            elif assignment.action == pb.Assignment.FINISH:
                self._finish(assignment)
            elif assignment.action == pb.Assignment.DONE:
                self.record.finished = True
                return

    def _join(self) -> None:
        declaration = json.dumps(
            {
                "silo": self.silo,
                "tasks": [self.task],
                "train_samples": {self.task["name"]: self.samples},
                "labels_seen": {self.task["name"]: LABELS},
                "fingerprint": self.fingerprint,
                "device": "cpu",
            }
        )
        self.connection.call("join", lambda s: s.Join(pb.JoinRequest(declaration_json=declaration), timeout=60))

    def _download(self, round_index: int, layout: Layout) -> ComponentValues:
        def fetch(stub) -> ComponentValues:
            decoder = StreamDecoder(layout, self.config.wire.dtype)
            for frame in stub.Download(pb.DownloadRequest(round=round_index), timeout=120):
                decoder.feed(frame)
            return decoder.finish()

        return self.connection.call(f"download round {round_index}", fetch)

    def _train(self, assignment: pb.Assignment) -> None:
        round_index, layout = assignment.round, layout_from_proto(assignment.layout)
        values = self._download(round_index, layout)
        if self.record.first_values is None:
            self.record.first_values = values
        if self.vanish_after is not None and round_index >= self.vanish_after:
            self.stopped.set()  # died after downloading: no upload, no more calls
            return
        update = {c: {n: t + self.shift for n, t in tensors.items()} for c, tensors in values.items()}
        plan = plan_from_json(json.loads(assignment.plan_json))
        weights = component_weights(plan, {self.task["name"]: self.samples}, list(layout))
        info = StreamInfo(round_index, json.dumps({"task_losses": {self.task["name"]: 1.0 / round_index}}), weights)
        wire = self.config.wire

        def send(stub):
            return stub.Upload(encode_frames(update, layout, wire.dtype, wire.chunk_bytes, info), timeout=120)

        try:
            self.connection.call(f"upload round {round_index}", send)
            self.record.rounds.append(round_index)
        except Refused as exc:
            if exc.reason == "duplicate":  # accepted before: the answer was lost, the retry says so
                self.record.rounds.append(round_index)
            elif exc.reason not in MOVED_ON:
                raise

    def _finish(self, assignment: pb.Assignment) -> None:
        self.record.final_values = self._download(assignment.round, layout_from_proto(assignment.layout))
        score = 0.5 + self.shift
        result = {
            "silo": self.silo,
            "tasks": [
                {
                    "silo": self.silo,
                    "task": self.task["name"],
                    "kind": self.task["kind"],
                    "metrics": {"accuracy": score},
                    "primary": score,
                }
            ],
        }
        try:
            self.connection.call(
                "report results",
                lambda s: s.ReportResults(pb.ResultsRequest(results_json=json.dumps(result)), timeout=60),
            )
        except Refused as exc:
            if exc.reason not in MOVED_ON:
                raise


def expected_final(first: ComponentValues, shifts: list[list[float]]) -> ComponentValues:
    """The global model after rounds whose accepted shifts were ``shifts[r]`` (equal sample counts): each round
    adds the mean of its shifts (float32, as the server casts the float64 mean)."""
    values = {c: {n: t.clone() for n, t in tensors.items()} for c, tensors in first.items()}
    for round_shifts in shifts:
        for tensors in values.values():
            for name, tensor in tensors.items():
                total = tensor.to(torch.float64) * len(round_shifts) + sum(round_shifts)
                tensors[name] = (total / len(round_shifts)).to(torch.float32)
    return values


def max_difference(a: ComponentValues, b: ComponentValues) -> float:
    return max(float((a[c][n] - t).abs().max()) for c, tensors in b.items() for n, t in tensors.items())
