"""The raw gRPC reference of ``bench/transport.py``: the same bytes, TLS, chunk size and channel options, no codec.

    python -m tap_testing.raw_stream server --kit KITS/server --config federation.yaml --mb 100 --port-file F
    python -m tap_testing.raw_stream client --kit KITS/s00 --config federation.yaml --mb 100 --server 127.0.0.1:P

The server holds ``--mb`` MB as pre-built ``wire.chunk_bytes`` messages: ``Down`` streams
them, ``Up`` copies each received message into one buffer allocated for the stream (as
``StreamDecoder`` does; a client's ``down`` likewise). A client connects
(mTLS with its silo kit), makes one small warm-up call, then reads commands on stdin —
``down``, ``up``, ``quit`` — and answers each with a JSON line ``{"start", "end", "bytes"}``
(``time.monotonic()``), so the bench can start K clients at once and time the slowest.
Nothing here is part of a deployed server or agent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch

from tap_core.config import FederationConfig
from tap_core.scenario import load_federation_config
from tap_core.transport import channel_options

SERVICE = "tap.bench.RawStream"


def payload_chunks(megabytes: float, chunk_bytes: int) -> list[bytes]:
    total = int(megabytes * 1e6)
    data = os.urandom(total)  # one copy, sliced: the chunks are what a perfect codec would hand gRPC
    return [data[i : i + chunk_bytes] for i in range(0, total, chunk_bytes)]


def new_buffer(size: int) -> np.ndarray:
    """Uninitialised, in 4 KiB pages like the decoder's tensors (numpy would ask huge pages for this size, which the
    kernel may compact memory for, for seconds; bytearray would zero it in an extra pass)."""
    return torch.empty(size, dtype=torch.uint8).numpy()


def receive_into(buffer: np.ndarray, messages) -> int:
    """Copy each message into ``buffer`` in turn (one copy: the least a receiver does); returns the bytes."""
    view = memoryview(buffer)  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
    offset = 0
    for message in messages:
        view[offset : offset + len(message)] = message
        offset += len(message)
    return offset


def serve(kit: Path, config: FederationConfig, megabytes: float, port_file: Path, workers: int) -> None:
    chunks = payload_chunks(megabytes, config.wire.chunk_bytes)
    total = sum(len(c) for c in chunks)

    def down(request: bytes, context: grpc.ServicerContext):
        yield from chunks

    def up(request_iterator, context: grpc.ServicerContext) -> bytes:
        return str(receive_into(new_buffer(total), request_iterator)).encode()

    credentials = grpc.ssl_server_credentials(
        [((kit / "server.key").read_bytes(), (kit / "server.crt").read_bytes())],
        root_certificates=(kit / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Down": grpc.unary_stream_rpc_method_handler(down),
            "Up": grpc.stream_unary_rpc_method_handler(up),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=channel_options(config))
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    port_file.write_text(str(port))
    stop = threading.Event()
    try:
        while not stop.wait(1.0):
            if os.getppid() == 1:  # the bench went away
                break
    finally:
        server.stop(0)


def client(kit: Path, config: FederationConfig, megabytes: float, address: str) -> None:
    credentials = grpc.ssl_channel_credentials(
        (kit / "ca.crt").read_bytes(), (kit / "client.key").read_bytes(), (kit / "client.crt").read_bytes()
    )
    chunks = payload_chunks(megabytes, config.wire.chunk_bytes)
    total = sum(len(c) for c in chunks)
    with grpc.secure_channel(address, credentials, options=channel_options(config)) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        down = channel.unary_stream(f"/{SERVICE}/Down")
        up = channel.stream_unary(f"/{SERVICE}/Up")

        def receive() -> int:
            return receive_into(new_buffer(total), down(b"", timeout=600))

        def send() -> int:
            return int(up(iter(chunks), timeout=600))

        up(iter(chunks[:1]), timeout=60)  # warm-up: TLS session and HTTP/2 windows, as the agent has after its polls
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            started = time.monotonic()
            moved = receive() if command == "down" else send()
            print(
                json.dumps({"command": command, "start": started, "end": time.monotonic(), "bytes": moved}), flush=True
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="the federation.yaml the tap-server runs")
    parser.add_argument("--mb", type=float, required=True)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--server")
    parser.add_argument("--workers", type=int, default=64)
    args = parser.parse_args(argv)
    config = load_federation_config(args.config)
    if args.role == "server":
        serve(args.kit, config, args.mb, args.port_file, args.workers)
    else:
        client(args.kit, config, args.mb, args.server)


if __name__ == "__main__":
    main(sys.argv[1:])
