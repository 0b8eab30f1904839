"""Bytes on the wire vs the trainable bytes they carry, and tensor-stream throughput.

    python bench/wire_efficiency.py                    # tiny + small + minilm, every mini-scenario silo
    python bench/wire_efficiency.py --presets base --transfer-mb 10 100 500

Part 1 — for every silo of ``tap-bench-mini`` and each model preset and wire
dtype: trainable bytes of the silo's components, bytes of the encoded streams
(down + up, payload + protobuf framing + gRPC's 5-byte message prefix), and the
ratio to 2 x trainable bytes (the issue's budget: <= 1.05).

Part 2 — throughput over loopback with mTLS: the project's codec
(``encode_frames``/``StreamDecoder``, serialised frames both ways) carried by gRPC, against a raw gRPC stream
of pre-built byte chunks of the same size (the roadmap asks for >= 0.7x).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from tap_core.config import ModelSpec, WireConfig
from tap_core.model import build_backbone
from tap_core.model.tap_model import ModelPlan, TapModel
from tap_core.plan import silo_plan, united_tasks
from tap_core.scenario import load_scenario
from tap_core.wire import StreamDecoder, StreamInfo, encode_frames, frame_wire_bytes
from tap_core.layout import payload_bytes
from tap_cli.compose import MODEL_PRESETS
from tap_core.messages import SiloDeclaration


def silo_plans() -> dict[str, ModelPlan]:
    scenario = load_scenario("tap-bench-mini")
    decls = [
        SiloDeclaration(
            s.id,
            s.tasks,
            {t.name: 1 for t in s.tasks},
            {t.name: ["a", "b"] for t in s.tasks if t.kind == "classification"},
            "-",
        )
        for s in scenario.silos
    ]
    tasks = united_tasks(decls)
    fusion = ModelSpec().fusion_layers
    return {d.silo: silo_plan(d, tasks, fusion) for d in decls}


def efficiency(presets: list[str], dtypes: list[str], chunk: int) -> None:
    print(f"{'preset':<7} {'dtype':<5} {'silo':<11} {'trainable MB':>12} {'wire MB (down+up)':>18} {'ratio to 2x':>11}")
    for preset in presets:
        spec = ModelSpec(**{k: v for k, v in MODEL_PRESETS[preset].items()})
        backbone = build_backbone(spec)
        for dtype in dtypes:
            for silo, plan in silo_plans().items():
                model = TapModel(plan, backbone, seed=0)
                values, layout = model.values(), model.layout()
                trainable = payload_bytes(values, dtype)
                down = sum(frame_wire_bytes(f) for f in encode_frames(values, layout, dtype, chunk, StreamInfo(1)))
                stats = '{"task_losses": {"t": 0.5}, "replacements": []}'
                up = sum(
                    frame_wire_bytes(f)
                    for f in encode_frames(
                        values, layout, dtype, chunk, StreamInfo(1, stats, {c: 100.0 for c in layout})
                    )
                )
                print(
                    f"{preset:<7} {dtype:<5} {silo:<11} {trainable / 1e6:>12.3f} {(down + up) / 1e6:>18.3f} "
                    f"{(down + up) / (2 * trainable):>11.4f}"
                )


# -- transfer throughput ---------------------------------------------------------------


def payload(megabytes: int) -> tuple[dict, dict]:
    """Component values of ``megabytes`` fp32 MB in 1 MiB tensors (plus a few small ones)."""
    per = 256 * 1024  # 1 MiB of fp32
    count = max(1, megabytes * 1_000_000 // (per * 4))
    values = {"comp": {f"t{i:05d}": torch.randn(per) for i in range(count)}}
    values["comp"]["small"] = torch.randn(64)
    layout = {"comp": [(n, tuple(t.shape)) for n, t in sorted(values["comp"].items())]}
    return values, layout


def mtls(directory: Path):
    from tap_server.provision import provision

    provision(directory, ["bench"], ["127.0.0.1"])
    server = grpc.ssl_server_credentials(
        [((directory / "server/server.key").read_bytes(), (directory / "server/server.crt").read_bytes())],
        root_certificates=(directory / "server/ca.crt").read_bytes(),
        require_client_auth=True,
    )
    client = grpc.ssl_channel_credentials(
        (directory / "bench/ca.crt").read_bytes(),
        (directory / "bench/client.key").read_bytes(),
        (directory / "bench/client.crt").read_bytes(),
    )
    return server, client


def transfer(megabytes: int, chunk: int, dtype: str, server_creds, client_creds) -> tuple[float, float]:
    values, layout = payload(megabytes)
    raw_chunks = []
    blob = b"".join(t.numpy().tobytes() for _, t in sorted(values["comp"].items()))
    if dtype != "fp32":
        blob = blob[: len(blob) // 2]
    raw_chunks = [blob[i : i + chunk] for i in range(0, len(blob), chunk)]
    options = [
        ("grpc.max_receive_message_length", chunk + (1 << 20)),
        ("grpc.max_send_message_length", chunk + (1 << 20)),
    ]

    def codec_stream(request, context):
        yield from encode_frames(values, layout, dtype, chunk, StreamInfo(1))

    def raw_stream(request, context):
        yield from raw_chunks

    handlers = grpc.method_handlers_generic_handler(
        "bench.Stream",
        {
            "Codec": grpc.unary_stream_rpc_method_handler(
                codec_stream, request_deserializer=None, response_serializer=None
            ),
            "Raw": grpc.unary_stream_rpc_method_handler(
                raw_stream, request_deserializer=None, response_serializer=None
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_secure_port("127.0.0.1:0", server_creds)
    server.start()
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", client_creds, options=options) as channel:
            codec = channel.unary_stream("/bench.Stream/Codec")
            raw = channel.unary_stream("/bench.Stream/Raw")
            nbytes = payload_bytes(values, dtype)

            def run_codec() -> float:
                started = time.perf_counter()
                decoder = StreamDecoder(layout, dtype)
                for message in codec(b"", timeout=600):
                    decoder.feed(message)
                decoder.finish()
                return nbytes / (time.perf_counter() - started) / 1e6

            def run_raw() -> float:
                started = time.perf_counter()
                received = bytearray(len(blob))
                offset = 0
                for message in raw(b"", timeout=600):
                    received[offset : offset + len(message)] = message
                    offset += len(message)
                return len(blob) / (time.perf_counter() - started) / 1e6

            run_codec(), run_raw()  # warm-up
            codec_rate = max(run_codec() for _ in range(2))
            raw_rate = max(run_raw() for _ in range(2))
            return codec_rate, raw_rate
    finally:
        server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "minilm"], choices=list(MODEL_PRESETS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--chunk-bytes", type=int, default=WireConfig().chunk_bytes)
    parser.add_argument("--transfer-mb", nargs="*", type=int, default=[10, 100])
    args = parser.parse_args()
    efficiency(args.presets, args.dtypes, args.chunk_bytes)
    if not args.transfer_mb:
        return
    with tempfile.TemporaryDirectory() as tmp:
        server_creds, client_creds = mtls(Path(tmp))
        print(
            f"\n{'payload MB':>10} {'dtype':<5} {'codec MB/s':>11} {'raw gRPC MB/s':>14} {'ratio':>6}   (mTLS, loopback, "
            f"{args.chunk_bytes // 1024} KiB chunks)"
        )
        for megabytes in args.transfer_mb:
            codec_rate, raw_rate = transfer(megabytes, args.chunk_bytes, "fp32", server_creds, client_creds)
            print(f"{megabytes:>10} {'fp32':<5} {codec_rate:>11.1f} {raw_rate:>14.1f} {codec_rate / raw_rate:>6.2f}")


if __name__ == "__main__":
    main()
