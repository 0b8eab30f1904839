"""``tap-server serve``: the gRPC server with mTLS, health, metrics and the deadline clock."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from tap_core.config import FederationConfig
from tap_core.errors import ConfigError
from tap_core.transport import split_address
from tap_server.auth import SiloAuthenticator
from tap_server.certificates import ServerTLS
from tap_server.federation import Federation
from tap_server.federation_api import DONE
from tap_server.intake import SafeRequests
from tap_server.limits import server_capacity
from tap_server.liveness import MtlsSelfCheck, dial_address
from tap_server.metrics import ServerMetrics
from tap_server.servicer import FederationServicer, add_to_server

log = logging.getLogger(__name__)

SERVICE_NAME = "tap.v1.Federation"  # readiness: the state is loaded and silos are accepted
LIVENESS_SERVICE = ""  # liveness: the mTLS port answers (MtlsSelfCheck)
RETIRED_CERTIFICATES = "retired-certificates.json"  # in the state dir: rotated-out silo certificates
# gRPC sets SO_REUSEPORT by default: a second server on the same port would start and silently take half
# of the connections. One port, one federation.
NO_PORT_SHARING = ("grpc.so_reuseport", 0)


def _bind(add_port, where: str) -> int:
    try:
        bound = add_port()
    except RuntimeError:  # recent gRPC raises instead of returning 0
        bound = 0
    if bound == 0:
        raise ConfigError(where, "could not bind", "is another process using the port?")
    return bound


@dataclass
class ServeOptions:
    kit: Path
    listen: str = "0.0.0.0:50051"
    state_dir: Path = Path("tap-state")
    metrics_port: int | None = 9090
    health_port: int | None = 50052
    exit_when_done: bool = False
    max_workers: int = 64
    done_grace_s: float = 30.0
    liveness_interval_s: float | None = 10.0  # None: liveness follows readiness (no mTLS self-check)
    liveness_timeout_s: float = 5.0


class ServerDaemon:
    def __init__(self, config: FederationConfig, options: ServeOptions):
        self.config = config
        self.options = options
        self.metrics = ServerMetrics()
        self.stop_event = threading.Event()
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._servers: list[grpc.Server] = []
        self._http: Any = None  # prometheus_client's WSGI server
        kit = options.kit
        # server.crt/server.key/ca.crt are re-read when they change (tap-server rotate): no restart needed
        self.tls = ServerTLS(kit)
        self._credentials = self.tls.credentials()
        self.auth = SiloAuthenticator(kit / "silos.json", retired_path=options.state_dir / RETIRED_CERTIFICATES)
        self.metrics.certificate_days_left.attach(self.tls.expiries)
        self.metrics.certificate_days_left.attach(self.auth.silo_expiries)
        self._liveness: MtlsSelfCheck | None = None
        self.health = health.HealthServicer()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.federation: Federation | None = None
        self.servicer: FederationServicer | None = None

    def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def start(self) -> "ServerDaemon":
        try:
            return self._start()
        except BaseException:
            self.stop(grace=0)  # a port that could not be bound: release the ones that were
            raise

    def _start(self) -> "ServerDaemon":
        opts = self.options
        host, port = split_address(opts.listen)
        if opts.health_port is not None:
            plain = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[NO_PORT_SHARING])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, plain)
            self.health_port = _bind(
                lambda: plain.add_insecure_port(f"{host}:{opts.health_port}"), f"--health-port {opts.health_port}"
            )
            plain.start()
            self._servers.append(plain)
        if opts.metrics_port is not None:
            try:
                self._http, _ = start_http_server(opts.metrics_port, addr=host, registry=self.metrics.registry)
            except OSError as exc:
                raise ConfigError(
                    f"--metrics-port {opts.metrics_port}",
                    f"could not bind: {exc}",
                    "is another process using the port?",
                ) from exc
            self.metrics_port = self._http.server_port
        self.federation = Federation(
            self.config, state_dir=opts.state_dir, metrics=self.metrics, expected_silos=len(self.auth.provisioned)
        )
        # every provisioned silo may use all of its own call limits at once (tap_server.limits)
        capacity = server_capacity(self.config, len(self.auth.provisioned), opts.max_workers)
        self._executor = futures.ThreadPoolExecutor(max_workers=capacity.workers)
        server = grpc.server(
            self._executor,
            options=capacity.options + [NO_PORT_SHARING],
            interceptors=[SafeRequests(self.config.wire.max_message_bytes)],
            maximum_concurrent_rpcs=capacity.max_concurrent_rpcs,
        )
        servicer = self.servicer = FederationServicer(self.config, self.federation, self.auth, self.metrics)
        add_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._servers.append(server)
        self.port = _bind(
            lambda: server.add_secure_port(f"{host}:{port}", self._credentials), f"--listen {opts.listen}"
        )
        server.start()
        if opts.health_port is not None and opts.liveness_interval_s:
            self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            self._liveness = MtlsSelfCheck(
                dial_address(host, self.port),
                self.tls,
                SERVICE_NAME,
                self._set_liveness,
                opts.liveness_interval_s,
                opts.liveness_timeout_s,
            ).start()
        else:
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._clock, name="tap-clock", daemon=True).start()
        log.info(
            "serving on %s:%d (mTLS), health :%s, metrics :%s, state %s, phase %s",
            host,
            self.port,
            self.health_port or "-",
            self.metrics_port or "-",
            opts.state_dir,
            self.federation.status().phase,
        )
        return self

    def _set_liveness(self, alive: bool) -> None:
        if not self.stop_event.is_set():
            self.health.set(
                LIVENESS_SERVICE,
                health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

    def reload_kit(self) -> None:
        """SIGHUP: re-read silos.json and the TLS files now (both are also re-read when they change)."""
        self.auth.reload()
        self.tls.reload()
        log.info("silos.json and the TLS files reloaded")

    def _clock(self) -> None:
        """Deadlines, connected-silo gauge, and the exit once every silo has seen 'done'."""
        done_since = None
        federation = self.federation
        assert federation is not None, "start() first"
        while not self.stop_event.wait(0.5):
            try:
                self._withdraw_unprovisioned(federation)
                status = federation.tick()
                if status.phase == DONE and self.options.exit_when_done:
                    done_since = done_since or time.monotonic()
                    if status.everyone_told_done or time.monotonic() - done_since > self.options.done_grace_s:
                        log.info("federation done; exiting (--exit-when-done)")
                        self.stop_event.set()
            except Exception:  # e.g. a state write that failed: keep the clock (deadlines, exit) running
                log.exception("deadline check failed; retrying")

    def _withdraw_unprovisioned(self, federation: Federation) -> None:
        """Tell the federation which of its silos silos.json no longer lists (revoked, removed): not waited for."""
        try:
            self.auth.reload()
        except ConfigError:
            return  # a silos.json that does not parse: the calls are refused with the reason; change nothing here
        provisioned = set(self.auth.provisioned)
        if provisioned:  # a missing or empty silos.json is a mistake being fixed, not every silo revoked
            federation.withdraw(set(federation.status().joined) - provisioned)

    def install_signal_handlers(self) -> None:
        def handle(signum, frame):
            log.info("signal %d: finishing the state write in progress, then stopping", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        if hasattr(signal, "SIGHUP"):

            def reload(signum, frame):
                self.reload_kit()

            signal.signal(signal.SIGHUP, reload)

    def wait(self) -> None:
        self.stop_event.wait()
        self.stop()

    def stop(self, grace: float = 5.0) -> None:
        self.stop_event.set()
        if self._liveness is not None:
            self._liveness.stop()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for event in [server.stop(grace) for server in self._servers]:
            event.wait()
        if self.federation is not None:
            self.federation.wait_idle()  # a state write in progress finishes first
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        log.info("stopped")
