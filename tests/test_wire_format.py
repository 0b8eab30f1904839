"""Frames written and read at the protobuf wire level (tap_core.wire_format) agree with protobuf itself.

The writer must produce exactly what ``SerializeToString`` produces; the reader must
read any valid encoding of a ``TensorFrame`` as protobuf does, hand out piece data
without copying it, and refuse anything else as ``malformed`` (never another error).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tap_core.errors import WireError
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.wire import StreamDecoder, StreamInfo, encode_frames, encode_stream
from tap_core.wire_format import LEN, VARINT, crc32, parse_frame, varint

LAYOUT = {
    "enc": [("w", (3, 5)), ("b", (7,)), ("s", ()), ("empty", (0, 2))],
    "head": [("big", (40, 33))],
}


def values(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {c: {n: torch.randn(shape, generator=gen) for n, shape in tensors} for c, tensors in LAYOUT.items()}


def frames(chunk_bytes: int = 256, **info) -> list[bytes]:
    return list(encode_frames(values(), LAYOUT, "fp32", chunk_bytes, StreamInfo(3, **info)))


def fields_of(piece) -> tuple:
    return (piece.component, piece.tensor, piece.offset, bytes(piece.data), piece.dtype, list(piece.shape), piece.crc32)


def assert_same_as_protobuf(message: bytes) -> None:
    ours, theirs = parse_frame(message), pb.TensorFrame.FromString(message)
    assert [fields_of(p) for p in ours.pieces] == [fields_of(p) for p in theirs.pieces]
    assert (ours.header is not None) == theirs.HasField("header")
    if ours.header is not None:
        assert ours.header == theirs.header


@pytest.mark.parametrize("chunk_bytes", [1, 100, 256, 1 << 20])
def test_writer_produces_what_protobuf_serialises(chunk_bytes):
    for message in frames(chunk_bytes, stats_json='{"x": 1}', weights={"enc": 2.0}):
        assert pb.TensorFrame.FromString(message).SerializeToString() == message
        assert_same_as_protobuf(message)


def test_reader_takes_piece_data_as_views_of_the_message():
    message = frames(1 << 20)[2]  # "head": one piece of 40 x 33 floats
    piece = parse_frame(message).pieces[0]
    assert isinstance(piece.data, memoryview) and piece.data.obj is message and len(piece.data) == 40 * 33 * 4


def test_bytes_and_protobuf_frames_decode_alike():
    raw = frames()
    decoders = [StreamDecoder(LAYOUT, "fp32") for _ in range(2)]
    for message, frame in zip(raw, encode_stream(values(), LAYOUT, "fp32", 256, StreamInfo(3))):
        decoders[0].feed(message)
        decoders[1].feed(frame)
    a, b = (d.finish() for d in decoders)
    assert decoders[0].wire_bytes == decoders[1].wire_bytes == sum(len(m) + 5 for m in raw)
    for component, tensors in LAYOUT.items():
        for name, _ in tensors:
            assert torch.equal(a[component][name], b[component][name])
            assert torch.equal(a[component][name], values()[component][name])


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _key(number, wire_type) + (varint(len(payload)) + payload if wire_type == LEN else payload)


def test_reader_accepts_any_valid_encoding():
    """Field order, unpacked repeated fields, unknown fields of every wire type, a repeated singular field."""
    data = bytes(range(24))
    piece = b"".join(
        [
            _field(99, VARINT, varint(123456)),  # unknown varint
            _field(7, 5, zlib.crc32(data).to_bytes(4, "little")),  # crc32 before everything
            _field(6, VARINT, varint(2)),
            _field(6, VARINT, varint(3)),  # shape unpacked: (2, 3)
            _field(6, LEN, varint(4)),  # ... and one more, packed: (2, 3, 4)
            _field(4, LEN, b"stale"),
            _field(4, LEN, data),  # data twice: the last one counts
            _field(5, VARINT, varint(pb.FLOAT32)),
            _field(98, 1, b"\0" * 8),
            _field(97, 5, b"\0" * 4),
            _field(96, LEN, b"skip me"),  # fixed64, fixed32, bytes
            _field(2, VARINT, varint(1)),
            _field(1, VARINT, varint(2)),
            _field(3, VARINT, varint(8)),
        ]
    )
    message = _field(50, LEN, b"unknown frame field") + _field(2, LEN, piece)
    assert_same_as_protobuf(message)
    read = parse_frame(message).pieces[0]
    assert (read.component, read.tensor, read.offset, bytes(read.data), read.shape) == (2, 1, 8, data, [2, 3, 4])


def test_reader_wraps_integers_as_protobuf_does():
    piece = _field(1, VARINT, varint((1 << 32) + 5)) + _field(6, LEN, varint(-3)) + _field(5, VARINT, varint(-1))
    assert_same_as_protobuf(_field(2, LEN, piece))
    read = parse_frame(_field(2, LEN, piece)).pieces[0]
    assert read.component == 5 and read.shape == [-3] and read.dtype == -1


@pytest.mark.parametrize(
    "message, problem",
    [
        (b"\x12\x05\x08", "past the frame"),  # piece shorter than announced
        (b"\x12\x02\x22\x05", "past its piece"),  # data longer than its piece
        (b"\x12\x01\x80", "truncated varint"),
        (b"\x0a\x03\x08\xff\xff", "stream header"),  # header that is no StreamHeader
        (b"\x0a\x00\x0a\x00", "second stream header"),
        (b"\x13", "wire type 3"),  # groups are not proto3
        (b"\x10\x01", "frame field 2 with wire type 0"),
        (b"\x12\x02\x20\x01", "piece field 4 with wire type 0"),
        (b"\x12\x0b\x08" + b"\xff" * 10, "longer than 10 bytes"),
    ],
)
def test_malformed_frames_are_refused_with_the_reason(message, problem):
    with pytest.raises(WireError) as info:
        parse_frame(message)
    assert info.value.reason == "malformed" and problem in str(info.value)


_VALID = frames(64, stats_json='{"a": 1}')


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(_VALID) - 1),
    st.lists(
        st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 10**6), st.integers(0, 255)), max_size=3
    ),
)
def test_damaged_bytes_are_refused_or_read_exactly_as_protobuf_reads_them(index, damage):
    message = bytearray(_VALID[index])
    for kind, position, value in damage:
        at = position % (len(message) + 1)
        if kind == "flip" and at < len(message):
            message[at] ^= value or 1
        elif kind == "cut":
            del message[at:]
        else:
            message[at:at] = bytes([value])
    message = bytes(message)
    try:
        ours = parse_frame(message)
    except WireError as exc:
        assert exc.reason == "malformed"
        return
    theirs = pb.TensorFrame.FromString(message)  # whatever we read, protobuf reads too, and the same
    assert [fields_of(p) for p in ours.pieces] == [fields_of(p) for p in theirs.pieces]
    assert ours.header == (theirs.header if theirs.HasField("header") else None)


def test_crc32_is_zlibs():
    data = bytes(range(256)) * 1000
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[100:5000], 12345) == zlib.crc32(memoryview(data)[100:5000], 12345)
