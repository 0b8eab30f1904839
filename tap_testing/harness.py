"""A real server for attacks and fuzzing: kits in a temp dir, the mTLS daemon on 127.0.0.1 free ports, raw stubs.

Everything a silo sends is shaped by hand through the generated stub, so a test
or ``bench/faults.py`` can send exactly what a hostile silo would. Every RPC has
a timeout; :func:`running_server` stops the server and removes the temp dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import grpc
import torch

from tap_core.config import Deadlines, FederationConfig, ModelSpec, TrainConfig, WireConfig
from tap_core.errors import REASON_METADATA_KEY
from tap_core.layout import Layout
from tap_core.model.tap_model import ComponentValues
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_core.wire import StreamDecoder, StreamInfo, encode_stream, layout_from_proto

if TYPE_CHECKING:
    from tap_server.federation import Federation

RPC_TIMEOUT = 15.0

TINY_CONFIG = FederationConfig(
    name="hostile",
    rounds=1,
    seed=0,
    min_clients=1,
    model=ModelSpec(size="tiny"),
    train=TrainConfig(local_steps=1, ft_steps=1, kd_steps=1, batch_size=4, eval_batch_size=16, max_val_examples=8),
    wire=WireConfig(chunk_bytes=64 * 1024, max_message_bytes=1024 * 1024),
    deadlines=Deadlines(join_s=300, round_s=300, finish_s=300, heartbeat_s=1.0),
)

IMAGE_TASK = {
    "name": "shapes",
    "kind": "classification",
    "modalities": ["image"],
    "family": "image_classification",
    "domain": "general",
}
TEXT_TASK = {
    "name": "reviews",
    "kind": "classification",
    "modalities": ["text"],
    "family": "text_classification",
    "domain": "general",
}


@functools.lru_cache(maxsize=4)
def fingerprint(model: ModelSpec = TINY_CONFIG.model) -> str:
    from tap_core.model import build_backbone

    return build_backbone(model).fingerprint


def declaration_json(
    task: dict[str, Any], samples: int, labels_seen: list[str], model: ModelSpec = TINY_CONFIG.model, **fields: Any
) -> str:
    """A silo's declaration of one task, as the agent would send it (``fields`` override or add keys)."""
    data = {
        "silo": "ignored: the certificate names the silo",
        "tasks": [task],
        "train_samples": {task["name"]: samples},
        "labels_seen": {task["name"]: labels_seen} if task["kind"] == "classification" else {},
        "fingerprint": fingerprint(model),
        "device": "cpu",
    }
    data.update(fields)
    return json.dumps(data)


def reason_of(error: grpc.RpcError) -> str | None:
    """The refusal reason the server sent in the trailing metadata (None: gRPC's own failure)."""
    return dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY)


@dataclass
class Silo:
    """One silo's connection, and what it holds of the current round once it downloaded."""

    name: str
    channel: grpc.Channel
    stub: pb_grpc.FederationStub
    samples: int = 0
    layout: Layout = field(default_factory=dict)
    values: ComponentValues = field(default_factory=dict)

    def join(self, declaration: str) -> pb.JoinResponse:
        return self.stub.Join(pb.JoinRequest(declaration_json=declaration), timeout=RPC_TIMEOUT)

    def join_task(self, task: dict[str, Any], samples: int, labels_seen: list[str], **fields: Any) -> pb.JoinResponse:
        self.samples = samples
        return self.join(declaration_json(task, samples, labels_seen, **fields))

    def poll(self, wait_s: float = 5.0) -> pb.Assignment:
        return self.stub.Poll(pb.PollRequest(wait_s=wait_s), timeout=RPC_TIMEOUT + wait_s)

    def download(self, round_index: int, dtype: str = "fp32") -> ComponentValues:
        """Poll until assigned ``round_index``, then download its global values (kept as ``values``)."""
        assignment = self.poll()
        if assignment.round != round_index or assignment.action not in (pb.Assignment.TRAIN, pb.Assignment.FINISH):
            raise AssertionError(f"silo {self.name} expected round {round_index}, got {assignment}")
        self.layout = layout_from_proto(assignment.layout)
        decoder = StreamDecoder(self.layout, dtype)
        for frame in self.stub.Download(pb.DownloadRequest(round=round_index), timeout=RPC_TIMEOUT):
            decoder.feed(frame)
        self.values = decoder.finish()
        return self.values

    def frames(
        self,
        values: ComponentValues | None = None,
        round_index: int = 1,
        stats_json: str = "{}",
        weights: dict[str, float] | None = None,
        dtype: str = "fp32",
        chunk_bytes: int = 16 * 1024,
    ) -> list[pb.TensorFrame]:
        """An upload of ``values`` (default: what it downloaded) with its declared weights."""
        weights = {c: float(self.samples) for c in self.layout} if weights is None else weights
        return list(
            encode_stream(
                values if values is not None else self.values,
                self.layout,
                dtype,
                chunk_bytes,
                StreamInfo(round_index, stats_json, weights),
            )
        )

    def upload(self, values: ComponentValues | None = None, round_index: int = 1, **kwargs: Any) -> pb.UploadAck:
        return self.stub.Upload(iter(self.frames(values, round_index, **kwargs)), timeout=RPC_TIMEOUT)

    def close(self) -> None:
        self.channel.close()


class Harness:
    """Provisioned kits and a started server (``daemon``); :meth:`connect` gives a silo's stub."""

    def __init__(self, root: Path, silos: list[str], config: FederationConfig, **options: Any):
        from tap_server.daemon import ServeOptions, ServerDaemon
        from tap_server.provision import provision

        self.root = root
        self.kits = root / "kits"
        provision(self.kits, silos, ["127.0.0.1"])
        self.config = config
        serve = ServeOptions(
            kit=self.kits / "server",
            listen="127.0.0.1:0",
            state_dir=root / "state",
            metrics_port=None,
            health_port=0,
            done_grace_s=5.0,
            **options,
        )
        self.daemon = ServerDaemon(config, serve).start()
        self._silos: list[Silo] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.daemon.port}"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def credentials(self, silo: str) -> grpc.ChannelCredentials:
        kit = self.kits / silo
        return grpc.ssl_channel_credentials(
            (kit / "ca.crt").read_bytes(), (kit / "client.key").read_bytes(), (kit / "client.crt").read_bytes()
        )

    def connect(self, silo: str) -> Silo:
        channel = grpc.secure_channel(self.address, self.credentials(silo))
        connected = Silo(silo, channel, pb_grpc.FederationStub(channel))
        self._silos.append(connected)
        return connected

    def rejected(self, reason: str) -> float:
        """``tap_rejected_requests_total{reason}``."""
        return self.daemon.metrics.registry.get_sample_value("tap_rejected_requests_total", {"reason": reason}) or 0.0

    @property
    def federation(self) -> Federation:
        """The server's federation (started)."""
        assert self.daemon.federation is not None
        return self.daemon.federation

    def in_flight(self, kind: str) -> float:
        return self.daemon.metrics.registry.get_sample_value("tap_calls_in_flight", {"kind": kind}) or 0.0

    def wait_for(self, predicate, timeout: float = 10.0, step: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(step)
        return bool(predicate())

    def state_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.state_dir.rglob("*") if p.is_file())

    def close(self) -> None:
        for silo in self._silos:
            silo.close()
        self.daemon.stop(grace=0)


@contextlib.contextmanager
def running_server(silos: list[str], config: FederationConfig = TINY_CONFIG, **options: Any) -> Iterator[Harness]:
    """A server for ``silos`` (kits provisioned for each) in a temp dir, stopped and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tap-hostile-") as tmp:
        harness = Harness(Path(tmp), silos, config, **options)
        try:
            yield harness
        finally:
            harness.close()


def with_config(config: FederationConfig = TINY_CONFIG, **sections: Any) -> FederationConfig:
    """``config`` with fields of its sections replaced, e.g. ``with_config(limits={"stream_idle_s": 1})``
    (a field that is no section, e.g. ``expected_silos=3``, is set as it is)."""
    changes: dict[str, Any] = {}
    for name, values in sections.items():
        current = getattr(config, name)
        is_section = dataclasses.is_dataclass(current) and not isinstance(current, type)
        changes[name] = dataclasses.replace(current, **values) if is_section else values
    return dataclasses.replace(config, **changes)


def shifted(values: ComponentValues, by: float) -> ComponentValues:
    """``values`` with every element moved by ``by`` (a silo's training, or a poisoner's)."""
    return {c: {n: t + by for n, t in tensors.items()} for c, tensors in values.items()}


def filled(values: ComponentValues, value: float) -> ComponentValues:
    return {c: {n: torch.full_like(t, value) for n, t in tensors.items()} for c, tensors in values.items()}
