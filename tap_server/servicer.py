"""The gRPC servicer: thin. Decode, identify the caller, hand plain objects to the federation.

Every refusal becomes a specific gRPC status with a message saying what was
wrong, is counted in ``tap_rejected_requests_total{reason}``, and changes
nothing in the federation's state.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from typing import Callable, Iterator

import grpc

from tap_core.config import to_mapping
from tap_core.errors import TapError, WireError
from tap_core.messages import ClientUpdate, RoundStats, SiloDeclaration, SiloResult
from tap_core.model.components import component_kind
from tap_core.plan import plan_to_json
from tap_core.proto.tap.v1 import federation_pb2 as pb
from tap_core.proto.tap.v1 import federation_pb2_grpc as pb_grpc
from tap_core.wire_size import layout_bytes
from tap_core.wire import StreamDecoder, StreamInfo, encode_stream, frame_wire_bytes, layout_to_proto
from tap_server.auth import AuthError, SiloAuthenticator
from tap_server.federation import Federation, JoinRefused
from tap_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MAX_POLL_S = 30.0

STATUS_BY_REASON = {
    "stale_round": grpc.StatusCode.FAILED_PRECONDITION,
    "future_round": grpc.StatusCode.FAILED_PRECONDITION,
    "not_selected": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "foreign_component": grpc.StatusCode.PERMISSION_DENIED,
    "oversize": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ACTIONS = {"wait": pb.Assignment.WAIT, "train": pb.Assignment.TRAIN, "finish": pb.Assignment.FINISH,
           "done": pb.Assignment.DONE}


def guarded(method: Callable) -> Callable:
    """An unexpected exception becomes INTERNAL with a message, logged with its traceback.

    (Uncaught, gRPC would answer UNKNOWN without details.) Deliberate refusals
    (``context.abort``) pass through unchanged.
    """

    def fail(self: "FederationServicer", context: grpc.ServicerContext, exc: Exception) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):
            raise exc
        log.exception("internal error in %s", method.__name__)
        self.metrics.rejected.labels(reason="internal").inc()
        context.abort(grpc.StatusCode.INTERNAL, f"server error ({type(exc).__name__}: {exc}); see the server log")

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


def status_for(reason: str) -> grpc.StatusCode:
    """INVALID_ARGUMENT for anything malformed (shape, dtype, NaN, checksum, unknown names)."""
    return STATUS_BY_REASON.get(reason, grpc.StatusCode.INVALID_ARGUMENT)


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, federation: Federation, auth: SiloAuthenticator, metrics: ServerMetrics,
                 max_concurrent_uploads: int = 4):
        self.federation = federation
        self.auth = auth
        self.metrics = metrics
        self.config = federation.config
        self._uploads = threading.BoundedSemaphore(max_concurrent_uploads)
        self._uploading: set[str] = set()
        self._uploading_lock = threading.Lock()

    # -- helpers ------------------------------------------------------------

    def _reject(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, message: str):
        self.metrics.rejected.labels(reason=reason).inc()
        log.warning("rejected (%s): %s", reason, message)
        context.abort(code, message)

    def _silo(self, context: grpc.ServicerContext) -> str:
        try:
            return self.auth.identify(context)
        except AuthError as exc:
            self._reject(context, exc.code, exc.reason, str(exc))
        except ValueError as exc:  # unparsable certificate
            self._reject(context, grpc.StatusCode.UNAUTHENTICATED, "bad_certificate", f"unreadable client certificate: {exc}")

    def _json(self, context: grpc.ServicerContext, text: str, what: str) -> dict:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except ValueError as exc:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", f"{what} is not valid JSON: {exc}")

    # -- RPCs ---------------------------------------------------------------

    @guarded
    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloResponse:
        silo = self._silo(context)
        self.federation.touch(silo)
        return pb.HelloResponse(silo_id=silo, federation_json=json.dumps(to_mapping(self.config)),
                                heartbeat_interval_s=self.config.deadlines.heartbeat_s, server_version=VERSION,
                                federation_id=self.federation.federation_id)

    @guarded
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        silo = self._silo(context)
        data = self._json(context, request.declaration_json, "declaration_json")
        data["silo"] = silo  # identity comes from the certificate, never from a field
        try:
            declaration = SiloDeclaration.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError, TapError) as exc:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", f"declaration: {exc}")
        try:
            self.federation.register(declaration)
        except JoinRefused as exc:
            self._reject(context, grpc.StatusCode.FAILED_PRECONDITION, exc.reason, str(exc))
        return pb.JoinResponse(silo_id=silo, message=f"joined; {len(self.federation.declarations)} silos registered")

    @guarded
    def Poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.Assignment:
        silo = self._silo(context)
        assignment = self.federation.wait_for_assignment(silo, max(0.0, min(request.wait_s, MAX_POLL_S)))
        response = pb.Assignment(action=ACTIONS[assignment.action], round=assignment.round,
                                 retry_after_s=assignment.retry_after_s, message=assignment.message)
        if self.federation.plan is not None and silo in self.federation.silo_plans:
            response.plan_json = json.dumps(plan_to_json(self.federation.silo_plan(silo)))
            if assignment.action in ("train", "finish"):
                layout = {c: self.federation.manifest[c] for c in assignment.components}
                response.layout.extend(layout_to_proto(layout))
        return response

    @guarded
    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.TensorFrame]:
        silo = self._silo(context)
        direction = "final" if self.federation.assignment(silo).action == "finish" else "down"
        try:
            values = self.federation.payload(silo, request.round)  # re-checks the assignment under the lock
        except WireError as exc:
            self._reject(context, status_for(exc.reason), exc.reason, str(exc))
        started = time.perf_counter()
        layout = {c: self.federation.manifest[c] for c in values}
        wire = payload = 0
        for frame in encode_stream(values, layout, self.config.wire.dtype, self.config.wire.chunk_bytes,
                                   StreamInfo(request.round)):
            size = frame_wire_bytes(frame)
            wire += size
            payload += sum(len(p.data) for p in frame.pieces)
            yield frame
        self._count_bytes(self.metrics.bytes_sent, layout, wire)
        seconds = time.perf_counter() - started
        self.metrics.stream_seconds.labels(direction="download").observe(seconds)
        self.federation.record_transport(silo, request.round, direction, payload, wire, seconds)

    @guarded
    def Upload(self, request_iterator: Iterator[pb.TensorFrame], context: grpc.ServicerContext) -> pb.UploadAck:
        silo = self._silo(context)
        with self._uploading_lock:
            busy = silo in self._uploading
            if not busy:
                self._uploading.add(silo)
        if busy:  # one upload per silo at a time: a silo cannot take every upload slot
            self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy",
                         f"an upload from silo {silo} is already in progress; retry shortly")
        try:
            if not self._uploads.acquire(timeout=60):
                self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "too many uploads in progress; retry shortly")
            try:
                return self._receive(silo, request_iterator, context)
            finally:
                self._uploads.release()
        finally:
            with self._uploading_lock:
                self._uploading.discard(silo)

    def _receive(self, silo: str, frames: Iterator[pb.TensorFrame], context: grpc.ServicerContext) -> pb.UploadAck:
        started = time.perf_counter()
        first = next(frames, None)
        if first is None or not first.HasField("header"):
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", "upload must start with a stream header")
        header = first.header
        fed = self.federation
        # refuse early (before reading megabytes) when the round is wrong for this silo
        assignment = fed.assignment(silo)
        if assignment.action != "train" or header.round != assignment.round:
            reason = "stale_round" if header.round <= fed.round else "future_round"
            message = (f"upload for round {header.round}, but silo {silo} is assigned {assignment.action} "
                       f"round {assignment.round}")
            if assignment.action == "wait" and header.round == fed.round and silo in fed.received:
                reason, message = "duplicate", f"silo {silo} already uploaded round {header.round}"
            self._reject(context, status_for(reason), reason, message)
        expected = {c: fed.manifest[c] for c in assignment.components}
        decoder = StreamDecoder(expected, self.config.wire.dtype, known=set(fed.manifest))
        try:
            decoder.feed(first)
            for frame in frames:
                decoder.feed(frame)
            values = decoder.finish()
        except WireError as exc:
            self._reject(context, status_for(exc.reason), exc.reason, str(exc))
        try:
            stats = RoundStats.from_json(self._json(context, header.stats_json or "{}", "stats_json"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", f"stats_json: {exc}")
        update = ClientUpdate(silo=silo, round=header.round, values=values, weights=dict(header.weights), stats=stats)
        try:
            fed.submit_update(update)
        except WireError as exc:
            self._reject(context, status_for(exc.reason), exc.reason, str(exc))
        seconds = time.perf_counter() - started
        self._count_bytes(self.metrics.bytes_received, expected, decoder.wire_bytes)
        self.metrics.stream_seconds.labels(direction="upload").observe(seconds)
        fed.record_transport(silo, header.round, "up", decoder.received, decoder.wire_bytes, seconds)
        return pb.UploadAck(round=header.round, payload_bytes=decoder.received, message="accepted")

    @guarded
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        silo = self._silo(context)
        self.federation.touch(silo)
        log.debug("heartbeat from %s: %s", silo, request.activity)
        return pb.HeartbeatResponse(phase=self.federation.phase, round=self.federation.round)

    @guarded
    def ReportResults(self, request: pb.ResultsRequest, context: grpc.ServicerContext) -> pb.ResultsAck:
        silo = self._silo(context)
        data = self._json(context, request.results_json, "results_json")
        data["silo"] = silo
        try:
            result = SiloResult.from_json(data)
            for task in result.tasks:
                task.silo = silo
                if not isinstance(task.metrics, dict) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in task.metrics.values()):
                    raise TypeError(f"task {task.task}: metrics must map names to numbers")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", f"results: {exc}")
        try:
            self.federation.submit_result(result)
        except WireError as exc:
            self._reject(context, status_for(exc.reason), exc.reason, str(exc))
        return pb.ResultsAck(message="recorded")

    def _count_bytes(self, counter, layout, wire_bytes: int) -> None:
        """Split a stream's wire bytes over component kinds in proportion to their payload."""
        sizes: dict[str, int] = {}
        for component, tensors in layout.items():
            kind = component_kind(component)
            sizes[kind] = sizes.get(kind, 0) + layout_bytes({component: tensors}, "fp32")
        total = sum(sizes.values()) or 1
        for kind, size in sizes.items():
            counter.labels(kind=kind).inc(wire_bytes * size / total)
