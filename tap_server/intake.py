"""Untrusted bytes in: protobuf messages and JSON documents, refused as ``malformed`` or ``oversize``, never INTERNAL.

gRPC itself answers INTERNAL ("Exception deserializing request!") to bytes that
are not the expected protobuf message, and cuts a message over its receive limit
before any handler sees it. :class:`SafeRequests` (a server interceptor) hands
every request of the federation service through :func:`safe_deserializer`
instead: a message that does not parse, or is larger than
``wire.max_message_bytes``, arrives as an :class:`Undecodable` that the servicer
refuses with its reason. (The transport's own limit is a few times larger, see
``limits.server_capacity``, so an over-size frame is counted as ``oversize``.)

:func:`parse_json` reads the JSON fields of requests (declaration, stats,
results): bounded in size, numbers finite and within 64 bits, no NaN or
Infinity, and nesting that overflows the parser refused as ``malformed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from tap_core.errors import Rejected

SERVICE_PREFIX = "/tap.v1.Federation/"
MAX_JSON_INT = 2**63


@dataclass(frozen=True)
class Undecodable:
    """A request message that was refused before it was parsed (or could not be)."""

    reason: str  # malformed | oversize
    message: str

    def rejected(self) -> Rejected:
        return Rejected(self.reason, self.message)


def safe_deserializer(parse: Callable[[bytes], Any] | None, max_bytes: int) -> Callable[[bytes], Any]:
    """``parse`` bounded in size and refusing instead of raising; ``None`` (a method that receives its
    messages as bytes, e.g. Upload's frames, parsed later by ``StreamDecoder``) passes them on unparsed."""

    def deserialize(data: bytes) -> Any:
        if len(data) > max_bytes:
            return Undecodable(
                "oversize", f"a message of {len(data)} bytes, at most {max_bytes} (wire.max_message_bytes)"
            )
        if parse is None:
            return data
        try:
            return parse(data)
        except (DecodeError, ValueError, RuntimeError) as exc:  # RuntimeError: protobuf's recursion limit
            return Undecodable("malformed", f"not a valid protobuf message of this call: {exc}")

    return deserialize


class SafeRequests(grpc.ServerInterceptor):
    """Give every method of the federation service the safe deserializer of its request type."""

    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        return handler._replace(
            request_deserializer=safe_deserializer(handler.request_deserializer, self.max_message_bytes)
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if abs(value) >= MAX_JSON_INT:
        raise ValueError(f"integer {text[:40]}{'…' if len(text) > 40 else ''} is out of range (64 bits)")
    return value


def parse_json(text: str, what: str, max_bytes: int) -> dict[str, Any]:
    """``text`` as a JSON object, or :class:`Rejected` (``oversize``, ``malformed``) saying what is wrong with it."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise Rejected("oversize", f"{what} has {size} bytes, at most {max_bytes}")
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError as exc:
        raise Rejected("malformed", f"{what} is nested too deeply") from exc
    except ValueError as exc:
        raise Rejected("malformed", f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Rejected("malformed", f"{what} is not valid JSON: not a JSON object")
    return data
