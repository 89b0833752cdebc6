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

import contextlib
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

# Predict latency buckets, in seconds: suited to milliseconds (a small model answers
# in 1-3 ms on a CPU) up to 10 s (a cold load or a large batch of camera images).
PREDICT_LATENCY_BUCKETS_SECONDS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Queue wait and compute per batch: 50 µs (an idle model's queue) up to 5 s.
BATCH_LATENCY_BUCKETS_SECONDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MODEL_LABELS = ("model", "version", "variant")


@dataclasses.dataclass(frozen=True)
class InferenceMetrics:
    """Predictions: images, latency and errors per model variant, recorded by the
    inference service; batch sizes, queue waits and compute times, recorded by each
    model's batcher; loaded models and their memory, recorded by the model cache."""

    images: Counter
    batch_size: Histogram
    queue_wait: Histogram
    compute: Histogram
    predict_latency: Histogram
    queue_depth: Gauge
    errors: Counter
    loaded_models: Gauge
    model_memory: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry = prometheus_client.REGISTRY) -> InferenceMetrics:
        def make(kind, name: str, doc: str, labels=MODEL_LABELS, **kwargs):
            return kind(name, doc, list(labels), namespace=NAMESPACE, registry=registry, **kwargs)

        return cls(
            images=make(Counter, "predict_images", "Images answered by Predict, per model variant."),
            batch_size=make(
                Histogram, "inference_batch_size_images", "Images per batch a model ran.",
                buckets=BATCH_SIZE_BUCKETS,
            ),
            queue_wait=make(
                Histogram, "inference_queue_wait_seconds",
                "Time a request waited in its model's queue before its batch started.",
                buckets=BATCH_LATENCY_BUCKETS_SECONDS,
            ),
            compute=make(
                Histogram, "inference_compute_seconds",
                "Time a batch took to compute (input assembly, the model, output split).",
                buckets=BATCH_LATENCY_BUCKETS_SECONDS,
            ),
            predict_latency=make(
                Histogram, "predict_duration_seconds",
                "Predict time inside the server: validation, decoding, queue, compute, top-k.",
                buckets=PREDICT_LATENCY_BUCKETS_SECONDS,
            ),
            queue_depth=make(Gauge, "inference_queue_requests", "Requests waiting in a model's queue now."),
            errors=make(
                Counter, "predict_errors",
                "Failed predictions (Predict and KServe ModelInfer) by reason: invalid_argument, not_found, "
                "failed_precondition, resource_exhausted, deadline_exceeded, cancelled, unavailable, internal.",
                labels=(*MODEL_LABELS, "reason"),
            ),
            loaded_models=make(Gauge, "inference_loaded_models", "Model variants loaded for prediction now.", labels=()),
            model_memory=make(
                Gauge, "inference_model_memory_bytes",
                "Memory of a loaded model variant (resident memory its load added, at least its file size).",
            ),
        )

    def bind(self, model: str, version: int, variant: str) -> ModelMetrics:
        """The collectors of one model variant, labels resolved once (the batcher's hot path)."""
        labels = {"model": model, "version": str(version), "variant": variant}
        return ModelMetrics(
            self, labels, self.images.labels(**labels), self.batch_size.labels(**labels),
            self.queue_wait.labels(**labels), self.compute.labels(**labels),
            self.predict_latency.labels(**labels), self.queue_depth.labels(**labels),
        )


@dataclasses.dataclass(frozen=True)
class ModelMetrics:
    """`InferenceMetrics` for one (model, version, variant); a batcher's observer."""

    parent: InferenceMetrics
    labels: dict[str, str]
    images: Counter
    batch_size: Histogram
    queue_wait: Histogram
    compute: Histogram
    predict_latency: Histogram
    queue_depth: Gauge

    def observe_batch(self, images: int, queue_seconds, compute_seconds: float) -> None:
        self.batch_size.observe(images)
        for seconds in queue_seconds:
            self.queue_wait.observe(seconds)
        self.compute.observe(compute_seconds)

    def observe_queue_depth(self, requests: int) -> None:
        self.queue_depth.set(requests)

    def observe_predict(self, images: int, seconds: float) -> None:
        self.images.inc(images)
        self.predict_latency.observe(seconds)

    def observe_error(self, reason: str) -> None:
        self.parent.errors.labels(**self.labels, reason=reason).inc()

    def set_memory(self, memory_bytes: int | None) -> None:
        """The model's memory while loaded; None when it is unloaded."""
        if memory_bytes is None:
            with contextlib.suppress(KeyError):
                self.parent.model_memory.remove(*self.labels.values())
        else:
            self.parent.model_memory.labels(**self.labels).set(memory_bytes)


INFERENCE = InferenceMetrics.create()

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
