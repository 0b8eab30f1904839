"""Liveness that means something: the server dials its own mTLS port and asks for its health.

Kubelet probes cannot speak mTLS, so they read a plaintext health port that a separate small gRPC
server answers. Its readiness service (``tap.v1.Federation``) says "the state is loaded and silos
are accepted". Its overall service (``""``, the liveness probe) is driven from here: every
``interval_s`` a fresh TLS handshake with the server's own certificate to the silo port, then a
health RPC that needs a free worker of the silo-facing server. If that fails (the silo server
stopped, its workers all stuck, the TLS stack broken), liveness goes NOT_SERVING and Kubernetes
restarts the pod, which resumes from its state. A server certificate without clientAuth (kits
provisioned before this check existed) cannot dial in: then only the TLS handshake is checked.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tap_server.certificates import ServerTLS

log = logging.getLogger(__name__)

# The name every provisioned server certificate carries (tap-server provision always adds it).
SELF_NAME = "localhost"


def dial_address(listen_host: str, port: int) -> str:
    host = "127.0.0.1" if listen_host in ("", "0.0.0.0", "[::]", "::") else listen_host
    return f"{host}:{port}"


class MtlsSelfCheck:
    def __init__(
        self,
        target: str,
        tls: ServerTLS,
        service: str,
        on_result: Callable[[bool], None],
        interval_s: float = 10.0,
        timeout_s: float = 5.0,
    ):
        self.target = target
        self.tls = tls
        self.service = service
        self.on_result = on_result
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self.last_error = ""
        self.healthy: bool | None = None

    def check_once(self) -> bool:
        material = self.tls.material
        try:
            if material.can_dial_itself:
                self._health_rpc(material)
            else:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "the server certificate lacks clientAuth: liveness checks only the TLS handshake "
                        "of the silo port (renew it with `tap-server rotate --server` for the full check)"
                    )
                self._handshake(material)
            self.last_error = ""
            return True
        except Exception as exc:  # any failure to get an answer over mTLS
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False

    def _health_rpc(self, material) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=material.ca_pem, private_key=material.key_pem, certificate_chain=material.cert_pem
        )
        options = [("grpc.ssl_target_name_override", SELF_NAME), ("grpc.use_local_subchannel_pool", 1)]
        with grpc.secure_channel(self.target, credentials, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # any answer (SERVING or not) proves the TLS stack and a worker of the silo server respond
            stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout_s)

    def _handshake(self, material) -> None:
        context = ssl.create_default_context(cadata=material.ca_pem.decode("ascii"))
        context.check_hostname = False  # the self-check dials an address; the CA check stays
        context.set_alpn_protocols(["h2"])
        host, _, port = self.target.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=self.timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=SELF_NAME):
                pass

    def _report(self, ok: bool) -> None:
        if ok != self.healthy:
            if ok:
                log.info("liveness: the mTLS port %s answers", self.target)
            else:
                log.error("liveness: the mTLS port %s does not answer (%s)", self.target, self.last_error)
            self.healthy = ok
        self.on_result(ok)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._report(self.check_once())

    def start(self) -> "MtlsSelfCheck":
        """Check once now (the status is known when the server reports itself started), then every interval."""
        self._report(self.check_once())
        self._thread = threading.Thread(target=self._loop, name="tap-liveness", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
