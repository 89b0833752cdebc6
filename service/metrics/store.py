"""Models, profiles and jobs as metrics, read from the metadata store at each
scrape (`StoreCollector`, registered as `STORE`)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.metrics import COLLECT_ERRORS, MODEL_LABELS, _seconds, state_label
from tlserve.service.metrics.families import Sample, assemble
from tlserve.service.metrics.families import gauge as _gauge

log = logging.getLogger("tlserve.metrics")


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


STORE = StoreCollector()
prometheus_client.REGISTRY.register(STORE)
