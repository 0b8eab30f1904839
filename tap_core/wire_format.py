"""``TensorFrame`` messages at the protobuf wire level: written around tensor memory, read without copying it.

python-protobuf copies a ``bytes`` field on every step: into the message when it is set,
into the serialised string, out of a parsed message again when ``piece.data`` is read.
For tensor streams those copies were most of the CPU time, so the frames are written
and read here directly in protobuf's wire format (the message definitions in
``proto/tap/v1/federation.proto`` are unchanged; any protobuf library reads these
frames and writes frames this module reads):

- :func:`frame_message` joins a frame's small field headers and the tensors' own memory
  (memoryviews) into the one ``bytes`` object gRPC sends — one copy, which gRPC's own
  serialisation step would otherwise make;
- :func:`parse_frame` walks a received message and hands out each piece's ``data`` as a
  memoryview into it, so the decoder copies the bytes once, into the tensor;
- :func:`crc32` is the checksum both ends compute over every byte (CRC-32 as ``zlib.crc32``,
  from ISA-L when installed: at ~2 GB/s, zlib's alone cost a tenth of a raw stream's time).

Fields are written in field-number order, proto3 defaults (0, empty) omitted, ``shape``
packed: what ``SerializeToString`` writes for the same frame. The reader accepts any
valid encoding of a ``TensorFrame`` (any field order, packed or unpacked ``shape``,
unknown fields skipped) and raises ``WireError("malformed")`` for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from google.protobuf.message import DecodeError

try:  # ISA-L's CRC-32 (carry-less multiplication): the same checksum as zlib.crc32, ~4x faster
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is the optional `fast` extra; zlib's is the same function, slower
    from zlib import crc32  # noqa: F401

from tap_core.errors import WireError
from tap_core.proto.tap.v1 import federation_pb2 as pb

Buffer = Union[bytes, memoryview]

# wire types
VARINT, I64, LEN, I32 = 0, 1, 2, 5
# TensorFrame: header = 1, pieces = 2; TensorPiece: component = 1 ... crc32 = 7 (federation.proto)
FRAME_HEADER, FRAME_PIECES = 1, 2
PIECE_COMPONENT, PIECE_TENSOR, PIECE_OFFSET, PIECE_DATA, PIECE_DTYPE, PIECE_SHAPE, PIECE_CRC32 = range(1, 8)
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_EMPTY = memoryview(b"")


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (negative int64: its 64-bit two's complement)."""
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


_COMPONENT, _TENSOR, _OFFSET = _key(PIECE_COMPONENT, VARINT), _key(PIECE_TENSOR, VARINT), _key(PIECE_OFFSET, VARINT)
_DATA, _DTYPE, _SHAPE, _CRC = (
    _key(PIECE_DATA, LEN),
    _key(PIECE_DTYPE, VARINT),
    _key(PIECE_SHAPE, LEN),
    _key(PIECE_CRC32, I32),
)
_HEADER, _PIECE = _key(FRAME_HEADER, LEN), _key(FRAME_PIECES, LEN)


def piece_parts(
    component: int,
    tensor: int,
    offset: int,
    data: Buffer,
    dtype: int = 0,
    shape: Sequence[int] | None = None,
    crc32: int = 0,
) -> list[Buffer]:
    """One ``TensorPiece`` as a frame field (key, length, body), ``data`` included by reference."""
    head = bytearray()
    if component:
        head += _COMPONENT + varint(component)
    if tensor:
        head += _TENSOR + varint(tensor)
    if offset:
        head += _OFFSET + varint(offset)
    size = len(data)
    if size:
        head += _DATA + varint(size)
    tail = bytearray()
    if dtype:
        tail += _DTYPE + varint(dtype)
    if shape:
        packed = b"".join(varint(d) for d in shape)
        tail += _SHAPE + varint(len(packed)) + packed
    if crc32:
        tail += _CRC + crc32.to_bytes(4, "little")
    body = len(head) + size + len(tail)
    parts: list[Buffer] = [_PIECE + varint(body) + head]
    if size:
        parts.append(data)
    if tail:
        parts.append(bytes(tail))
    return parts


def header_field(header: pb.StreamHeader) -> bytes:
    """The ``header`` field of a frame."""
    body = header.SerializeToString()
    return _HEADER + varint(len(body)) + body


def frame_message(parts: Sequence[Buffer]) -> bytes:
    """The serialised frame: its fields (``header_field``, ``piece_parts``) joined — the one copy of the tensor bytes."""
    return b"".join(parts)


# ------------------------------------------------------------------------------- reading


@dataclass(slots=True)
class Piece:
    """A ``TensorPiece`` as read: ``data`` is a view into the received message."""

    component: int = 0
    tensor: int = 0
    offset: int = 0
    data: memoryview = _EMPTY
    dtype: int = 0
    shape: list[int] = field(default_factory=list)
    crc32: int = 0


@dataclass(slots=True)
class Frame:
    header: pb.StreamHeader | None
    pieces: list[Piece]


def _malformed(what: str) -> WireError:
    return WireError("malformed", f"a frame is not a valid TensorFrame message: {what}")


def _read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise _malformed("varint longer than 10 bytes")


def _skip(buf: Buffer, pos: int, end: int, wire_type: int) -> int:
    """Past an unknown field's value (proto3 readers must skip what they do not know)."""
    if wire_type == VARINT:
        return _read_varint(buf, pos, end)[1]
    if wire_type == I64:
        pos += 8
    elif wire_type == I32:
        pos += 4
    elif wire_type == LEN:
        size, pos = _read_varint(buf, pos, end)
        pos += size
    else:
        raise _malformed(f"wire type {wire_type}")
    if pos > end:
        raise _malformed("truncated field")
    return pos


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def _signed32(value: int) -> int:
    value &= _U32
    return value - (1 << 32) if value >> 31 else value


def _parse_piece(buf: bytes, view: memoryview, pos: int, end: int) -> Piece:
    piece = Piece()
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == PIECE_DATA and wire_type == LEN:
            size, pos = _read_varint(buf, pos, end)
            if pos + size > end:
                raise _malformed("piece data runs past its piece")
            piece.data = view[pos : pos + size]
            pos += size
        elif number in (PIECE_COMPONENT, PIECE_TENSOR, PIECE_OFFSET, PIECE_DTYPE) and wire_type == VARINT:
            value, pos = _read_varint(buf, pos, end)
            if number == PIECE_COMPONENT:
                piece.component = value & _U32
            elif number == PIECE_TENSOR:
                piece.tensor = value & _U32
            elif number == PIECE_OFFSET:
                piece.offset = value
            else:
                piece.dtype = _signed32(value)
        elif number == PIECE_SHAPE and wire_type == LEN:  # packed
            size, pos = _read_varint(buf, pos, end)
            stop = pos + size
            if stop > end:
                raise _malformed("shape runs past its piece")
            while pos < stop:
                value, pos = _read_varint(buf, pos, stop)
                piece.shape.append(_signed64(value))
        elif number == PIECE_SHAPE and wire_type == VARINT:  # unpacked, one element
            value, pos = _read_varint(buf, pos, end)
            piece.shape.append(_signed64(value))
        elif number == PIECE_CRC32 and wire_type == I32:
            if pos + 4 > end:
                raise _malformed("truncated crc32")
            piece.crc32 = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        elif number in (PIECE_COMPONENT, PIECE_TENSOR, PIECE_OFFSET, PIECE_DATA, PIECE_DTYPE, PIECE_SHAPE, PIECE_CRC32):
            raise _malformed(f"piece field {number} with wire type {wire_type}")
        else:
            pos = _skip(buf, pos, end, wire_type)
    if pos != end:
        raise _malformed("a piece field runs past its piece")
    return piece


def parse_frame(message: bytes) -> Frame:
    """The frame's header (parsed; small) and pieces (their data as views into ``message``)."""
    view = memoryview(message)
    end = len(message)
    pos = 0
    header: pb.StreamHeader | None = None
    pieces: list[Piece] = []
    while pos < end:
        key, pos = _read_varint(message, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == LEN and number in (FRAME_HEADER, FRAME_PIECES):
            size, pos = _read_varint(message, pos, end)
            stop = pos + size
            if stop > end:
                raise _malformed("a field runs past the frame")
            if number == FRAME_PIECES:
                pieces.append(_parse_piece(message, view, pos, stop))
            elif header is not None:
                raise WireError("malformed", "a second stream header")
            else:
                try:
                    header = pb.StreamHeader.FromString(bytes(message[pos:stop]))
                except DecodeError as exc:
                    raise _malformed(f"stream header: {exc}") from exc
            pos = stop
        elif number in (FRAME_HEADER, FRAME_PIECES):
            raise _malformed(f"frame field {number} with wire type {wire_type}")
        else:
            pos = _skip(message, pos, end, wire_type)
    return Frame(header, pieces)
