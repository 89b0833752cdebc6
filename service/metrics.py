"""Every Prometheus metric tlserve exports, declared once.

Names carry their unit (`_seconds`, `_bytes`, `_total`); labels have bounded
cardinality (method, code; later model, version, variant), never request ids.
Metrics are recorded at boundaries — the gRPC interceptor, the batcher, the job
runner — not sprinkled through the code. Collectors that record are grouped in
small classes that take a registry, so a test can give them a fresh one and
read values back without a server.

`start_http_server(address)` serves the default registry (which also carries the
process collector: resident memory, CPU seconds, open fds) on its own port.
"""

from __future__ import annotations

import dataclasses
import threading
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.config import split_address

NAMESPACE = "tlserve"

# The `_created` series double every counter and histogram for a timestamp
# that Prometheus does not use.
prometheus_client.disable_created_metrics()

# gRPC latency buckets, in seconds: 0.5 ms (a health check) to 2 min (a long
# unary call such as an export); streaming calls are counted, their duration too.
LATENCY_BUCKETS_SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)


@dataclasses.dataclass(frozen=True)
class GrpcMetrics:
    """Per-method request counts by status code, latency and calls in flight."""

    requests: Counter
    latency: Histogram
    in_flight: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry = prometheus_client.REGISTRY) -> GrpcMetrics:
        return cls(
            requests=Counter(
                "grpc_requests",
                "gRPC calls handled, by method and final status code.",
                ["method", "code"],
                namespace=NAMESPACE,
                registry=registry,
            ),
            latency=Histogram(
                "grpc_request_duration_seconds",
                "Time from a call's arrival to its final status, by method.",
                ["method"],
                namespace=NAMESPACE,
                buckets=LATENCY_BUCKETS_SECONDS,
                registry=registry,
            ),
            in_flight=Gauge(
                "grpc_requests_in_flight",
                "gRPC calls being handled now, by method.",
                ["method"],
                namespace=NAMESPACE,
                registry=registry,
            ),
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(seconds)


GRPC = GrpcMetrics.create()

BUILD_INFO = Gauge(
    "build_info",
    "Always 1; the labels say which tlserve and PyTorch versions are running.",
    ["version", "torch_version"],
    namespace=NAMESPACE,
)


class MetricsServer:
    """The metrics HTTP endpoint on its own port; `port` is the one bound."""

    def __init__(self, address: str, registry: CollectorRegistry = prometheus_client.REGISTRY) -> None:
        host, port = split_address(address)
        host = host.strip("[]")
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = self._httpd.server_port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
