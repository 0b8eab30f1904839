"""Container health check for the TAP images (Docker HEALTHCHECK, compose).

    python /opt/tap/healthcheck.py grpc 127.0.0.1:50052 [SERVICE]   # server: plaintext gRPC health port
    python /opt/tap/healthcheck.py http http://127.0.0.1:9100/metrics # agent: its metrics endpoint

Exits 0 when healthy (SERVING / HTTP 200), 1 otherwise. Standard library plus
grpcio-health-checking, which the images install with the package. Kubernetes
does not use this: it probes the health port with built-in grpc probes.
"""

from __future__ import annotations

import sys
import urllib.request


def check_grpc(target: str, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=4)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def check_http(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 (local URL from the command line)
        return response.status == 200


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("grpc", "http"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        healthy = check_grpc(*argv[1:3]) if argv[0] == "grpc" else check_http(argv[1])
    except Exception as exc:  # any failure to get an answer is "unhealthy"
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print("healthy" if healthy else "not serving")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
