"""The fault-injecting TCP proxy (tap_testing.proxy) in front of a plain echo server on loopback."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from tap_testing.proxy import DOWN, UP, FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with FaultProxy(server.server_address[1]) as fault_proxy:
        yield fault_proxy
    server.shutdown()
    server.server_close()


def _connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed")
        got += chunk
    return got


def _is_reset(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b""
    except OSError:
        return True


def test_forwards_both_ways_and_counts_bytes(proxy):
    with _connect(proxy) as sock:
        payload = bytes(range(256)) * 1000
        assert _echo(sock, payload) == payload
    stats = proxy.stats()
    assert stats.connections == 1
    assert stats.bytes[UP] == stats.bytes[DOWN] == len(payload)


def test_drop_resets_open_connections(proxy):
    with _connect(proxy) as sock:
        assert _echo(sock, b"hello") == b"hello"
        assert proxy.drop() == 1
        assert _is_reset(sock)
    with _connect(proxy) as sock:  # new connections work
        assert _echo(sock, b"again") == b"again"


def test_cut_after_resets_mid_stream_at_the_byte(proxy):
    proxy.cut_after(DOWN, 10_000)
    with _connect(proxy) as sock:
        sock.sendall(b"a" * 30_000)
        got = b""
        with pytest.raises(OSError):
            while chunk := sock.recv(65536):
                got += chunk
            raise ConnectionResetError("closed cleanly")
    assert len(got) == 10_000  # exactly the bytes before the cut reached the client
    assert proxy.stats().cut == 1
    with _connect(proxy) as sock:  # the rule cut one connection only
        assert _echo(sock, b"b" * 30_000) == b"b" * 30_000


def test_partition_refuses_then_heals(proxy):
    with _connect(proxy) as sock:
        assert _echo(sock, b"before") == b"before"
        assert proxy.partition(0.6) == 1
        assert _is_reset(sock)
    with _connect(proxy) as sock:  # accepted by the kernel, reset by the proxy at once
        assert _is_reset(sock)
    time.sleep(0.8)
    with _connect(proxy) as sock:
        assert _echo(sock, b"after") == b"after"
    assert proxy.stats().refused >= 1


def test_stall_holds_bytes_without_closing(proxy):
    with _connect(proxy) as sock:
        proxy.stall(0.5)
        started = time.monotonic()
        assert _echo(sock, b"held") == b"held"
        assert time.monotonic() - started >= 0.45
    assert proxy.stats().dropped == 0


def test_latency_and_rate(proxy):
    with _connect(proxy) as sock:
        proxy.set_latency(0.1)
        started = time.monotonic()
        assert _echo(sock, b"ping") == b"ping"
        assert time.monotonic() - started >= 0.19  # one way each direction
        proxy.set_latency(0)
        proxy.set_rate(200_000)
        started = time.monotonic()
        assert _echo(sock, b"r" * 100_000) == b"r" * 100_000
        assert time.monotonic() - started >= 0.4  # 100 kB at 200 kB/s is half a second


def test_idle_timeout_closes_silent_connections_only(proxy):
    proxy.idle_timeout_s = 0.4
    with _connect(proxy) as busy, _connect(proxy) as silent:
        for _ in range(8):
            assert _echo(busy, b"tick") == b"tick"
            time.sleep(0.1)
        assert _is_reset(silent)
        assert _echo(busy, b"still") == b"still"
    assert proxy.stats().idle_closed == 1
