"""Every Prometheus metric tlserve exports, declared once: this module holds those
the code records; `store` and `gpu` the collectors read at scrape time; `http`
the endpoint.

Names carry their unit (`_seconds`, `_bytes`, `_total`); labels have bounded
cardinality (method, code, model, version, variant, reason, state, split,
percentile, device), never request or job ids. Metrics are recorded at
boundaries — the gRPC interceptor, the inference service and its batchers, the
job runner — not sprinkled through the code. Collectors that record are grouped
in small classes that take a registry, so a test can give them a fresh one and
read values back without a server.

Figures that live in the metadata store (models, their artifacts and profiles,
jobs) are not recorded at all: `store.StoreCollector` reads them at each scrape,
so they are right after a restart and vanish with a deleted model. GPU memory is
read at each scrape by `gpu.GpuCollector` (NVML, and torch.cuda once this process
has initialised it); without a GPU its families are absent, not zero. Importing
`store` and `gpu` registers their collectors with the default registry.

`http.MetricsServer(address)` serves the default registry (which also carries the
process collector: resident memory, CPU seconds, open fds) on its own port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.variant import Variant

log = logging.getLogger("tlserve.metrics")

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

    def bind(self, method: str) -> BoundGrpcMetrics:
        """One method's series, looked up once (the interceptor binds each method once,
        not on every call)."""
        return BoundGrpcMetrics(self, method)


class BoundGrpcMetrics:
    """One method's series of a GrpcMetrics: calls in flight, latency, and the call
    counter per status code (bound on the first call that ends with that code)."""

    def __init__(self, metrics: GrpcMetrics, method: str) -> None:
        self.method = method
        self._metrics = metrics
        self.in_flight = metrics.in_flight.labels(method=method)
        self._latency = metrics.latency.labels(method=method)
        self._requests: dict[str, Counter] = {}

    def observe(self, code: str, seconds: float) -> None:
        counter = self._requests.get(code)
        if counter is None:
            counter = self._requests[code] = self._metrics.requests.labels(method=self.method, code=code)
        counter.inc()
        self._latency.observe(seconds)


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
# Loading a model variant (open, warm up at batch 1 and max, measure): 10 ms (a tiny
# ONNX graph) up to 2 min (a TensorRT engine built on first use).
LOAD_BUCKETS_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
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
    in_flight: Gauge
    errors: Counter
    load_duration: Histogram
    loaded_models: Gauge
    model_memory: Gauge
    queue_capacity: Gauge
    cache_budget: Gauge

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
            in_flight=make(
                Gauge, "predict_requests_in_flight",
                "Predict and KServe ModelInfer calls being handled now (preparing, queued or computing), "
                "per model variant.",
            ),
            errors=make(
                Counter, "predict_errors",
                "Failed predictions (Predict and KServe ModelInfer) by reason: invalid_argument, not_found, "
                "failed_precondition, resource_exhausted, deadline_exceeded, cancelled, unavailable, internal.",
                labels=(*MODEL_LABELS, "reason"),
            ),
            load_duration=make(
                Histogram, "inference_model_load_seconds",
                "Time to load a model variant for prediction: open the session, warm it up, measure its memory. "
                "The count is the number of loads (a rising rate means the cache budget is too small).",
                buckets=LOAD_BUCKETS_SECONDS,
            ),
            loaded_models=make(Gauge, "inference_loaded_models", "Model variants loaded for prediction now.", labels=()),
            model_memory=make(
                Gauge, "inference_model_memory_bytes",
                "Memory of a loaded model variant (resident memory its load added, at least its file size).",
            ),
            queue_capacity=make(
                Gauge, "inference_queue_capacity_requests",
                "Requests one model's queue holds before RESOURCE_EXHAUSTED (--max-queue-size).", labels=(),
            ),
            cache_budget=make(
                Gauge, "inference_model_cache_budget_bytes",
                "Memory budget of the models loaded for prediction (--model-cache-bytes).", labels=(),
            ),
        )

    def set_limits(self, queue_capacity: int, cache_budget_bytes: int) -> None:
        """The settings the queue and memory gauges are measured against (alert thresholds)."""
        self.queue_capacity.set(queue_capacity)
        self.cache_budget.set(cache_budget_bytes)

    def bind(self, model: str, version: int, variant: Variant) -> ModelMetrics:
        """The collectors of one model variant, labels resolved once (the batcher's hot path)."""
        labels = {"model": model, "version": str(version), "variant": variant.key}
        return ModelMetrics(
            self, labels, self.images.labels(**labels), self.batch_size.labels(**labels),
            self.queue_wait.labels(**labels), self.compute.labels(**labels),
            self.predict_latency.labels(**labels), self.queue_depth.labels(**labels),
            self.in_flight.labels(**labels), self.load_duration.labels(**labels),
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
    in_flight: Gauge
    load_duration: Histogram

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

    def observe_load(self, seconds: float) -> None:
        self.load_duration.observe(seconds)

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

# Fine-tuning jobs: 10 s (a prototype head on a few images) up to a day.
JOB_DURATION_BUCKETS_SECONDS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
                                28800.0, 86400.0)


def state_label(state: int) -> str:
    """`JOB_STATE_SUCCEEDED` → "succeeded": the `state` label of job metrics."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


@dataclasses.dataclass(frozen=True)
class TrainingMetrics:
    """What the job runner records when a job ends; everything else about jobs
    (counts by state, progress of running jobs) is read from the store at scrape
    time by `StoreCollector`."""

    job_duration: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry = prometheus_client.REGISTRY) -> TrainingMetrics:
        return cls(
            job_duration=Histogram(
                "training_job_duration_seconds",
                "Time from a fine-tuning job's first start to its end (resumes included), by final state.",
                ["state"], namespace=NAMESPACE, buckets=JOB_DURATION_BUCKETS_SECONDS, registry=registry,
            ),
        )

    def observe_job_end(self, job: pb.Job) -> None:
        """Records a job that ended; one that never started (cancelled while queued) is not a duration."""
        if job.HasField("start_time") and job.HasField("end_time"):
            seconds = max(0.0, _seconds(job.end_time) - _seconds(job.start_time))
            self.job_duration.labels(state=state_label(job.state)).observe(seconds)


TRAINING = TrainingMetrics.create()

# An export takes seconds (a small model on a GPU) to many minutes (INT8 calibration of a
# large model on a CPU).
EXPORT_DURATION_BUCKETS_SECONDS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclasses.dataclass(frozen=True)
class ExportMetrics:
    """ExportModel calls by precision and outcome, and how long they took (queueing
    behind another export included), recorded by the export service."""

    exports: Counter
    duration: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry = prometheus_client.REGISTRY) -> ExportMetrics:
        return cls(
            exports=Counter(
                "exports", "ExportModel calls by precision and outcome (ok, or the status code's name in lower "
                "case: failed_precondition when parity or the accuracy limit failed, not_found, ...).",
                ["precision", "outcome"], namespace=NAMESPACE, registry=registry,
            ),
            duration=Histogram(
                "export_duration_seconds", "Time an ExportModel call took, by precision and outcome.",
                ["precision", "outcome"], namespace=NAMESPACE, buckets=EXPORT_DURATION_BUCKETS_SECONDS,
                registry=registry,
            ),
        )

    def observe(self, precision: str, outcome: str, seconds: float) -> None:
        self.exports.labels(precision=precision, outcome=outcome).inc()
        self.duration.labels(precision=precision, outcome=outcome).observe(seconds)


EXPORTS = ExportMetrics.create()

COLLECT_ERRORS = Counter(
    "metrics_collect_errors",
    "Scrapes where a collector could not read its source (store, gpu) and left its figures out.",
    ["collector"],
    namespace=NAMESPACE,
)


BUILD_INFO = Gauge(
    "build_info",
    "Always 1; the labels say which tlserve and PyTorch versions are running.",
    ["version", "torch_version"],
    namespace=NAMESPACE,
)
