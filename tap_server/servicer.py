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
from tap_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Federation"].full_name  # tap.v1.Federation
MAX_POLL_S = 30.0
UPLOAD_SLOT_WAIT_S = 60.0
ACTIONS = {"wait": pb.Assignment.WAIT, "train": pb.Assignment.TRAIN, "finish": pb.Assignment.FINISH,
           "done": pb.Assignment.DONE}
MALFORMED = (KeyError, TypeError, ValueError, AttributeError)  # what from_json raises on a message of the wrong shape


def guarded(method: Callable) -> Callable:
    """A :class:`Rejected` becomes its status; any other exception INTERNAL with a message, logged with its traceback.

    (Uncaught, gRPC would answer UNKNOWN without details.)
    """

    def fail(self: "FederationServicer", context: grpc.ServicerContext, exc: Exception) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):
            raise exc  # already aborted
        if not isinstance(exc, Rejected):
            log.exception("internal error in %s", method.__name__)
            exc = Rejected("internal", f"server error ({type(exc).__name__}: {exc}); see the server log")
        else:
            log.warning("rejected (%s): %s", exc.reason, exc)
        self.metrics.rejected.labels(reason=exc.reason).inc()
        context.set_trailing_metadata(((REASON_METADATA_KEY, exc.reason),))
        context.abort(grpc.StatusCode[exc.status], str(exc))

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:
                fail(self, context, exc)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            fail(self, context, exc)

    return unary


def parse_json(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Rejected("malformed", f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Rejected("malformed", f"{what} is not valid JSON: not a JSON object")
    return data


def parse_stats(text: str) -> RoundStats:
    try:
        return RoundStats.from_json(parse_json(text or "{}", "stats_json"))
    except MALFORMED as exc:
        raise Rejected("malformed", f"stats_json: {exc}") from exc


def assignment_to_proto(assignment: Assignment) -> pb.Assignment:
    response = pb.Assignment(action=ACTIONS[assignment.action], round=assignment.round,
                             retry_after_s=assignment.retry_after_s, message=assignment.message)
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
    def __init__(self, config: FederationConfig, federation: Federation, auth: SiloAuthenticator,
                 metrics: ServerMetrics, max_concurrent_uploads: int = 4):
        self.config = config
        self.federation = federation
        self.auth = auth
        self.metrics = metrics
        self._uploads = threading.BoundedSemaphore(max_concurrent_uploads)
        self._uploading: set[str] = set()
        self._uploading_lock = threading.Lock()
        self.frames = DownloadFrames(config.wire.dtype, config.wire.chunk_bytes)

    # -- RPCs ---------------------------------------------------------------

    @guarded
    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloResponse:
        silo = self.auth.identify(context)
        status = self.federation.touch(silo)
        return pb.HelloResponse(silo_id=silo, federation_json=json.dumps(to_mapping(self.config)),
                                heartbeat_interval_s=self.config.deadlines.heartbeat_s, server_version=VERSION,
                                federation_id=status.federation_id)

    @guarded
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        silo = self.auth.identify(context)
        data = parse_json(request.declaration_json, "declaration_json")
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
        self.federation.record_transfer(Transfer(silo, payload.round, payload.direction,
                                                 layout_bytes(payload.layout, self.config.wire.dtype), wire,
                                                 time.perf_counter() - started, payload.layout))

    @guarded
    def Upload(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.UploadAck:
        silo = self.auth.identify(context)
        with self._upload_slot(silo):
            started = time.perf_counter()
            first = next(request_iterator, None)
            header = read_header(first) if first is not None else None
            if first is None or header is None:
                raise Rejected("malformed", "upload must start with a stream header")
            slot = self.federation.admit_upload(silo, header.round)  # refused before reading megabytes
            stats = parse_stats(header.stats_json)
            decoder = StreamDecoder(slot.layout, self.config.wire.dtype, known=set(slot.known))
            decoder.feed(first)
            for frame in request_iterator:
                decoder.feed(frame)
            update = ClientUpdate(silo=silo, round=slot.round, values=decoder.finish(), weights=dict(header.weights),
                                  stats=stats)
            self.federation.submit_update(update)
            self.federation.record_transfer(Transfer(silo, slot.round, "up", decoder.received, decoder.wire_bytes,
                                                     time.perf_counter() - started, slot.layout))
            return pb.UploadAck(round=slot.round, payload_bytes=decoder.received, message="accepted")

    @guarded
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        silo = self.auth.identify(context)
        status = self.federation.touch(silo)
        log.debug("heartbeat from %s: %s", silo, request.activity)
        return pb.HeartbeatResponse(phase=status.phase, round=status.round)

    @guarded
    def ReportResults(self, request: pb.ResultsRequest, context: grpc.ServicerContext) -> pb.ResultsAck:
        silo = self.auth.identify(context)
        data = parse_json(request.results_json, "results_json")
        data["silo"] = silo
        try:
            result = SiloResult.from_json(data)
            for task in result.tasks:
                task.silo = silo
                if not isinstance(task.metrics, dict) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in task.metrics.values()):
                    raise TypeError(f"task {task.task}: metrics must map names to numbers")
        except MALFORMED as exc:
            raise Rejected("malformed", f"results: {exc}") from exc
        self.federation.submit_result(result)
        return pb.ResultsAck(message="recorded")

    # -- helpers ------------------------------------------------------------

    @contextmanager
    def _upload_slot(self, silo: str) -> Iterator[None]:
        """One upload per silo at a time (a silo cannot take every slot), a few at a time overall."""
        with self._uploading_lock:
            busy = silo in self._uploading
            if not busy:
                self._uploading.add(silo)
        if busy:
            raise Rejected("busy", f"an upload from silo {silo} is already in progress; retry shortly")
        try:
            if not self._uploads.acquire(timeout=UPLOAD_SLOT_WAIT_S):
                raise Rejected("busy", "too many uploads in progress; retry shortly")
            try:
                yield
            finally:
                self._uploads.release()
        finally:
            with self._uploading_lock:
                self._uploading.discard(silo)
