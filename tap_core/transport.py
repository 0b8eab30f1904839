"""gRPC settings both ends share: message limits and keepalive."""

from __future__ import annotations

from tap_core.config import FederationConfig
from tap_core.errors import ConfigError


def channel_options(config: FederationConfig) -> list[tuple[str, int | str]]:
    """Message limits and keepalive (minutes of local training must not look like a dead peer)."""
    limit = config.wire.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"address {address!r}", "expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
