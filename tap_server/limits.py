"""What one silo may hold: calls in progress per identity and kind, and the server capacity that makes them fit.

Every call is admitted here before it touches anything shared with other silos
(the federation's lock, the shared upload slots): a silo over its own limit for
a kind is refused at once (``too_many_calls``, RESOURCE_EXHAUSTED, which agents
retry), so it cannot hold the worker threads or the concurrent-call budget the
other silos need. The thread pool is sized so that every provisioned silo can
use all of its limits at the same time (:func:`server_capacity`).

The open calls are also what :class:`CallWatch` checks every half second: a
tensor stream whose peer sends (upload) or takes (download) nothing for
``limits.stream_idle_s``, a stream older than ``limits.stream_max_s``, and every
call of a silo whose certificate was revoked (or removed from silos.json) are
cut with a status that says why.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc

from tap_core.config import FederationConfig, LimitsConfig
from tap_core.errors import IDENTITY, Rejected
from tap_core.transport import channel_options
from tap_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

KINDS = ("poll", "download", "upload", "unary")
STREAMS = ("download", "upload")
_METHOD_KIND = {"Poll": "poll", "Download": "download", "Upload": "upload"}  # every other RPC is 'unary'
SPARE_WORKERS = 16  # threads beyond every silo's limits: unknown callers (refused at once), health checks
WATCH_INTERVAL_S = 0.5
IDENTITY_CHECK_S = 1.0  # how often the watch asks whether the silos with open calls are still provisioned
TRANSPORT_HEADROOM = 4  # the transport takes messages up to this multiple of wire.max_message_bytes (see intake)


def peer_certificate(context: grpc.ServicerContext) -> bytes:
    """The caller's client certificate (PEM) as the TLS layer verified it; empty without one."""
    return (context.auth_context().get("x509_pem_cert") or [b""])[0]


def kind_of(method_name: str) -> str:
    return _METHOD_KIND.get(method_name, "unary")


def per_silo_limit(limits: LimitsConfig, kind: str) -> int:
    return {
        "poll": limits.polls_per_silo,
        "download": limits.downloads_per_silo,
        "upload": limits.uploads_per_silo,
        "unary": limits.unary_per_silo,
    }[kind]


@dataclass(frozen=True)
class Capacity:
    workers: int  # threads of the gRPC server's pool
    max_concurrent_rpcs: int  # gRPC's own bound (calls beyond it: RESOURCE_EXHAUSTED before any handler runs)
    options: list[tuple[str, int | str]]  # channel arguments of the server


def server_capacity(config: FederationConfig, silos: int, min_workers: int) -> Capacity:
    """Threads for every provisioned silo using all its limits at once, plus spares; gRPC's bounds above that.

    A refused call holds a thread for well under a millisecond; an admitted one for as long as it lasts,
    which is what the pool must fit. gRPC's ``maximum_concurrent_rpcs`` (counted before any identity is
    known) is four times the pool, and one connection may open ``limits.streams_per_connection`` streams at
    a time (the client queues the rest), so a flood on a few connections cannot reach it.
    """
    limits = config.limits
    per_silo = sum(per_silo_limit(limits, kind) for kind in KINDS)
    workers = max(min_workers, silos * per_silo + SPARE_WORKERS)
    options = [(key, value) for key, value in channel_options(config) if key != "grpc.max_receive_message_length"]
    options += [
        # oversize frames up to this reach the server's own check and are refused as 'oversize' (intake.py)
        ("grpc.max_receive_message_length", TRANSPORT_HEADROOM * config.wire.max_message_bytes),
        ("grpc.max_concurrent_streams", limits.streams_per_connection),
    ]
    return Capacity(workers, 4 * workers, options)


@dataclass(eq=False)
class OpenCall:
    """One call in progress, as the watch sees it."""

    silo: str
    kind: str
    context: grpc.ServicerContext
    certificate: bytes
    started: float
    waiting_since: float | None = None  # blocked on the peer (reading its frames, or it taking ours) since
    ended: str | None = None  # the reason the server cut it

    @contextmanager
    def waiting(self, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
        """The time inside counts as the peer's: too long and the stream is idle."""
        self.waiting_since = clock()
        try:
            yield
        finally:
            self.waiting_since = None


class CallEnded(Exception):
    """The call was cut (by the watch, or the peer went away): nothing more can be sent on it."""

    def __init__(self, reason: str, counted: bool, cause: BaseException):
        super().__init__(reason)
        self.reason = reason
        self.counted = counted  # the watch counted and logged it when it cut the call
        self.cause = cause


class CallLimiter:
    """Calls in progress per silo and kind; refuses a silo's call beyond its own limit for that kind."""

    def __init__(self, limits: LimitsConfig, metrics: ServerMetrics, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], list[OpenCall]] = {}
        for kind in KINDS:
            metrics.calls_in_flight.labels(kind=kind).set(0)

    @contextmanager
    def call(self, silo: str, kind: str, context: grpc.ServicerContext, certificate: bytes) -> Iterator[OpenCall]:
        """Hold one of ``silo``'s ``kind`` calls for the duration (or :class:`Rejected` ``too_many_calls``)."""
        limit = per_silo_limit(self.limits, kind)
        call = OpenCall(silo, kind, context, certificate, self.clock())
        with self._lock:
            calls = self._open.setdefault((silo, kind), [])
            if len(calls) >= limit:
                raise Rejected(
                    "too_many_calls",
                    f"silo {silo} already has {len(calls)} {kind} call(s) in progress, at "
                    f"most {limit} (limits.{_limit_key(kind)}); retry once one has ended",
                )
            calls.append(call)
        self.metrics.calls_in_flight.labels(kind=kind).inc()
        try:
            yield call
        finally:
            with self._lock:
                calls.remove(call)
            self.metrics.calls_in_flight.labels(kind=kind).dec()

    def open_calls(self) -> list[OpenCall]:
        with self._lock:
            return [call for calls in self._open.values() for call in calls]


def _limit_key(kind: str) -> str:
    return {
        "poll": "polls_per_silo",
        "download": "downloads_per_silo",
        "upload": "uploads_per_silo",
        "unary": "unary_per_silo",
    }[kind]


class CallWatch:
    """Cuts stalled and over-long tensor streams and every open call of a silo that lost its identity.

    ``identify(certificate)`` raises :class:`Rejected` for a certificate no longer accepted (the same check
    every call passes at its start). Runs in one daemon thread while calls are open (started by
    :meth:`ensure_running`); :meth:`sweep` is the check itself, for tests.
    """

    def __init__(
        self, limiter: CallLimiter, identify: Callable[[bytes], str], clock: Callable[[], float] = time.monotonic
    ):
        self.limiter = limiter
        self.identify = identify
        self.clock = clock
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_identity_check = float("-inf")

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tap-call-watch", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        quiet_since = None
        while True:
            time.sleep(WATCH_INTERVAL_S)
            try:
                open_now = self.sweep()
            except Exception:  # never let the watch die: log and go on
                log.exception("call watch failed; retrying")
                continue
            if open_now:
                quiet_since = None
                continue
            quiet_since = quiet_since or self.clock()
            if self.clock() - quiet_since > 10 * WATCH_INTERVAL_S:
                with self._lock:  # the next call starts a new thread (ensure_running)
                    self._thread = None
                return

    def sweep(self) -> int:
        """Cut what must be cut now; returns how many calls are open."""
        limits = self.limiter.limits
        now = self.clock()
        calls = self.limiter.open_calls()
        for call in calls:
            if call.ended is not None or call.kind not in STREAMS:
                continue
            if now - call.started > limits.stream_max_s:
                self._cut(
                    call,
                    "stream_too_long",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{call.kind} stream of silo {call.silo} open for {now - call.started:.0f}s, at most "
                    f"{limits.stream_max_s:g}s (limits.stream_max_s)",
                )
            elif call.waiting_since is not None and now - call.waiting_since > limits.stream_idle_s:
                what = "sent nothing" if call.kind == "upload" else "took nothing"
                self._cut(
                    call,
                    "stream_idle",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{call.kind} stream of silo {call.silo}: the peer {what} for {now - call.waiting_since:.0f}s, "
                    f"at most {limits.stream_idle_s:g}s (limits.stream_idle_s)",
                )
        if calls and now - self._last_identity_check >= IDENTITY_CHECK_S:
            self._last_identity_check = now
            self._cut_lost_identities([c for c in calls if c.ended is None])
        return len(calls)

    def _cut_lost_identities(self, calls: list[OpenCall]) -> None:
        verdicts: dict[bytes, Rejected | None] = {}
        for call in calls:
            if call.certificate not in verdicts:
                try:
                    self.identify(call.certificate)
                    verdicts[call.certificate] = None
                except Rejected as exc:
                    verdicts[call.certificate] = exc if exc.reason in IDENTITY else None
            refusal = verdicts[call.certificate]
            if refusal is not None:
                self._cut(
                    call,
                    refusal.reason,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{call.kind} call of silo {call.silo} ended: {refusal}",
                )

    def _cut(self, call: OpenCall, reason: str, code: grpc.StatusCode, message: str) -> None:
        call.ended = reason
        self.limiter.metrics.rejected.labels(reason=reason).inc()
        log.warning("cut (%s): %s", reason, message)
        cancel(call.context, code, message)


def cancel(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End a call from another thread with ``code`` and ``message``.

    gRPC's public ``cancel()`` answers CANCELLED without a word; its call object can cancel with a status,
    which tells the silo why. (Falls back to the public one should that ever go away.)
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        if call is not None:
            call.cancel(code.value[0], message)
            return
    except Exception:  # noqa: BLE001 - an internal API: anything it raises means "use the public one"
        log.debug("cancel with status failed; cancelling plainly", exc_info=True)
    context.cancel()
