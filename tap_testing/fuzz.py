"""The fuzz campaign: ``hypothesis`` drives malformed, truncated, reordered, oversized and contradictory input into
the tensor codec and every RPC handler, and counts what must stay 0.

Most cases run in process: the real :class:`~tap_server.servicer.FederationServicer`
(the ``guarded`` wrapper, the safe deserializer, the federation behind it) called
with a fake context, so thousands of cases take seconds. A smaller number goes
through a real mTLS server as raw bytes. A case is

- a **crash** when an exception escapes the handler (or a call through gRPC hangs or
  fails without a status of ours),
- an **internal error** when it is answered INTERNAL (or UNKNOWN),
- an **aggregate corruption** when a refused upload changed the round (the silos
  received, the global values), an accepted one carried other values than the
  honest ones it was made from, or the round closed later on another aggregate
  than the honest updates give.

``TAP_FUZZ_CASES`` sets the cases per handler of the test suite (small, so CI
stays fast); ``bench/faults.py`` runs :func:`run_campaign` with 1000 or more.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import grpc
import torch
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tap_core.config import FederationConfig, TaskSpec
from tap_core.errors import WireError
from tap_core.layout import Layout
from tap_core.messages import SiloDeclaration
from tap_core.model.tap_model import ComponentValues
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.wire import StreamDecoder, StreamInfo, encode_stream
from tap_testing.harness import IMAGE_TASK, TEXT_TASK, TINY_CONFIG, fingerprint, running_server, shifted, with_config

ENV_CASES = "TAP_FUZZ_CASES"
HANDLERS = ("codec", "Hello", "Join", "Poll", "Download", "Upload", "Heartbeat", "ReportResults")


def cases_from_env(default: int = 30) -> int:
    """Cases per handler: ``TAP_FUZZ_CASES`` if set, else ``default``."""
    return int(os.environ.get(ENV_CASES, default))


@dataclass
class FuzzCounts:
    cases: int = 0
    crashes: int = 0
    internal_errors: int = 0
    aggregate_corruptions: int = 0
    seconds: float = 0.0
    per_handler: dict[str, int] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)  # status/reason -> cases (what the malformed input got)
    failures: list[str] = field(default_factory=list)  # the first few cases that failed, to reproduce them

    def record(self, handler: str, answer: str) -> None:
        self.cases += 1
        self.per_handler[handler] = self.per_handler.get(handler, 0) + 1
        self.answers[answer] = self.answers.get(answer, 0) + 1

    def fail(self, kind: str, handler: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.failures) < 20:
            self.failures.append(f"{kind} in {handler}: {what[:500]}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ strategies

FLOATS = st.floats(allow_nan=True, allow_infinity=True)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
SPECIAL_TEXTS = [
    "",
    "null",
    "[]",
    "{}",
    "Infinity",
    "-Infinity",
    "NaN",
    "1e400",
    "1" + "0" * 400,
    '"x"',
    "[" * 50_000 + "]" * 50_000,
    '{"a": ' * 5_000 + "1" + "}" * 5_000,
    '"\\ud800"',
    '{"tasks": [',
    '{"tasks": [{"name": "x"}]} trailing',
]


def _json_text(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def _mutated(draw: Callable, value: Any, depth: int = 0) -> Any:
    """``value`` (a JSON document) with one part replaced, removed, added to or descended into."""
    if isinstance(value, dict) and value and depth < 6:
        key = draw(st.sampled_from(sorted(value)))
        op = draw(st.sampled_from(["descend", "descend", "replace", "delete", "add", "blow_up"]))
        out = dict(value)
        if op == "descend":
            out[key] = _mutated(draw, value[key], depth + 1)
        elif op == "replace":
            out[key] = draw(JSON_VALUES)
        elif op == "delete":
            del out[key]
        elif op == "add":
            out[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            out[key] = _blown_up(draw, value[key])
        return out
    if isinstance(value, list) and value and depth < 6:
        index = draw(st.integers(0, len(value) - 1))
        op = draw(st.sampled_from(["descend", "replace", "delete", "duplicate", "blow_up"]))
        items = list(value)
        if op == "descend":
            items[index] = _mutated(draw, value[index], depth + 1)
        elif op == "replace":
            items[index] = draw(JSON_VALUES)
        elif op == "delete":
            del items[index]
        elif op == "duplicate":
            items.append(value[index])
        else:
            items[index] = _blown_up(draw, value[index])
        return items
    return draw(
        st.one_of(JSON_VALUES, st.sampled_from([float("inf"), float("nan"), -1, 0, 2**64, 1e308, "", "é" * 300]))
    )


def _blown_up(draw: Callable, value: Any) -> Any:
    """Too big: a string of 1000s of characters, a list of 10,000s of entries, 100s of keys."""
    size = draw(st.sampled_from([300, 5_000, 30_000]))
    kind = draw(st.sampled_from(["string", "list", "dict"]))
    if kind == "string":
        return (str(value) or "x") * (size // max(1, len(str(value))) + 1)
    if kind == "list":
        return [f"v{i}" for i in range(size)]
    return {f"k{i}": 0.5 for i in range(min(size, 2_000))}


def json_documents(base: dict[str, Any]) -> st.SearchStrategy[str]:
    """Malformed variants of the valid document ``base``: mutated, truncated, random, special."""

    @st.composite
    def documents(draw: Callable) -> str:
        how = draw(st.sampled_from(["mutate", "mutate", "mutate", "mutate_twice", "truncate", "random", "special"]))
        if how == "mutate":
            return _json_text(_mutated(draw, base))
        if how == "mutate_twice":
            return _json_text(_mutated(draw, _mutated(draw, base)))
        if how == "truncate":
            text = _json_text(base)
            return text[: draw(st.integers(0, len(text) - 1))]
        if how == "random":
            return _json_text(draw(JSON_VALUES))
        return draw(st.sampled_from(SPECIAL_TEXTS))

    return documents()


REQUEST_FIELDS = {  # well-formed messages with extreme field values
    "HelloRequest": st.builds(pb.HelloRequest, client_version=st.text(max_size=300)),
    "PollRequest": st.builds(pb.PollRequest, wait_s=FLOATS),
    "HeartbeatRequest": st.builds(pb.HeartbeatRequest, round=st.integers(0, 2**32 - 1), activity=st.text(max_size=300)),
    "DownloadRequest": st.builds(pb.DownloadRequest, round=st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1))),
    "JoinRequest": st.builds(
        pb.JoinRequest, declaration_json=st.text(max_size=64), client_version=st.text(max_size=64)
    ),
    "ResultsRequest": st.builds(pb.ResultsRequest, results_json=st.text(max_size=64)),
}


def message_bytes(valid: Message, max_bytes: int) -> st.SearchStrategy[bytes]:
    """Serialised requests: well-formed with extreme fields; the valid one with bytes flipped, cut or appended;
    random bytes; over-size."""
    fields = REQUEST_FIELDS[type(valid).__name__]

    @st.composite
    def mutated(draw: Callable) -> bytes:
        how = draw(st.sampled_from(["fields", "fields", "flip", "cut", "append", "random", "oversize"]))
        if how == "fields":
            return draw(fields).SerializeToString()
        data = bytearray(valid.SerializeToString())
        if how == "flip" and data:
            for _ in range(draw(st.integers(1, 4))):
                data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            return bytes(data)
        if how == "cut" and data:
            return bytes(data[: draw(st.integers(0, len(data) - 1))])
        if how == "append":
            return bytes(data) + draw(st.binary(min_size=1, max_size=64))
        if how == "oversize":
            return b"\x0a" + b"\xff" * (max_bytes + 1)
        return draw(st.binary(max_size=128))

    return mutated()


# -------------------------------------------------------------- in-process target


class Aborted(Exception):
    """The fake context's abort (gRPC's raises too, ending the handler)."""


class FakeContext:
    """What the servicer uses of a gRPC context: the caller's certificate (here: the silo's name), abort, metadata."""

    def __init__(self, silo: str):
        self.silo = silo
        self._code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple = ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.silo.encode()]}

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self.details = code, details
        raise Aborted(details)

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = metadata

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def is_active(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


class FakeAuth:
    """Every caller is who its fake certificate says (identity itself is tested over mTLS elsewhere)."""

    provisioned = ["alpha", "beta", "gamma"]

    def identify(self, context: FakeContext) -> str:
        return context.silo

    def identify_pem(self, pem: bytes) -> str:
        return pem.decode()


def _declaration(silo: str, task: dict[str, Any], samples: int, labels: list[str]) -> SiloDeclaration:
    spec = TaskSpec(task["name"], task["kind"], tuple(task["modalities"]), task["family"], task["domain"])
    return SiloDeclaration(silo, (spec,), {spec.name: samples}, {spec.name: labels}, fingerprint(TINY_CONFIG.model))


ALPHA = ("alpha", IMAGE_TASK, 10, ["a", "b"])
BETA = ("beta", TEXT_TASK, 6, ["neg", "pos"])


class Target:
    """A federation behind the real servicer, in process: round 1 in progress (or waiting, or finishing)."""

    def __init__(self, config: FederationConfig, phase: str = "training"):
        from tap_server.federation import Federation
        from tap_server.metrics import ServerMetrics
        from tap_server.servicer import FederationServicer

        self.config = config
        self.federation = Federation(config, expected_silos=1000 if phase == "waiting" else 2)
        self.metrics = ServerMetrics()
        self.servicer = FederationServicer(config, self.federation, FakeAuth(), self.metrics)  # type: ignore[arg-type]
        self.submitted: list[ComponentValues] = []
        submit = self.federation.submit_update

        def recording(update):  # what reaches validation and the aggregate (a test seam, not the federation's API)
            self.submitted.append(update.values)
            return submit(update)

        self.federation.submit_update = recording  # type: ignore[method-assign]
        self.federation.register(_declaration(*BETA))
        if phase == "waiting":
            return
        self.federation.register(_declaration(*ALPHA))
        self.payloads = {silo: self.federation.payload(silo, 1) for silo in ("alpha", "beta")}
        self.honest = {"alpha": shifted(self.payloads["alpha"].values, 0.001), "beta": self.payloads["beta"].values}
        if phase == "finishing":
            for silo in ("alpha", "beta"):
                self.upload_honest(silo)

    def frames(
        self, silo: str, values: ComponentValues | None = None, chunk_bytes: int = 16 * 1024
    ) -> list[pb.TensorFrame]:
        payload = self.payloads[silo]
        samples = {"alpha": ALPHA[2], "beta": BETA[2]}[silo]
        return list(
            encode_stream(
                values or self.honest[silo],
                payload.layout,
                self.config.wire.dtype,
                chunk_bytes,
                StreamInfo(1, '{"task_losses": {}}', {c: float(samples) for c in payload.layout}),
            )
        )

    def upload_honest(self, silo: str) -> None:
        context = FakeContext(silo)
        self.servicer.Upload(iter(self.frames(silo)), context)

    def expected_aggregate(self) -> ComponentValues:
        """The global values the honest updates of alpha (10 samples) and beta (6) give."""
        weights = {"alpha": float(ALPHA[2]), "beta": float(BETA[2])}
        current = {c: dict(ts) for c, ts in self.payloads["alpha"].values.items()}
        current.update({c: dict(ts) for c, ts in self.payloads["beta"].values.items()})
        out = {}
        for component, tensors in current.items():
            holders = [silo for silo in ("alpha", "beta") if component in self.honest[silo]]
            total = sum(weights[s] for s in holders)
            out[component] = {
                name: torch.stack([self.honest[s][component][name].double() * weights[s] for s in holders])
                .sum(0)
                .div(total)
                .float()
                for name in tensors
            }
        return out

    def round_fingerprint(self) -> tuple:
        status = self.federation.status()
        values = self.federation.global_values()
        return (
            status.phase,
            status.round,
            status.received,
            sum(float(t.double().sum()) for ts in values.values() for t in ts.values()),
        )


def _answer(context: FakeContext) -> tuple[str, str]:
    code = context.code()
    reason = dict(context.trailing).get("tap-reason", "") if context.trailing else ""
    return (code.name if code is not None else "OK"), reason


def _call(
    counts: FuzzCounts, handler: str, call: Callable[[FakeContext], Any], context: FakeContext
) -> tuple[str, Any]:
    """Run one case: its status name (OK, or the refusal's) and the handler's answer."""
    answer = None
    try:
        answer = call(context)
        if handler == "Download":
            answer = list(answer)
    except Aborted:
        pass
    except Exception as exc:  # noqa: BLE001 - anything escaping the handler is what we look for
        counts.fail("crashes", handler, f"{type(exc).__name__}: {exc}")
        counts.record(handler, "crash")
        return "crash", None
    status, reason = _answer(context)
    if status in ("INTERNAL", "UNKNOWN"):
        counts.fail("internal_errors", handler, f"{status} {context.details}")
    counts.record(handler, f"{status} {reason}".strip())
    return status, answer


def _run(strategy: st.SearchStrategy, case: Callable[[Any], None], cases: int, seed: int) -> None:
    @hypothesis_seed(seed)
    @settings(
        max_examples=cases,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(example: Any) -> None:
        case(example)

    run()


# ----------------------------------------------------------------------- handlers


def fuzz_codec(counts: FuzzCounts, cases: int, seed: int) -> None:
    """The decoder on mutated streams (only WireError may come out), and encode -> decode round trips."""
    target_layout: Layout = {"c0": [("w", (3, 5)), ("b", (5,))], "c1": [("x", (70,))]}
    values = {"c0": {"w": torch.randn(3, 5), "b": torch.randn(5)}, "c1": {"x": torch.randn(70)}}
    valid = [f.SerializeToString() for f in encode_stream(values, target_layout, "fp32", 128, StreamInfo(1))]

    @st.composite
    def streams(draw: Callable) -> tuple[bool, list[bytes]]:
        frames = list(valid)
        for _ in range(draw(st.integers(1, 3))):
            frames = _mutate_frames(draw, frames, 1 << 20)
        return draw(st.booleans()), frames

    def case(example: tuple[bool, list[bytes]]) -> None:
        require_all, frames = example
        try:
            decoder = StreamDecoder(target_layout, "fp32", require_all=require_all)
            for raw in frames:
                decoder.feed(pb.TensorFrame.FromString(raw))
            out = decoder.finish()
            answer = "OK"
            if any(not torch.equal(out[c][n], values[c][n]) for c in out for n in out[c]):
                counts.fail("aggregate_corruptions", "codec", "a stream the decoder accepted carried other values")
        except WireError as exc:
            answer = f"refused {exc.reason}"
        except DecodeError:  # bytes that are no frame: the safe deserializer's job, before the codec
            answer = "not protobuf"
        except Exception as exc:  # noqa: BLE001 - anything else out of the codec is a crash
            counts.fail("crashes", "codec", f"{type(exc).__name__}: {exc}")
            answer = "crash"
        counts.record("codec", answer)

    _run(streams(), case, cases, seed)

    @st.composite
    def tensors(draw: Callable) -> tuple[str, dict]:
        dtype = draw(st.sampled_from(["fp32", "bf16", "fp16"]))
        shapes = draw(st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=4))
        chunk = draw(st.sampled_from([1, 7, 64, 4096]))
        return dtype, {"shapes": shapes, "chunk": chunk, "seed": draw(st.integers(0, 2**16))}

    def roundtrip(example: tuple[str, dict]) -> None:
        dtype, spec = example
        generator = torch.Generator().manual_seed(spec["seed"])
        layout = {"c": [(f"t{i}", tuple(shape)) for i, shape in enumerate(spec["shapes"])]}
        data = {"c": {name: torch.randn(shape, generator=generator) for name, shape in layout["c"]}}
        try:
            decoder = StreamDecoder(layout, dtype)
            for frame in encode_stream(data, layout, dtype, spec["chunk"], StreamInfo(0)):
                decoder.feed(pb.TensorFrame.FromString(frame.SerializeToString()))
            out = decoder.finish()
            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            if any(not torch.equal(out["c"][n], t.to(torch_dtype).float()) for n, t in data["c"].items()):
                counts.fail("aggregate_corruptions", "codec", f"round trip changed values ({dtype}, {spec})")
            counts.record("codec", "round trip")
        except Exception as exc:  # noqa: BLE001
            counts.fail("crashes", "codec", f"round trip {dtype} {spec}: {type(exc).__name__}: {exc}")
            counts.record("codec", "crash")

    _run(tensors(), roundtrip, max(1, cases // 4), seed + 1)


def _mutate_frames(draw: Callable, frames: list[bytes], max_bytes: int) -> list[bytes]:
    """One mutation of a serialised stream: reorder, drop, duplicate, cut, flip, rewrite a field, pad, garbage."""
    frames = list(frames)
    how = draw(
        st.sampled_from(
            [
                "drop",
                "duplicate",
                "swap",
                "truncate",
                "flip",
                "field",
                "field",
                "field",
                "empty",
                "second_header",
                "garbage",
                "oversize",
                "extend",
            ]
        )
    )
    i = draw(st.integers(0, len(frames) - 1)) if frames else 0
    if not frames or how == "garbage":
        frames.insert(i, draw(st.binary(max_size=64)))
    elif how == "drop":
        del frames[i]
    elif how == "duplicate":
        frames.insert(i, frames[i])
    elif how == "swap":
        j = draw(st.integers(0, len(frames) - 1))
        frames[i], frames[j] = frames[j], frames[i]
    elif how == "truncate":
        frames = frames[: draw(st.integers(0, len(frames)))]
    elif how == "flip" and frames[i]:
        data = bytearray(frames[i])
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        frames[i] = bytes(data)
    elif how == "empty":
        frames.insert(i, b"")
    elif how == "oversize":
        frames.insert(i, b"\x12" + b"\xff" * (max_bytes + 1))
    else:
        try:
            frame = pb.TensorFrame.FromString(frames[i])
        except DecodeError:  # an earlier mutation made it garbage: leave it so
            return frames
        if how == "second_header" or (how == "field" and draw(st.booleans()) and frame.HasField("header")):
            _mutate_header(draw, frame.header)
        elif how == "extend" and frame.pieces:
            piece = frame.pieces[draw(st.integers(0, len(frame.pieces) - 1))]
            piece.data += draw(st.binary(min_size=1, max_size=16))
        elif frame.pieces:
            _mutate_piece(draw, frame.pieces[draw(st.integers(0, len(frame.pieces) - 1))])
        else:
            _mutate_header(draw, frame.header)
        frames[i] = frame.SerializeToString()
    return frames


UINT32 = st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1))
UINT64 = st.one_of(st.integers(0, 4), st.integers(0, 2**64 - 1))


def _mutate_header(draw: Callable, header: pb.StreamHeader) -> None:
    what = draw(st.sampled_from(["round", "dtype", "payload_bytes", "components", "weights", "stats"]))
    if what == "round":
        header.round = draw(UINT32)
    elif what == "dtype":
        header.dtype = draw(st.integers(0, 7))
    elif what == "payload_bytes":
        header.payload_bytes = draw(UINT64)
    elif what == "components":
        names = list(header.components)
        op = draw(st.sampled_from(["drop", "duplicate", "rename", "reverse", "add"]))
        if op == "drop" and names:
            names.pop(draw(st.integers(0, len(names) - 1)))
        elif op == "duplicate" and names:
            names.append(names[0])
        elif op == "rename" and names:
            names[draw(st.integers(0, len(names) - 1))] = draw(st.text(max_size=30))
        elif op == "reverse":
            names.reverse()
        else:
            names.append(draw(st.text(max_size=30)))
        del header.components[:]
        header.components.extend(names)
    elif what == "weights":
        keys = list(header.weights) or ["x"]
        key = draw(st.one_of(st.sampled_from(keys), st.text(max_size=20)))
        if draw(st.booleans()) and key in header.weights:
            del header.weights[key]
        else:
            header.weights[key] = draw(FLOATS)
    else:
        header.stats_json = draw(
            json_documents(
                {
                    "task_losses": {"shapes": 0.5},
                    "personal_losses": {},
                    "replacements": [
                        {
                            "round": 1,
                            "task": "shapes",
                            "global_loss": 0.5,
                            "personal_loss": None,
                            "margin": 0.01,
                            "components": ["head.shapes"],
                        }
                    ],
                    "train_seconds": 1.0,
                    "samples_seen": 10,
                    "scores": {},
                    "scores_round": 0,
                }
            )
        )


def _mutate_piece(draw: Callable, piece: pb.TensorPiece) -> None:
    what = draw(st.sampled_from(["component", "tensor", "offset", "dtype", "shape", "crc32", "data"]))
    if what in ("component", "tensor"):
        setattr(piece, what, draw(UINT32))
    elif what == "offset":
        piece.offset = draw(UINT64)
    elif what == "dtype":
        piece.dtype = draw(st.integers(0, 7))
    elif what == "shape":
        del piece.shape[:]
        piece.shape.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)))
    elif what == "crc32":
        piece.crc32 = draw(UINT32)
    else:
        piece.data = piece.data[: draw(st.integers(0, len(piece.data)))]


def fuzz_handlers(counts: FuzzCounts, cases: int, seed: int, config: FederationConfig) -> None:
    """Every RPC handler of the servicer, in process, with its request as bytes (through the safe deserializer)."""
    from tap_server.intake import safe_deserializer

    max_bytes = config.wire.max_message_bytes
    training = Target(config)
    unary = {
        "Hello": (pb.HelloRequest, pb.HelloRequest(client_version="0.1.0"), lambda t: t.servicer.Hello),
        "Poll": (pb.PollRequest, pb.PollRequest(wait_s=0.0), lambda t: t.servicer.Poll),
        "Heartbeat": (
            pb.HeartbeatRequest,
            pb.HeartbeatRequest(round=1, activity="training"),
            lambda t: t.servicer.Heartbeat,
        ),
        "Download": (pb.DownloadRequest, pb.DownloadRequest(round=1), lambda t: t.servicer.Download),
    }
    for offset, (handler, (message, valid, method)) in enumerate(unary.items()):

        def case(example: tuple[bytes, str], message=message, method=method, handler=handler) -> None:
            raw, silo = example
            request = safe_deserializer(message.FromString, max_bytes)(raw)
            if isinstance(request, pb.PollRequest) and request.wait_s > 0.01:
                request.wait_s = 0.01  # (every silo here gets its answer at once; NaN, inf and < 0 stay)
            before = training.round_fingerprint()
            _call(counts, handler, lambda ctx: method(training)(request, ctx), FakeContext(silo))
            if training.round_fingerprint() != before:
                counts.fail("aggregate_corruptions", handler, f"{raw[:80]!r} changed the round")

        silos = st.sampled_from(["alpha", "gamma"])  # in the round (its turn), and provisioned but never joined
        _run(st.tuples(message_bytes(valid, max_bytes), silos), case, cases, seed + 10 + offset)

    fuzz_join(counts, cases, seed + 20, config)
    fuzz_results(counts, cases, seed + 30, config)
    fuzz_upload(counts, cases, seed + 40, config)


def fuzz_join(counts: FuzzCounts, cases: int, seed: int, config: FederationConfig) -> None:
    waiting = Target(config, phase="waiting")
    base = _declaration(*ALPHA).to_json()

    def case(text: str) -> None:
        request = pb.JoinRequest(declaration_json=text)
        _call(counts, "Join", lambda ctx: waiting.servicer.Join(request, ctx), FakeContext("alpha"))
        if waiting.federation.status().phase != "waiting_for_silos":
            counts.fail("crashes", "Join", "a fuzzed declaration started a federation that expects 1000 silos")

    _run(json_documents(base), case, cases, seed)


def fuzz_results(counts: FuzzCounts, cases: int, seed: int, config: FederationConfig) -> None:
    target = Target(config, phase="finishing")
    base = {
        "silo": "alpha",
        "tasks": [
            {
                "silo": "alpha",
                "task": "shapes",
                "kind": "classification",
                "metrics": {"accuracy": 0.5},
                "primary": 0.5,
                "steps": 3,
                "baseline": 0.5,
                "test_examples": 10,
            }
        ],
        "kd_losses": {"shapes": 0.1},
        "stage1_metrics": {"shapes": {"accuracy": 0.4}},
        "seconds": 1.0,
    }

    def case(text: str) -> None:
        nonlocal target
        request = pb.ResultsRequest(results_json=text)
        status, _ = _call(
            counts, "ReportResults", lambda ctx: target.servicer.ReportResults(request, ctx), FakeContext("alpha")
        )
        if status == "OK":  # a variant that is still valid: record it, and start again from a fresh federation
            target = Target(config, phase="finishing")

    _run(json_documents(base), case, cases, seed)


def fuzz_upload(counts: FuzzCounts, cases: int, seed: int, config: FederationConfig) -> None:
    """Mutated uploads of alpha's honest update: refused without a trace, or accepted carrying the honest values."""
    from tap_server.intake import safe_deserializer

    state = {"target": Target(config)}
    valid = [f.SerializeToString() for f in state["target"].frames("alpha")]
    parse = safe_deserializer(None, config.wire.max_message_bytes)  # as the server: frames reach Upload as bytes

    @st.composite
    def uploads(draw: Callable) -> list[bytes]:
        if draw(st.booleans()):
            return _contradictory_upload(draw, state["target"])
        frames = list(valid)
        for _ in range(draw(st.integers(1, 3))):
            frames = _mutate_frames(draw, frames, config.wire.max_message_bytes)
        return frames

    def case(frames: list[bytes]) -> None:
        target = state["target"]
        before = target.round_fingerprint()
        target.submitted.clear()
        status, _ = _call(
            counts,
            "Upload",
            lambda ctx: target.servicer.Upload(iter([parse(f) for f in frames]), ctx),
            FakeContext("alpha"),
        )
        if status != "OK":
            if target.round_fingerprint() != before:
                counts.fail("aggregate_corruptions", "Upload", f"a refused upload ({status}) changed the round")
            return
        accepted = target.submitted[-1]
        honest = target.honest["alpha"]
        if any(not torch.equal(accepted[c][n], honest[c][n]) for c in honest for n in honest[c]):
            counts.fail("aggregate_corruptions", "Upload", "an accepted upload carried other values than were sent")
        _check_round_closes_on_honest_updates(counts, target)
        state["target"] = Target(config)

    _run(uploads(), case, cases, seed)
    _check_round_closes_on_honest_updates(counts, state["target"], alpha_too=True)


def _contradictory_upload(draw: Callable, target: Target) -> list[bytes]:
    """A well-framed upload (right CRCs) whose content must be refused: non-finite or far-off values, weights that
    contradict the declaration, stats of foreign tasks, another round."""
    honest = target.honest["alpha"]
    values = {c: {n: t.clone() for n, t in ts.items()} for c, ts in honest.items()}
    component = draw(st.sampled_from(sorted(values)))
    name = draw(st.sampled_from(sorted(values[component])))
    weights = {c: float(ALPHA[2]) for c in values}
    stats, round_index = '{"task_losses": {}}', 1
    how = draw(
        st.sampled_from(["nan", "inf", "huge", "scaled", "weight", "weights_missing", "weight_extra", "stats", "round"])
    )
    tensor = values[component][name]
    if how in ("nan", "inf") and tensor.numel():
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = float(how) * draw(st.sampled_from([1, -1]))
    elif how == "huge":
        tensor.fill_(draw(st.sampled_from([1e30, -1e30, 3e38])))
    elif how in ("scaled", "nan", "inf"):
        for t in values[component].values():
            t.mul_(1e6).add_(1.0)
    elif how == "weight":
        weights[component] = draw(FLOATS.filter(lambda w: w != float(ALPHA[2])))
    elif how == "weights_missing":
        del weights[component]
    elif how == "weight_extra":
        weights[draw(st.text(max_size=20).filter(lambda k: k not in weights))] = 1.0
    elif how == "stats":
        stats = json.dumps({"task_losses": {draw(st.text(max_size=10).filter(lambda k: k != "shapes")): 0.5}})
    else:
        round_index = draw(st.integers(0, 2**32 - 1).filter(lambda r: r != 1))
    layout = target.payloads["alpha"].layout
    frames = encode_stream(
        values,
        layout,
        target.config.wire.dtype,
        draw(st.sampled_from([4096, 65536])),
        StreamInfo(round_index, stats, weights),
    )
    return [f.SerializeToString() for f in frames]


def _check_round_closes_on_honest_updates(counts: FuzzCounts, target: Target, alpha_too: bool = False) -> None:
    """Close the round with the honest updates; the aggregate must be exactly theirs (nothing refused left a trace)."""
    for silo in (["alpha"] if alpha_too else []) + ["beta"]:
        target.upload_honest(silo)
    expected, after = target.expected_aggregate(), target.federation.global_values()
    error = max(float((after[c][n] - t).abs().max()) for c, ts in expected.items() for n, t in ts.items())
    if target.federation.status().phase != "finishing" or error > 1e-6:
        counts.fail("aggregate_corruptions", "Upload", f"the round closed on another aggregate (max diff {error:g})")


# --------------------------------------------------------------------- over mTLS


def fuzz_over_grpc(counts: FuzzCounts, cases: int, seed: int, config: FederationConfig) -> None:
    """Raw bytes through a real mTLS server: every answer a status of ours, the server alive, the round intact."""
    rng = random.Random(seed)
    config = with_config(config, expected_silos=2)
    with running_server(["alpha", "beta", "gamma"], config) as h:
        alpha, beta, gamma = h.connect("alpha"), h.connect("beta"), h.connect("gamma")
        alpha.join_task(IMAGE_TASK, 10, ["a", "b"])
        beta.join_task(TEXT_TASK, 6, ["neg", "pos"])
        alpha.download(1)
        beta.download(1)
        honest = shifted(alpha.values, 0.001)
        valid_upload = [f.SerializeToString() for f in alpha.frames(honest)]
        requests = {
            "Hello": pb.HelloRequest(client_version="x"),
            "Join": pb.JoinRequest(declaration_json="{}"),
            "Poll": pb.PollRequest(wait_s=0),
            "Heartbeat": pb.HeartbeatRequest(round=1),
            "ReportResults": pb.ResultsRequest(results_json="{}"),
            "Download": pb.DownloadRequest(round=1),
        }
        declaration = json.loads(json.dumps(_declaration(*ALPHA).to_json()))
        accepted = False
        for handler, valid in requests.items():
            streaming = handler == "Download"
            call = (h.connect("gamma").channel.unary_stream if streaming else gamma.channel.unary_unary)(
                f"/tap.v1.Federation/{handler}", request_serializer=None, response_deserializer=None
            )

            def case(raw: bytes, handler=handler, call=call, streaming=streaming) -> None:
                _grpc_case(counts, handler, lambda: list(call(raw, timeout=15)) if streaming else call(raw, timeout=15))

            strategy = message_bytes(valid, config.wire.max_message_bytes)
            if handler == "Join":
                strategy = json_documents(declaration).map(
                    lambda t: pb.JoinRequest(declaration_json=t).SerializeToString()
                )
            _run(strategy, case, cases, rng.randrange(2**31))
        upload = alpha.channel.stream_unary(
            "/tap.v1.Federation/Upload", request_serializer=None, response_deserializer=None
        )

        @st.composite
        def uploads(draw: Callable) -> list[bytes]:
            frames = list(valid_upload)
            for _ in range(draw(st.integers(1, 3))):
                frames = _mutate_frames(draw, frames, config.wire.max_message_bytes)
            return frames

        def upload_case(frames: list[bytes]) -> None:
            nonlocal accepted
            before = h.federation.status().received
            status = _grpc_case(counts, "Upload", lambda: upload(iter(frames), timeout=15))
            if status == "OK":
                accepted = True
            elif h.federation.status().received != before:
                counts.fail(
                    "aggregate_corruptions", "Upload", f"a refused upload ({status}) over gRPC changed the round"
                )

        _run(uploads(), upload_case, cases, rng.randrange(2**31))
        if not accepted:
            alpha.upload(honest)
        beta.upload()
        after = h.federation.global_values()
        for component, tensors in alpha.values.items():
            for name in tensors:
                shared = component in beta.layout
                want = (
                    honest[component][name].double() * 10 + (beta.values[component][name].double() * 6 if shared else 0)
                ) / (16 if shared else 10)
                if float((after[component][name].double() - want).abs().max()) > 1e-6:
                    counts.fail(
                        "aggregate_corruptions",
                        "Upload",
                        f"over gRPC the round closed on another aggregate ({component}/{name})",
                    )
                    return


def _grpc_case(counts: FuzzCounts, handler: str, call: Callable[[], Any]) -> str:
    try:
        call()
        status, reason = "OK", ""
    except grpc.RpcError as exc:
        status = exc.code().name
        reason = dict(exc.trailing_metadata() or ()).get("tap-reason", "")
        if status in ("INTERNAL", "UNKNOWN"):
            counts.fail("internal_errors", f"{handler} (gRPC)", f"{status} {exc.details()}")
        elif status in ("DEADLINE_EXCEEDED", "UNAVAILABLE") or (not reason and status != "RESOURCE_EXHAUSTED"):
            counts.fail("crashes", f"{handler} (gRPC)", f"{status} {exc.details()}")
    counts.record(f"{handler} (gRPC)", f"{status} {reason}".strip())
    return status


# -------------------------------------------------------------------- the campaign


def run_campaign(
    cases_per_handler: int | None = None,
    grpc_cases: int | None = None,
    seed: int = 0,
    config: FederationConfig = TINY_CONFIG,
) -> FuzzCounts:
    """The whole campaign: the codec and every handler in process (``cases_per_handler`` each), then over mTLS."""
    cases = cases_per_handler if cases_per_handler is not None else cases_from_env()
    through_grpc = grpc_cases if grpc_cases is not None else max(5, cases // 20)
    counts = FuzzCounts()
    started = time.perf_counter()
    fuzz_codec(counts, cases, seed)
    fuzz_handlers(counts, cases, seed, config)
    fuzz_over_grpc(counts, through_grpc, seed, config)
    counts.seconds = round(time.perf_counter() - started, 1)
    return counts
