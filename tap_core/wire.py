"""Tensor streams: component values <-> ``TensorFrame`` messages, never pickle.

Each tensor travels as raw little-endian bytes at the wire dtype, cut into
pieces that fill frames of about ``chunk_bytes``; a frame holds many small
tensors of one component or one slice of a large one. The first piece of a
tensor carries its dtype, shape and CRC-32. Names are not repeated per tensor:
the stream header (a frame of its own) lists the components, and both sides
share the layout (the assignment's ``ComponentLayout``), so a tensor is
referenced by two small indices. That keeps framing at a few bytes per tensor.

Frames travel as serialised ``bytes`` built around the tensors' memory and are
read without copying their data (``tap_core.wire_format``): the sender copies a
tensor's bytes once, into the message; the receiver once, into the tensor it
preallocated, computing the CRC-32 piece by piece on the way.

The decoder checks everything a peer could get wrong (unknown or foreign
component, bad index, dtype, shape, out-of-order or overlapping pieces, size
limit, checksum) and raises :class:`WireError` with a ``reason`` before any
value is used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, NoReturn, Sequence

import numpy as np
import torch

from tap_core.errors import WireError
from tap_core.layout import Layout, layout_bytes
from tap_core.model.tap_model import ComponentValues
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.wire_dtype import WIRE_TORCH_DTYPES
from tap_core.wire_format import Buffer, Piece, crc32, frame_message, header_field, parse_frame, piece_parts

DTYPE_TO_PROTO = {"fp32": pb.FLOAT32, "bf16": pb.BFLOAT16, "fp16": pb.FLOAT16}
PROTO_TO_DTYPE: dict[int, str] = {int(v): k for k, v in DTYPE_TO_PROTO.items()}
GRPC_MESSAGE_PREFIX = 5  # gRPC length-prefixed message framing, per message
FRAMING_ALLOWANCE = 1 << 20  # bytes of headers and framing a stream may add beyond 2x its tensors
_LITTLE_ENDIAN = sys.byteorder == "little"
TensorLayouts = Sequence[tuple[str, tuple[int, ...]]]  # one component's entry of a Layout


def layout_to_proto(layout: Layout) -> list[pb.ComponentLayout]:
    return [
        pb.ComponentLayout(name=c, tensors=[pb.TensorLayout(name=n, shape=list(s)) for n, s in tensors])
        for c, tensors in layout.items()
    ]


def layout_from_proto(messages: Iterable[pb.ComponentLayout]) -> Layout:
    return {m.name: [(t.name, tuple(int(d) for d in t.shape)) for t in m.tensors] for m in messages}


def tensor_to_bytes(tensor: torch.Tensor, dtype: str) -> memoryview:
    """The tensor's bytes at the wire dtype, little-endian (a view; no copy beyond the dtype cast)."""
    t = tensor.detach().to("cpu", WIRE_TORCH_DTYPES[dtype]).contiguous().reshape(-1)
    raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    array = raw.numpy()
    if not _LITTLE_ENDIAN:  # pragma: no cover - every supported platform is little-endian
        array = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).view(np.uint8)
    return array.data.cast("B")


def bytes_to_tensor(buffer: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``buffer`` (uint8, little-endian) without copying it."""
    if buffer.size == 0:
        return torch.empty(shape, dtype=WIRE_TORCH_DTYPES[dtype])
    return torch.from_numpy(buffer).view(WIRE_TORCH_DTYPES[dtype]).reshape(shape)


@dataclass
class StreamInfo:
    """Header fields of a stream besides the tensors."""

    round: int
    stats_json: str = ""
    weights: Mapping[str, float] | None = None


def stream_header(components: list[str], layout: Layout, dtype: str, info: StreamInfo) -> bytes:
    """The first frame of a stream: the header alone (what follows can then be built once and shared)."""
    payload = layout_bytes({c: layout[c] for c in components}, dtype)
    header = pb.StreamHeader(
        round=info.round,
        components=components,
        dtype=DTYPE_TO_PROTO[dtype],
        payload_bytes=payload,
        stats_json=info.stats_json,
    )
    if info.weights:
        header.weights.update({k: float(v) for k, v in info.weights.items()})
    return frame_message([header_field(header)])


def component_frames(
    index: int, component: str, tensors: Mapping[str, torch.Tensor], layout: TensorLayouts, dtype: str, chunk_bytes: int
) -> Iterator[bytes]:
    """Serialised frames of one component (stream index ``index``): its tensors' bytes, at most ``chunk_bytes`` each.

    A frame never mixes components, so a server can build a component's frames once and
    send them in every stream that carries it at the same index. Each frame is one join of
    small field headers and views of the tensors' memory (one copy); each tensor's CRC-32
    is computed once, before its first piece, which carries it.
    """
    proto_dtype = DTYPE_TO_PROTO[dtype]
    parts: list[Buffer] = []
    room = chunk_bytes
    for ti, (name, shape) in enumerate(layout):
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape):
            raise WireError(
                "wrong_shape",
                f"{component}/{name}: value of shape {tuple(tensor.shape)}, the layout says {tuple(shape)}",
            )
        data = tensor_to_bytes(tensor, dtype)
        crc = crc32(data)
        offset = 0
        while True:
            take = min(room, len(data) - offset)
            if offset == 0:
                parts += piece_parts(index, ti, 0, data[:take], proto_dtype, shape, crc)
            else:
                parts += piece_parts(index, ti, offset, data[offset : offset + take])
            offset += take
            room -= take
            if room <= 0:
                yield frame_message(parts)
                parts = []
                room = chunk_bytes
            if offset >= len(data):
                break
    if parts:
        yield frame_message(parts)


def encode_frames(
    values: ComponentValues, layout: Layout, dtype: str, chunk_bytes: int, info: StreamInfo
) -> Iterator[bytes]:
    """Serialised frames carrying ``values`` in ``layout`` order: the header, then each component's frames."""
    components = list(layout)
    yield stream_header(components, layout, dtype, info)
    for index, component in enumerate(components):
        yield from component_frames(index, component, values[component], layout[component], dtype, chunk_bytes)


def encode_stream(
    values: ComponentValues, layout: Layout, dtype: str, chunk_bytes: int, info: StreamInfo
) -> Iterator[pb.TensorFrame]:
    """:func:`encode_frames` as protobuf messages (tests and tools that inspect or alter frames)."""
    for message in encode_frames(values, layout, dtype, chunk_bytes, info):
        yield pb.TensorFrame.FromString(message)


def frame_wire_bytes(frame: pb.TensorFrame | bytes) -> int:
    """Bytes this frame takes as a gRPC message (serialised size + length prefix)."""
    size = len(frame) if isinstance(frame, (bytes, bytearray, memoryview)) else frame.ByteSize()
    return size + GRPC_MESSAGE_PREFIX


def frame_bytes(frame: pb.TensorFrame | bytes) -> bytes:
    """The serialised frame (a received message as it is; a protobuf message serialised)."""
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, (bytearray, memoryview)):
        return bytes(frame)
    return frame.SerializeToString()


def read_header(frame: pb.TensorFrame | bytes) -> pb.StreamHeader | None:
    """The stream header a frame carries, if any (``WireError`` if it is no valid frame)."""
    return parse_frame(frame_bytes(frame)).header


def uninitialised(nbytes: int) -> np.ndarray:
    """A uint8 buffer for a tensor being received, left unwritten until its bytes arrive.

    Allocated by torch, in ordinary pages: numpy asks the kernel for huge pages for arrays
    of 4 MiB or more, and on a busy host with fragmented memory the kernel may compact
    memory for each one (measured: 100 MB received in 3 s instead of 0.2 s).
    """
    return torch.empty(nbytes, dtype=torch.uint8).numpy()


@dataclass
class _Partial:
    buffer: np.ndarray  # uint8, uninitialised until filled: no zeroing pass over large tensors
    received: int
    crc: int  # announced by the first piece
    shape: tuple[int, ...]
    running_crc: int = 0  # of the bytes received so far, computed piece by piece while they are hot in cache


class StreamDecoder:
    """Reassembles a tensor stream against the expected layout, refusing anything off-contract.

    ``expected``: the components (and their layout) this stream must carry;
    ``known``: every component name of the federation, to tell an unknown name
    from one that belongs to someone else.
    """

    def __init__(self, expected: Layout, dtype: str, known: set[str] | None = None, require_all: bool = True):
        self.expected = expected
        self.dtype = dtype
        self.known = known or set(expected)
        self.require_all = require_all
        self.header: pb.StreamHeader | None = None
        self.components: list[str] = []
        self.limit = 0
        self.received = 0
        self.wire_bytes = 0
        self._partial: dict[tuple[int, int], _Partial] = {}
        self._done: dict[tuple[int, int], torch.Tensor] = {}

    def _fail(self, reason: str, message: str) -> NoReturn:
        raise WireError(reason, message)

    def _start(self, header: pb.StreamHeader) -> None:
        if header.dtype != DTYPE_TO_PROTO[self.dtype]:
            got = PROTO_TO_DTYPE.get(header.dtype, f"enum {header.dtype}")
            self._fail("wrong_dtype", f"stream dtype {got}, this federation's wire dtype is {self.dtype}")
        names = list(header.components)
        if len(set(names)) != len(names):
            self._fail("malformed", "the stream header lists a component twice")
        for name in names:
            if name not in self.expected:
                if name in self.known:
                    self._fail("foreign_component", f"component {name} is not one of this stream's components")
                self._fail("unknown_component", f"unknown component {name!r}")
        if self.require_all:
            missing = [c for c in self.expected if c not in names]
            if missing:
                self._fail("missing_component", f"stream lacks component {missing[0]} ({len(missing)} missing)")
        self.components = names
        self.limit = layout_bytes({c: self.expected[c] for c in names}, self.dtype)
        if header.payload_bytes > self.limit:
            self._fail("oversize", f"stream announces {header.payload_bytes} bytes, at most {self.limit} expected")
        self.limit = header.payload_bytes  # and it may not carry more than it announced
        self.header = header

    def feed(self, frame: pb.TensorFrame | bytes) -> None:
        """One frame: a received message (bytes, read without copying its tensor data) or a protobuf message."""
        message = frame_bytes(frame)
        self.wire_bytes += len(message) + GRPC_MESSAGE_PREFIX
        parsed = parse_frame(message)
        if parsed.header is not None:
            if self.header is not None:
                self._fail("malformed", "a second stream header")
            self._start(parsed.header)
        elif self.header is None:
            self._fail("malformed", "the first frame carries no stream header")
        if self.wire_bytes > 2 * self.limit + FRAMING_ALLOWANCE:
            # empty or tiny frames cost nothing in payload: bound the stream itself, not just its tensors
            self._fail("oversize", f"{self.wire_bytes} bytes of frames for {self.limit} bytes of tensors")
        for piece in parsed.pieces:
            self._piece(piece)

    def _piece(self, piece: Piece) -> None:
        if piece.component >= len(self.components):
            self._fail("malformed", f"piece refers to component index {piece.component} of {len(self.components)}")
        component = self.components[piece.component]
        layout = self.expected[component]
        if piece.tensor >= len(layout):
            self._fail(
                "unknown_tensor", f"component {component} has {len(layout)} tensors, piece refers to #{piece.tensor}"
            )
        name, shape = layout[piece.tensor]
        key = (piece.component, piece.tensor)
        if key in self._done:
            self._fail("malformed", f"{component}/{name}: data after the tensor was complete")
        partial = self._partial.get(key)
        if partial is None:
            if piece.offset != 0:
                self._fail("malformed", f"{component}/{name}: first piece at offset {piece.offset}")
            if piece.dtype != DTYPE_TO_PROTO[self.dtype]:
                self._fail(
                    "wrong_dtype",
                    f"{component}/{name}: dtype {PROTO_TO_DTYPE.get(piece.dtype, piece.dtype)}, expected {self.dtype}",
                )
            if tuple(piece.shape) != tuple(shape):
                self._fail("wrong_shape", f"{component}/{name}: shape {tuple(piece.shape)}, expected {tuple(shape)}")
            nbytes = layout_bytes({component: [(name, shape)]}, self.dtype)
            partial = self._partial[key] = _Partial(uninitialised(nbytes), 0, piece.crc32, tuple(shape))
        elif piece.offset != partial.received:
            self._fail("malformed", f"{component}/{name}: piece at offset {piece.offset}, expected {partial.received}")
        end = partial.received + len(piece.data)
        if end > len(partial.buffer):
            self._fail("oversize", f"{component}/{name}: {end} bytes, the tensor has {len(partial.buffer)}")
        self.received += len(piece.data)
        if self.received > self.limit:
            self._fail("oversize", f"stream exceeds the {self.limit} bytes it announced")
        partial.buffer[partial.received : end] = np.frombuffer(piece.data, np.uint8)  # the one copy
        partial.running_crc = crc32(piece.data, partial.running_crc)
        partial.received = end
        if end == len(partial.buffer):
            if partial.running_crc != partial.crc:
                self._fail("bad_checksum", f"{component}/{name}: CRC-32 mismatch (corrupted in transit)")
            self._done[key] = bytes_to_tensor(partial.buffer, self.dtype, partial.shape)
            del self._partial[key]

    def finish(self) -> ComponentValues:
        """The received values as fp32 tensors; every tensor of every listed component must be complete."""
        if self.header is None:
            self._fail("malformed", "empty stream")
        values: ComponentValues = {}
        for ci, component in enumerate(self.components):
            out = values[component] = {}
            for ti, (name, _) in enumerate(self.expected[component]):
                tensor = self._done.get((ci, ti))
                if tensor is None:
                    self._fail("missing_tensor", f"stream ended before {component}/{name} was complete")
                out[name] = tensor.to(torch.float32)
        return values
