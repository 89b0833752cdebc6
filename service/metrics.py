"""Every Prometheus metric tlserve exports, declared once.

Names carry their unit (`_seconds`, `_bytes`, `_total`); labels have bounded
cardinality (method, code, model, version, variant, reason, state, split,
percentile, device), never request or job ids. Metrics are recorded at
boundaries — the gRPC interceptor, the inference service and its batchers, the
job runner — not sprinkled through the code. Collectors that record are grouped
in small classes that take a registry, so a test can give them a fresh one and
read values back without a server.

Figures that live in the metadata store (models, their artifacts and profiles,
jobs) are not recorded at all: `StoreCollector` reads them at each scrape, so
they are right after a restart and vanish with a deleted model. GPU memory is
read at each scrape by `GpuCollector` (NVML, and torch.cuda once this process
has initialised it); without a GPU its families are absent, not zero.

`MetricsServer(address)` serves the default registry (which also carries the
process collector: resident memory, CPU seconds, open fds) on its own port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from client.tlserve.v1 import tlserve_pb2 as pb
from service.config import split_address
from service.variant import Variant

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


# -- collectors read at scrape time --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """A gauge family a collector yields: its full name, help and label names."""

    name: str
    doc: str
    labels: tuple[str, ...]

    def empty(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.doc, labels=list(self.labels))


def _gauge(name: str, doc: str, *labels: str) -> Family:
    return Family(f"{NAMESPACE}_{name}", doc, labels)


VERSIONED = ("model", "version")
RUNNING_JOB = ("model", "backbone")

MODEL_SIZE = _gauge("model_size_bytes", "Size of a model's artifact file, per variant.", *MODEL_LABELS)
MODEL_PARAMETERS = _gauge("model_parameters", "Parameters of a model version.", *VERSIONED)
MODEL_GFLOPS = _gauge("model_gflops", "GFLOPs of one image at the model's input size, as multiply-adds / 1e9 "
                      "(torchvision's convention, as ListBackbones reports them).", *VERSIONED)
MODEL_ACCURACY = _gauge(
    "model_accuracy_ratio",
    "Top-1 accuracy (0-1) per variant and split: test for every variant (measured at training or export), "
    "val for the PyTorch variant.", *MODEL_LABELS, "split",
)
PROFILE_LATENCY = _gauge(
    "profile_latency_seconds", "Batch-1 latency percentile (50, 95, 99) of the latest ProfileModel run.",
    *MODEL_LABELS, "percentile",
)
PROFILE_THROUGHPUT = _gauge(
    "profile_throughput_images_per_second", "Throughput at the profile's batch size, latest ProfileModel run.",
    *MODEL_LABELS,
)
PROFILE_BATCH_SIZE = _gauge("profile_batch_size_images", "Batch size of the profile's throughput figure.",
                            *MODEL_LABELS)
PROFILE_PEAK_MEMORY = _gauge("profile_peak_memory_bytes", "Peak memory while profiling, latest ProfileModel run.",
                             *MODEL_LABELS)
PROFILE_LOAD = _gauge("profile_load_seconds", "Time to load and warm up the variant, latest ProfileModel run.",
                      *MODEL_LABELS)
PROFILE_ACCURACY = _gauge(
    "profile_accuracy_ratio",
    "Test top-1 accuracy (0-1) the latest profile reports: measured by it when asked, else the stored figure.",
    *MODEL_LABELS,
)
PROFILE_TIME = _gauge("profile_timestamp_seconds", "When the latest ProfileModel run measured (unix time).",
                      *MODEL_LABELS)
JOBS = _gauge("training_jobs", "Fine-tuning jobs by state (queued, running, succeeded, failed, cancelled).", "state")
TRAINING_EPOCH = _gauge("training_epoch", "Epoch a running job is in (1-based; 0 before training starts).",
                        *RUNNING_JOB)
TRAINING_LOSS = _gauge(
    "training_loss",
    "Loss of a running job: train is the current epoch's running mean, val the last finished epoch's.",
    *RUNNING_JOB, "split",
)
TRAINING_ACCURACY = _gauge(
    "training_accuracy_ratio",
    "Top-1 accuracy (0-1) of a running job: train is the current epoch's so far, val the last finished epoch's.",
    *RUNNING_JOB, "split",
)
TRAINING_THROUGHPUT = _gauge("training_images_per_second", "Training images per second of a running job, "
                             "all devices together, at its latest report.", *RUNNING_JOB)

STORE_FAMILIES = (
    MODEL_SIZE, MODEL_PARAMETERS, MODEL_GFLOPS, MODEL_ACCURACY,
    PROFILE_LATENCY, PROFILE_THROUGHPUT, PROFILE_BATCH_SIZE, PROFILE_PEAK_MEMORY, PROFILE_LOAD, PROFILE_ACCURACY,
    PROFILE_TIME,
    JOBS, TRAINING_EPOCH, TRAINING_LOSS, TRAINING_ACCURACY, TRAINING_THROUGHPUT,
)

Sample = tuple[Family, tuple[str, ...], float]


def model_samples(summaries) -> Iterable[Sample]:
    """From `ModelStore.summaries()`: sizes, parameters, GFLOPs and accuracies."""
    for model, artifacts in summaries:
        version = (model.name, str(model.version))
        if model.parameter_count:
            yield MODEL_PARAMETERS, version, model.parameter_count
        if model.gflops:
            yield MODEL_GFLOPS, version, model.gflops
        for variant, artifact in artifacts:
            labels = (*version, variant.key)
            yield MODEL_SIZE, labels, artifact.size_bytes
            if artifact.format == pb.ARTIFACT_FORMAT_PYTORCH:
                # The PyTorch variant is the trained model itself: its figures are the job's evaluation.
                for split, report in (("test", model.test_metrics), ("val", model.val_metrics)):
                    if report.image_count:
                        yield MODEL_ACCURACY, (*labels, split), report.top1_accuracy
            else:  # an export always measures its own accuracy before it is published
                yield MODEL_ACCURACY, (*labels, "test"), artifact.test_top1_accuracy


def profile_samples(profiles) -> Iterable[Sample]:
    """From `ModelStore.all_profiles()`: the latest measurement of each variant."""
    for name, version, variant, profile in profiles:
        labels = (name, str(version), variant.key)
        for percentile, seconds in (("50", profile.latency_p50_seconds), ("95", profile.latency_p95_seconds),
                                    ("99", profile.latency_p99_seconds)):
            yield PROFILE_LATENCY, (*labels, percentile), seconds
        yield PROFILE_THROUGHPUT, labels, profile.throughput_images_per_second
        if profile.batch_size:
            yield PROFILE_BATCH_SIZE, labels, profile.batch_size
        if profile.peak_memory_bytes:
            yield PROFILE_PEAK_MEMORY, labels, profile.peak_memory_bytes
        if profile.load_seconds:
            yield PROFILE_LOAD, labels, profile.load_seconds
        if profile.accuracy_measured or profile.test_top1_accuracy:  # 0 means no figure exists
            yield PROFILE_ACCURACY, labels, profile.test_top1_accuracy
        if profile.HasField("time"):
            yield PROFILE_TIME, labels, _seconds(profile.time)


JOB_STATES = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED,
              pb.JOB_STATE_CANCELLED)


@dataclasses.dataclass
class RunProgress:
    """What a running job's events said last, field by field: a step report carries the
    train figures and images/s, an epoch's end the val figures, so the latest event
    alone would drop one or the other."""

    sequence: int = 0
    epoch: int = 0
    images_per_second: float | None = None
    train: tuple[float, float] | None = None  # (loss, accuracy)
    val: tuple[float, float] | None = None

    def fold(self, event: pb.JobEvent) -> None:
        self.sequence = max(self.sequence, event.sequence)
        if event.epoch:
            self.epoch = event.epoch
        if event.images_per_second > 0:
            self.images_per_second = event.images_per_second
        if event.train_loss or event.train_accuracy:
            self.train = (event.train_loss, event.train_accuracy)
        if event.val_loss or event.val_accuracy:
            self.val = (event.val_loss, event.val_accuracy)


class JobProgressTracker:
    """Running jobs' progress, read incrementally: each scrape reads only the events
    appended since the last one (a job reports every second; an epoch can take hours)."""

    def __init__(self) -> None:
        self._runs: dict[str, RunProgress] = {}
        self._lock = threading.Lock()

    def samples(self, jobs) -> Iterable[Sample]:
        with self._lock:
            counts = jobs.count_by_state()
            samples: list[Sample] = [(JOBS, (state_label(s),), counts.get(s, 0)) for s in JOB_STATES]
            running = [jobs.get(job_id) for job_id in jobs.ids_in_state(pb.JOB_STATE_RUNNING)]
            for gone in set(self._runs) - {job.id for job in running}:
                del self._runs[gone]
            # Labels name the model being trained, never the job: a second running job of the
            # same model and backbone is hidden behind the one started last.
            latest: dict[tuple[str, str], tuple[pb.Job, RunProgress]] = {}
            for job in sorted(running, key=lambda j: (_seconds(j.start_time), j.id)):
                run = self._runs.setdefault(job.id, RunProgress())
                for event in jobs.events_after(job.id, run.sequence):
                    run.fold(event)
                latest[(job.request.model_name, job.request.backbone)] = (job, run)
            for labels, (_, run) in latest.items():
                samples.append((TRAINING_EPOCH, labels, run.epoch))
                if run.images_per_second is not None:
                    samples.append((TRAINING_THROUGHPUT, labels, run.images_per_second))
                for split, figures in (("train", run.train), ("val", run.val)):
                    if figures is not None:
                        samples.append((TRAINING_LOSS, (*labels, split), figures[0]))
                        samples.append((TRAINING_ACCURACY, (*labels, split), figures[1]))
            return samples


@dataclasses.dataclass
class _StoreSource:
    models: object  # service.store.models.ModelStore
    jobs: object  # service.store.jobs.JobStore
    progress: JobProgressTracker = dataclasses.field(default_factory=JobProgressTracker)


class StoreCollector(Collector):
    """Models, profiles and jobs, read from the metadata store at each scrape.

    A server attaches its stores when it is created and detaches them before it
    closes them (`attach(key, models, jobs)`, `detach(key)`), so two servers in one
    process share the one registered collector; should they hold the same labels, the
    first attached wins. A part that can't be read (a locked or closed database) is
    logged, counted in tlserve_metrics_collect_errors_total{collector="store"} and
    left out of that scrape; the scrape itself never fails.
    """

    def __init__(self, errors: Counter = COLLECT_ERRORS) -> None:
        self._sources: dict[object, _StoreSource] = {}
        self._lock = threading.Lock()
        self._errors = errors

    def attach(self, key: object, models, jobs) -> None:
        with self._lock:
            self._sources[key] = _StoreSource(models, jobs)

    def detach(self, key: object) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def describe(self) -> list[Metric]:
        return [family.empty() for family in STORE_FAMILIES]

    def collect(self) -> list[Metric]:
        with self._lock:
            sources = list(self._sources.values())
        parts: list[tuple[str, Callable[[_StoreSource], Iterable[Sample]]]] = [
            ("models", lambda s: model_samples(s.models.summaries())),
            ("profiles", lambda s: profile_samples(s.models.all_profiles())),
            ("jobs", lambda s: s.progress.samples(s.jobs)),
        ]
        samples: list[Sample] = []
        for source in sources:
            for part, read in parts:
                try:
                    samples.extend(list(read(source)))  # a part is whole or left out
                except Exception as e:  # noqa: BLE001 - a scrape must not fail because of the store
                    self._errors.labels(collector="store").inc()
                    log.warning("metrics: could not read from the store; left out of this scrape",
                                extra={"fields": {"part": part, "error": f"{type(e).__name__}: {e}"}})
        return assemble(STORE_FAMILIES, samples)


def assemble(families: Iterable[Family], samples: Iterable[Sample]) -> list[Metric]:
    """Gauge families with their samples, the first of any duplicate label set kept;
    families without samples are left out (absent, not zero)."""
    built = {family.name: family.empty() for family in families}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for family, labels, value in samples:
        if (family.name, labels) not in seen:
            seen.add((family.name, labels))
            built[family.name].add_metric(list(labels), float(value))
    return [metric for metric in built.values() if metric.samples]


STORE = StoreCollector()
prometheus_client.REGISTRY.register(STORE)


GPU_TOTAL = _gauge("gpu_memory_total_bytes", "Memory of a GPU (NVML; torch.cuda's figure without NVML).", "device")
GPU_USED = _gauge("gpu_memory_used_bytes", "Memory in use on a GPU by every process (NVML).", "device")
GPU_ALLOCATED = _gauge("gpu_memory_allocated_bytes", "GPU memory this process's PyTorch tensors occupy "
                       "(torch.cuda.memory_allocated).", "device")
GPU_RESERVED = _gauge("gpu_memory_reserved_bytes", "GPU memory this process's PyTorch caching allocator holds "
                      "(torch.cuda.memory_reserved).", "device")
GPU_FAMILIES = (GPU_TOTAL, GPU_USED, GPU_ALLOCATED, GPU_RESERVED)


def visible_gpus(spec: str | None, count: int, uuid: Callable[[int], str]) -> list[int]:
    """NVML indices of the GPUs this process's CUDA numbers 0, 1, …, read from
    CUDA_VISIBLE_DEVICES (`spec`) as CUDA reads it: integers or GPU UUID prefixes,
    up to the first entry that names no device. Assumes CUDA orders devices as NVML
    does (PCI bus order: CUDA_DEVICE_ORDER=PCI_BUS_ID, or one GPU per container)."""
    if spec is None:
        return list(range(count))
    visible: list[int] = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.lstrip("-").isdigit():
            index = int(entry)
            matches = [index] if 0 <= index < count else []
        elif entry.startswith("GPU-"):
            matches = [i for i in range(count) if uuid(i).startswith(entry)]
        else:  # MIG instances, empty, anything else: CUDA stops here
            matches = []
        if len(matches) != 1 or matches[0] in visible:
            break
        visible.append(matches[0])
    return visible


def _import_pynvml() -> ModuleType | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    return pynvml


class GpuCollector(Collector):
    """GPU memory per device, read at each scrape: total and used from NVML (every
    process on the device: ONNX Runtime's arenas, the training workers), allocated
    and reserved from torch.cuda for this process, only once this process has
    initialised CUDA itself (a scrape never imports torch nor starts a CUDA context).
    Without a GPU, NVML or CUDA the families are absent, not zero.

    `device` is "cuda:N", N as CUDA numbers the devices this process sees. `nvml` and
    `torch` are for tests (fakes); by default pynvml (imported and initialised at
    the first scrape, once) and the torch module if something imported it already.
    """

    def __init__(
        self, errors: Counter = COLLECT_ERRORS, *,
        nvml: Callable[[], ModuleType | None] = _import_pynvml,
        torch: Callable[[], ModuleType | None] = lambda: sys.modules.get("torch"),
        environ=os.environ,
    ) -> None:
        self._errors = errors
        self._load_nvml = nvml
        self._torch = torch
        self._environ = environ
        self._nvml: ModuleType | None = None
        self._nvml_tried = False
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return [family.empty() for family in GPU_FAMILIES]

    def collect(self) -> list[Metric]:
        samples: list[Sample] = []
        for source, read in (("nvml", self._nvml_samples), ("torch", self._torch_samples)):
            try:
                samples.extend(read())
            except Exception as e:  # noqa: BLE001 - a scrape must not fail because of a driver
                self._errors.labels(collector="gpu").inc()
                log.warning("metrics: could not read GPU memory; left out of this scrape",
                            extra={"fields": {"source": source, "error": f"{type(e).__name__}: {e}"}})
        return assemble(GPU_FAMILIES, samples)

    def _nvml_module(self) -> ModuleType | None:
        with self._lock:
            if not self._nvml_tried:
                self._nvml_tried = True
                nvml = self._load_nvml()
                if nvml is not None:
                    try:
                        nvml.nvmlInit()
                        self._nvml = nvml
                    except Exception as e:  # noqa: BLE001 - NVMLError: no driver, no GPU: no NVML figures
                        log.info("metrics: NVML unavailable, no device-wide GPU memory figures",
                                 extra={"fields": {"error": f"{type(e).__name__}: {e}"}})
            return self._nvml

    def _nvml_samples(self) -> list[Sample]:
        nvml = self._nvml_module()
        if nvml is None:
            return []
        count = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

        def uuid(i: int) -> str:
            value = nvml.nvmlDeviceGetUUID(handles[i])
            return value.decode() if isinstance(value, bytes) else value

        samples: list[Sample] = []
        for cuda_index, nvml_index in enumerate(visible_gpus(self._environ.get("CUDA_VISIBLE_DEVICES"), count, uuid)):
            info = nvml.nvmlDeviceGetMemoryInfo(handles[nvml_index])
            device = (f"cuda:{cuda_index}",)
            samples += [(GPU_TOTAL, device, info.total), (GPU_USED, device, info.used)]
        return samples

    def _torch_samples(self) -> list[Sample]:
        torch = self._torch()
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not cuda.is_initialized():
            return []
        samples: list[Sample] = []
        for index in range(cuda.device_count()):
            device = (f"cuda:{index}",)
            samples += [
                (GPU_ALLOCATED, device, cuda.memory_allocated(index)),
                (GPU_RESERVED, device, cuda.memory_reserved(index)),
                # After NVML's figure for the same device, which `assemble` keeps.
                (GPU_TOTAL, device, cuda.get_device_properties(index).total_memory),
            ]
        return samples


GPU = GpuCollector()
prometheus_client.REGISTRY.register(GPU)

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
