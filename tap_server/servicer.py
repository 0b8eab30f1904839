"""The gRPC servicer: thin. Every RPC goes identify -> ask the federation (plain objects) -> stream/decode ->
hand the plain result back.

Every refusal is a :class:`~tap_core.errors.Rejected`, wherever it is decided
(identity, decoding, the federation); :func:`guarded` turns it into its
reason's gRPC status (``tap_core.errors.REASON_STATUS``) with a message saying
what was wrong and the reason in the trailing metadata, counts it in
``tap_rejected_requests_total{reason}``, and nothing in the federation changed.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import grpc

from tap_core.config import FederationConfig, to_mapping
from tap_core.errors import REASON_METADATA_KEY, Rejected, TapError
from tap_core.messages import ClientUpdate, RoundStats, SiloDeclaration, SiloResult
from tap_core.plan import plan_to_json
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_core.version import VERSION
from tap_core.layout import layout_bytes
from tap_core.wire import StreamDecoder, StreamInfo, frame_wire_bytes, layout_to_proto, read_header
from tap_server.auth import SiloAuthenticator
from tap_server.download_frames import DownloadFrames
from tap_server.federation import Federation
from tap_server.federation_api import Assignment, Transfer
from tap_server.intake import Undecodable, parse_json
from tap_server.limits import CallEnded, CallLimiter, CallWatch, OpenCall, kind_of, peer_certificate
from tap_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Federation"].full_name  # tap.v1.Federation
MAX_POLL_S = 30.0
ACTIONS = {
    "wait": pb.Assignment.WAIT,
    "train": pb.Assignment.TRAIN,
    "finish": pb.Assignment.FINISH,
    "done": pb.Assignment.DONE,
}
# what from_json raises on a message of the wrong shape (or one too deep or too large for a number)
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError)
REFUSAL_LOG_EVERY_S = 10.0  # a flood of refusals of one reason is logged once per interval, with a count


class RefusalLog:
    """One warning per reason per interval (and how many were not logged): a flood does not flood the log."""

    def __init__(self, every_s: float = REFUSAL_LOG_EVERY_S):
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, reason: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(reason, (float("-inf"), 0))
            if now - last < self.every_s:
                self._last[reason] = (last, suppressed + 1)
                return
            self._last[reason] = (now, 0)
        more = f" (and {suppressed} more refusals for {reason} in the last {now - last:.0f}s)" if suppressed else ""
        log.warning("rejected (%s): %s%s", reason, message, more)


def guarded(method: Callable) -> Callable:
    """Admit the call (identity, the silo's own limit for the call's kind), run it, answer refusals.

    A :class:`Rejected` becomes its status; any other exception INTERNAL with a message, logged with its
    traceback. (Uncaught, gRPC would answer UNKNOWN without details.) A request that did not parse
    arrives as an :class:`Undecodable` and is refused with its reason. Streams are watched while they wait on
    the peer (``tap_server.limits``); a call cut meanwhile ends quietly (the cut was counted and logged).
    """
    kind = kind_of(method.__name__)

    def fail(self: "FederationServicer", context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, CallEnded):
            if not exc.counted:
                self.metrics.rejected.labels(reason=exc.reason).inc()
                log.info("%s of a silo ended by the peer or the transport (%s)", method.__name__, exc.reason)
            raise exc.cause  # gRPC's own error of the dead call: it ends the call without another word
        if context.code() not in (None, grpc.StatusCode.OK):
            raise exc  # already aborted
        if not isinstance(exc, Rejected):
            log.exception("internal error in %s", method.__name__)
            exc = Rejected("internal", f"server error ({type(exc).__name__}: {exc}); see the server log")
        else:
            self.refusals.warning(exc.reason, str(exc))
        self.metrics.rejected.labels(reason=exc.reason).inc()
        context.set_trailing_metadata(((REASON_METADATA_KEY, exc.reason),))
        context.abort(grpc.StatusCode[exc.status], str(exc))

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                with self._admit(request, context, kind) as call:
                    for response in method(self, request, context):
                        with call.waiting():  # until gRPC has sent it: the peer's turn to take it
                            yield response
            except Exception as exc:
                fail(self, context, exc)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            with self._admit(request, context, kind) as call:
                if kind == "upload":
                    request = _frames(request, call)
                return method(self, request, context)
        except Exception as exc:
            fail(self, context, exc)

    return unary


def _frames(requests: Iterator[Any], call: OpenCall) -> Iterator[pb.TensorFrame]:
    """The frames of an upload, each read while the watch counts the time as the peer's."""
    while True:
        try:
            with call.waiting():
                frame = next(requests)
        except StopIteration:
            return
        except grpc.RpcError as exc:  # the call ended under us: cut by the watch, cancelled by the peer, transport
            raise CallEnded(call.ended or "cancelled", call.ended is not None, exc) from exc
        if isinstance(frame, Undecodable):
            raise frame.rejected()
        yield frame


def parse_stats(text: str, max_bytes: int) -> RoundStats:
    try:
        return RoundStats.from_json(parse_json(text or "{}", "stats_json", max_bytes))
    except MALFORMED as exc:
        raise Rejected("malformed", f"stats_json: {exc}") from exc


def assignment_to_proto(assignment: Assignment) -> pb.Assignment:
    response = pb.Assignment(
        action=ACTIONS[assignment.action],
        round=assignment.round,
        retry_after_s=assignment.retry_after_s,
        message=assignment.message,
    )
    if assignment.plan is not None:
        response.plan_json = json.dumps(plan_to_json(assignment.plan))
    response.layout.extend(layout_to_proto(assignment.layout))
    return response


def add_to_server(servicer: "FederationServicer", server: grpc.Server) -> None:
    """Register the service as generated, except that tensor frames cross gRPC as serialised bytes.

    ``Download`` yields the frames' bytes as built (no serialiser: gRPC sends them as they are)
    and ``Upload`` receives each frame unparsed (no deserialiser): ``StreamDecoder`` reads it
    without copying its tensor data, and a frame that is no valid message is refused with
    ``malformed`` like any other bad frame. On the wire nothing changes: these are the
    ``TensorFrame`` messages of federation.proto.
    """

    handlers: dict[str, Any] = {}

    class Capture:  # takes the generated handler table in place of a server
        def add_generic_rpc_handlers(self, generic_handlers) -> None:
            pass

        def add_registered_method_handlers(self, service: str, table: dict[str, Any]) -> None:
            handlers.update(table)

    pb_grpc.add_FederationServicer_to_server(servicer, Capture())
    handlers["Download"] = handlers["Download"]._replace(response_serializer=None)
    handlers["Upload"] = handlers["Upload"]._replace(request_deserializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(
        self,
        config: FederationConfig,
        federation: Federation,
        auth: SiloAuthenticator,
        metrics: ServerMetrics,
        max_concurrent_uploads: int | None = None,
    ):
        self.config = config
        self.federation = federation
        self.auth = auth
        self.metrics = metrics
        self.limits = config.limits
        self.refusals = RefusalLog()
        self.calls = CallLimiter(config.limits, metrics)
        self.watch = CallWatch(self.calls, auth.identify_pem)
        # uploads being decoded, all silos together: taken only once the federation admitted the upload
        self._uploads = threading.BoundedSemaphore(max_concurrent_uploads or config.limits.concurrent_uploads)
        self.frames = DownloadFrames(config.wire.dtype, config.wire.chunk_bytes)

    # -- RPCs ---------------------------------------------------------------

    @guarded
    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloResponse:
        silo = self.auth.identify(context)
        status = self.federation.touch(silo)
        return pb.HelloResponse(
            silo_id=silo,
            federation_json=json.dumps(to_mapping(self.config)),
            heartbeat_interval_s=self.config.deadlines.heartbeat_s,
            server_version=VERSION,
            federation_id=status.federation_id,
        )

    @guarded
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        silo = self.auth.identify(context)
        data = parse_json(request.declaration_json, "declaration_json", self.limits.max_declaration_bytes)
        data["silo"] = silo  # identity comes from the certificate, never from a field
        try:
            declaration = SiloDeclaration.from_json(data)
        except (*MALFORMED, TapError) as exc:
            raise Rejected("malformed", f"declaration: {exc}") from exc
        registration = self.federation.register(declaration)
        return pb.JoinResponse(silo_id=silo, message=f"joined; {registration.registered} silos registered")

    @guarded
    def Poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.Assignment:
        silo = self.auth.identify(context)
        return assignment_to_proto(self.federation.wait_for_assignment(silo, max(0.0, min(request.wait_s, MAX_POLL_S))))

    @guarded
    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Serialised frames (see :func:`add_to_server`), built once per round and component (``DownloadFrames``)."""
        silo = self.auth.identify(context)
        payload = self.federation.payload(silo, request.round)
        started = time.perf_counter()
        wire = 0
        for frame in self.frames.stream(payload.values, payload.layout, StreamInfo(payload.round)):
            wire += frame_wire_bytes(frame)
            yield frame
        self.federation.record_transfer(
            Transfer(
                silo,
                payload.round,
                payload.direction,
                layout_bytes(payload.layout, self.config.wire.dtype),
                wire,
                time.perf_counter() - started,
                payload.layout,
            )
        )

    @guarded
    def Upload(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.UploadAck:
        silo = self.auth.identify(context)
        started = time.perf_counter()
        first = next(request_iterator, None)
        header = read_header(first) if first is not None else None
        if first is None or header is None:
            raise Rejected("malformed", "upload must start with a stream header")
        slot = self.federation.admit_upload(silo, header.round)  # refused before reading megabytes or taking a slot
        stats = parse_stats(header.stats_json, self.limits.max_stats_bytes)
        with self._upload_slot():
            decoder = StreamDecoder(slot.layout, self.config.wire.dtype, known=set(slot.known))
            decoder.feed(first)
            for frame in request_iterator:
                decoder.feed(frame)
            update = ClientUpdate(
                silo=silo, round=slot.round, values=decoder.finish(), weights=dict(header.weights), stats=stats
            )
            self.federation.submit_update(update)
        self.federation.record_transfer(
            Transfer(
                silo, slot.round, "up", decoder.received, decoder.wire_bytes, time.perf_counter() - started, slot.layout
            )
        )
        return pb.UploadAck(round=slot.round, payload_bytes=decoder.received, message="accepted")

    @guarded
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        silo = self.auth.identify(context)
        status = self.federation.touch(silo)
        log.debug("heartbeat from %s: %s", silo, request.activity[:200])
        return pb.HeartbeatResponse(phase=status.phase, round=status.round)

    @guarded
    def ReportResults(self, request: pb.ResultsRequest, context: grpc.ServicerContext) -> pb.ResultsAck:
        silo = self.auth.identify(context)
        data = parse_json(request.results_json, "results_json", self.limits.max_result_bytes)
        data["silo"] = silo
        try:
            result = SiloResult.from_json(data)
            for task in result.tasks:
                task.silo = silo
                if not isinstance(task.metrics, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in task.metrics.values()
                ):
                    raise TypeError(f"task {task.task}: metrics must map names to numbers")
        except MALFORMED as exc:
            raise Rejected("malformed", f"results: {exc}") from exc
        self.federation.submit_result(result)
        return pb.ResultsAck(message="recorded")

    # -- helpers ------------------------------------------------------------

    @contextmanager
    def _admit(self, request: Any, context: grpc.ServicerContext, kind: str) -> Iterator[OpenCall]:
        """Who calls, and one of its own calls of ``kind`` (before anything shared with other silos is taken)."""
        if isinstance(request, Undecodable):
            raise request.rejected()
        silo = self.auth.identify(context)
        with self.calls.call(silo, kind, context, peer_certificate(context)) as call:
            self.watch.ensure_running()
            yield call

    @contextmanager
    def _upload_slot(self) -> Iterator[None]:
        """A few uploads decoded at once, all silos together; only admitted uploads (the silo's turn) wait here."""
        if not self._uploads.acquire(timeout=self.limits.upload_slot_wait_s):
            raise Rejected(
                "busy",
                f"{self.limits.concurrent_uploads} uploads in progress (limits.concurrent_uploads); retry shortly",
            )
        try:
            yield
        finally:
            self._uploads.release()
