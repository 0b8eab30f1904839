"""Helpers of the gRPC tests (not a test module): a tiny federation config, kits, stubs, frames, the CLIs.

Servers are the in-process ``ServerDaemon`` bound to 127.0.0.1 with free ports;
kits come from ``tap_server.provision``. Refusals are driven through the raw
generated stub so each bad request can be shaped exactly. Every RPC has an
explicit timeout.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from tap_core.config import Deadlines, FederationConfig, ModelSpec, TrainConfig, WireConfig
from tap_core.model import build_backbone
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_core.wire import StreamDecoder, StreamInfo, encode_stream, layout_from_proto
from tap_server.daemon import ServeOptions, ServerDaemon

RPC_TIMEOUT = 15
CLI_TIMEOUT = 90  # "quickly": the agent would otherwise retry for an hour
ROOT = Path(__file__).resolve().parents[1]

GRPC_CONFIG = FederationConfig(
    name="grpc-test",
    rounds=2,
    seed=0,
    expected_silos=2,
    model=ModelSpec(size="tiny"),
    train=TrainConfig(local_steps=2, ft_steps=1, kd_steps=1, batch_size=4, eval_batch_size=16, max_val_examples=8),
    wire=WireConfig(chunk_bytes=64 * 1024, max_message_bytes=1024 * 1024),
    deadlines=Deadlines(join_s=300, round_s=300, finish_s=300, heartbeat_s=1.0),
)
FINGERPRINT = build_backbone(GRPC_CONFIG.model).fingerprint

ALPHA_TASK = {
    "name": "shapes",
    "kind": "classification",
    "modalities": ["image"],
    "family": "image_classification",
    "domain": "general",
}
BETA_TASK = {
    "name": "reviews",
    "kind": "classification",
    "modalities": ["text"],
    "family": "text_classification",
    "domain": "general",
}


def start_server(kit: Path, state: Path, config: FederationConfig = GRPC_CONFIG, **options) -> ServerDaemon:
    opts = ServeOptions(
        kit=kit, listen="127.0.0.1:0", state_dir=state, metrics_port=0, health_port=0, done_grace_s=5.0, **options
    )
    return ServerDaemon(config, opts).start()


def credentials(kit_dir: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (kit_dir / "ca.crt").read_bytes(), (kit_dir / "client.key").read_bytes(), (kit_dir / "client.crt").read_bytes()
    )


def stub_for(
    server: ServerDaemon, creds: grpc.ChannelCredentials | None
) -> tuple[grpc.Channel, pb_grpc.FederationStub]:
    target = f"127.0.0.1:{server.port}"
    channel = grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)
    return channel, pb_grpc.FederationStub(channel)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=RPC_TIMEOUT, **kwargs)
    return info.value


def rejected(server: ServerDaemon, reason: str) -> float:
    """``tap_rejected_requests_total{reason}`` of ``server``."""
    return server.metrics.registry.get_sample_value("tap_rejected_requests_total", {"reason": reason}) or 0.0


def declaration(silo_claim: str, task: dict, samples: int, labels: list[str], fingerprint: str = FINGERPRINT) -> str:
    return json.dumps(
        {
            "silo": silo_claim,
            "tasks": [task],
            "train_samples": {task["name"]: samples},
            "labels_seen": {task["name"]: labels},
            "fingerprint": fingerprint,
            "device": "cpu",
        }
    )


def join_both(server: ServerDaemon, kits: Path) -> dict:
    """Hello + Join for alpha and beta over mTLS, then Poll and Download until both hold round 1."""
    out = {}
    for silo, task, samples, labels in (
        ("alpha", ALPHA_TASK, 10, ["a", "b", "c"]),
        ("beta", BETA_TASK, 6, ["neg", "pos"]),
    ):
        channel, stub = stub_for(server, credentials(kits / silo))
        hello = stub.Hello(pb.HelloRequest(client_version="test"), timeout=RPC_TIMEOUT)
        assert hello.silo_id == silo
        # the declaration claims to be someone else: identity comes from the certificate only
        joined = stub.Join(
            pb.JoinRequest(declaration_json=declaration("delta", task, samples, labels)), timeout=RPC_TIMEOUT
        )
        assert joined.silo_id == silo
        out[silo] = {"channel": channel, "stub": stub, "samples": samples}
    assert server.federation.status().joined == ("alpha", "beta")
    for entry in out.values():
        assignment = entry["stub"].Poll(pb.PollRequest(wait_s=5), timeout=RPC_TIMEOUT)
        assert assignment.action == pb.Assignment.TRAIN and assignment.round == 1, assignment
        entry["layout"] = layout_from_proto(assignment.layout)
        decoder = StreamDecoder(entry["layout"], GRPC_CONFIG.wire.dtype)
        for frame in entry["stub"].Download(pb.DownloadRequest(round=1), timeout=RPC_TIMEOUT):
            decoder.feed(frame)
        entry["values"] = decoder.finish()
        entry["weights"] = {c: float(entry["samples"]) for c in entry["layout"]}  # one task uses every component
    return out


def frames_for(
    entry: dict,
    *,
    values=None,
    layout=None,
    dtype="fp32",
    round_index=1,
    weights=None,
    stats_json='{"task_losses": {"shapes": 1.0}}',
    chunk_bytes=4096,
) -> list[pb.TensorFrame]:
    """An upload of ``entry`` (from ``join_both``), as the frames a client would send (each one a fresh message)."""
    frames = encode_stream(
        values or entry["values"],
        layout or entry["layout"],
        dtype,
        chunk_bytes,
        StreamInfo(round_index, stats_json, entry["weights"] if weights is None else weights),
    )
    return [pb.TensorFrame.FromString(f.SerializeToString()) for f in frames]


def write_silo_data(root: Path) -> dict[str, Path]:
    """An npz image classification task for alpha, a csv text classification task for beta; their silo.yaml files."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.array(["circle", "square", "triangle"] * 10)
    images = rng.integers(0, 255, size=(30, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "shapes.npz", images=images, labels=labels)
    with open(root / "reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "verdict"])
        for i in range(30):
            good = i % 2 == 0
            writer.writerow(
                [
                    f"review {i}: the film was {'wonderful and moving' if good else 'dull and far too long'}",
                    "fresh" if good else "rotten",
                ]
            )
    alpha = root / "alpha.yaml"
    alpha.write_text(
        yaml.safe_dump(
            {"tasks": [dict(ALPHA_TASK, data={"format": "npz", "path": "shapes.npz", "test_fraction": 0.2})]}
        )
    )
    beta = root / "beta.yaml"
    beta.write_text(
        yaml.safe_dump(
            {
                "tasks": [
                    dict(
                        BETA_TASK,
                        data={
                            "format": "csv",
                            "path": "reviews.csv",
                            "text_column": "review",
                            "label_column": "verdict",
                            "test_fraction": 0.2,
                        },
                    )
                ]
            }
        )
    )
    return {"alpha": alpha, "beta": beta}


def client_cli(kit: Path, server: ServerDaemon | str, config: Path, state: Path) -> list[str]:
    """The ``tap-client run`` command line for ``kit`` against ``server``."""
    address = server if isinstance(server, str) else f"127.0.0.1:{server.port}"
    return [
        sys.executable,
        "-m",
        "tap_client.cli",
        "run",
        "--kit",
        str(kit),
        "--server",
        address,
        "--config",
        str(config),
        "--state",
        str(state),
        "--threads",
        "1",
    ]


def tap_server(args: list[str]):
    """The ``tap-server`` command, in process (click's runner): provision, revoke."""
    from click.testing import CliRunner

    from tap_server.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def popen(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)


def finished(process: subprocess.Popen, timeout: float = CLI_TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"{process.args} still running after {timeout}s (retrying forever?):\n{out[-3000:]}")
    return process.returncode, out


def reason_of(err: grpc.RpcError) -> str | None:
    """The refusal reason the server sent in the trailing metadata."""
    from tap_core.errors import REASON_METADATA_KEY

    return dict(err.trailing_metadata() or ()).get(REASON_METADATA_KEY)
