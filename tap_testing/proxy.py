"""A fault-injecting TCP proxy on loopback: what a bad network does to a federation, on demand.

Agents dial the proxy instead of the server; it forwards bytes both ways and,
when told, misbehaves like a real network::

    with FaultProxy(server_port) as proxy:          # agents use --server 127.0.0.1:{proxy.port}
        proxy.drop()                                # reset every open connection now
        proxy.stall(3.0)                            # forward nothing for 3 s (connections stay open: a black hole)
        proxy.partition(3.0)                        # for 3 s the server is unreachable: open connections reset,
                                                    #   new ones refused
        proxy.set_latency(0.05)                     # every byte arrives 50 ms after it was sent
        proxy.set_rate(200_000)                     # a slow link: at most this many bytes/s per direction
        proxy.cut_after(UP, 50_000)                 # reset the next connection once it carried 50 kB upstream
        proxy.refuse(True)                          # close new connections at once
        proxy.idle_timeout_s = 5.0                  # a middlebox that drops connections silent for 5 s

TLS passes through untouched (the proxy never sees plaintext), so the mTLS
checks are the real ones. ``UP`` is agent -> server, ``DOWN`` server -> agent.
Everything runs on one asyncio loop in a daemon thread; the control methods
are thread-safe. :meth:`FaultProxy.stats` counts what happened.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

UP, DOWN = "up", "down"
READ_BYTES = 64 * 1024


@dataclass
class ProxyStats:
    connections: int = 0  # accepted
    refused: int = 0  # closed at once (refuse mode, a partition)
    dropped: int = 0  # reset by drop()
    cut: int = 0  # reset mid-stream by a cut_after rule
    idle_closed: int = 0  # reset by the idle timeout
    bytes: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class _Cut:
    direction: str
    after_bytes: int  # counted from when the rule was set, per connection
    times: int  # how many more connections this rule cuts
    seen: dict[int, int] = field(default_factory=dict)  # id(link) -> bytes carried since the rule was set


class _Link:
    """One proxied connection: the agent's side and the server's side."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter):
        self.writers = {DOWN: client, UP: upstream}  # where bytes of each direction are written
        self.sent = {UP: 0, DOWN: 0}
        self.last_activity = time.monotonic()
        self.closed = False

    def abort(self) -> None:
        """Reset both sides (RST, like a dropped route), not a polite close."""
        if self.closed:
            return
        self.closed = True
        for writer in self.writers.values():
            writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", listen_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.port = 0
        self.idle_timeout_s: float | None = None
        self._stats = ProxyStats()
        self._links: set[_Link] = set()
        self._cuts: list[_Cut] = []
        self._rate: float | None = None  # bytes per second per direction of each connection
        self._latency_s = 0.0  # one-way delay added to every byte
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None  # cleared while stalled
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tap-fault-proxy", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "FaultProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.abort()
            # cancel the idle watcher and the pumps and let them finish, so none is destroyed while pending
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    # ------------------------------------------------------------ faults (thread-safe)

    def drop(self) -> int:
        """Reset every open connection now; returns how many."""

        def run() -> int:
            links = [link for link in self._links if not link.closed]
            for link in links:
                link.abort()
            self._stats.dropped += len(links)
            return len(links)

        return self._call(run)

    def stall(self, seconds: float | None) -> None:
        """Forward nothing for ``seconds`` (None: until :meth:`resume`); connections stay open, bytes wait."""

        def run() -> None:
            assert self._flowing is not None
            self._flowing.clear()
            if seconds is not None:
                self._loop.call_later(seconds, self._flowing.set)

        self._call(run)

    def resume(self) -> None:
        self._call(lambda: self._flowing.set())  # type: ignore[union-attr]

    def partition(self, seconds: float | None) -> int:
        """The server becomes unreachable for ``seconds`` (None: until :meth:`heal`): every open connection is
        reset and new ones are refused. Returns how many were reset."""

        def run() -> int:
            self._refusing = True
            if seconds is not None:
                self._loop.call_later(seconds, lambda: setattr(self, "_refusing", False))
            return 0

        self._call(run)
        return self.drop()

    def heal(self) -> None:
        """End a partition and a stall."""
        self.refuse(False)
        self.resume()

    def set_latency(self, seconds: float) -> None:
        """Every byte is forwarded ``seconds`` after it arrived (each direction; 0: none)."""
        self._call(lambda: setattr(self, "_latency_s", max(0.0, seconds)))

    def set_rate(self, bytes_per_second: float | None) -> None:
        """A slow link (None: full speed)."""
        self._call(lambda: setattr(self, "_rate", bytes_per_second))

    def cut_after(self, direction: str, after_bytes: int, times: int = 1) -> None:
        """Reset the next ``times`` connections once each carried ``after_bytes`` more in ``direction`` (mid-stream)."""
        assert direction in (UP, DOWN), direction
        self._call(lambda: self._cuts.append(_Cut(direction, after_bytes, times)))

    def refuse(self, refusing: bool) -> None:
        """Close new connections as soon as they are accepted (the server looks down)."""
        self._call(lambda: setattr(self, "_refusing", refusing))

    def stats(self) -> ProxyStats:
        def run() -> ProxyStats:
            return ProxyStats(**{**asdict(self._stats), "bytes": dict(self._stats.bytes)})

        return self._call(run)

    def open_connections(self) -> int:
        return self._call(lambda: sum(1 for link in self._links if not link.closed))

    def _call(self, fn):
        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    # ------------------------------------------------------------ the loop

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop.create_task(self._watch_idle())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._stats.connections += 1
        if self._refusing:
            self._stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()  # the server is down: the agent sees a refused connection
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pump(link, reader, UP), self._pump(link, up_reader, DOWN))
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, direction: str) -> None:
        writer = link.writers[direction]
        try:
            while not link.closed:
                data = await reader.read(READ_BYTES)
                if not data:
                    break
                link.last_activity = arrived = time.monotonic()
                if self._latency_s:  # in order: later bytes arrived later, so they wait no less
                    await asyncio.sleep(max(0.0, arrived + self._latency_s - time.monotonic()))
                while data and not link.closed:
                    assert self._flowing is not None
                    await self._flowing.wait()
                    piece = data[: self._piece_size()]
                    data = data[len(piece) :]
                    piece, cut = self._apply_cuts(link, direction, piece)
                    writer.write(piece)
                    link.sent[direction] += len(piece)
                    self._stats.bytes[direction] += len(piece)
                    await writer.drain()
                    if cut:
                        self._stats.cut += 1
                        link.abort()
                        return
                    if self._rate:
                        await asyncio.sleep(len(piece) / self._rate)
        except (ConnectionError, OSError):
            pass
        finally:
            link.abort()

    def _piece_size(self) -> int:
        # on a slow link, forward small pieces so the rate is smooth (a 64 kB burst is not a slow link)
        return READ_BYTES if not self._rate else max(1024, int(self._rate / 20))

    def _apply_cuts(self, link: _Link, direction: str, piece: bytes) -> tuple[bytes, bool]:
        for rule in self._cuts:
            if rule.direction != direction or rule.times <= 0:
                continue
            seen = rule.seen.get(id(link), 0)
            if seen + len(piece) >= rule.after_bytes:
                rule.times -= 1
                self._cuts = [r for r in self._cuts if r.times > 0]
                return piece[: max(0, rule.after_bytes - seen)], True
            rule.seen[id(link)] = seen + len(piece)
        return piece, False

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.idle_timeout_s is None:
                continue
            horizon = time.monotonic() - self.idle_timeout_s
            for link in list(self._links):
                if not link.closed and link.last_activity < horizon:
                    self._stats.idle_closed += 1
                    link.abort()
