"""The metric catalogue and the collectors read at scrape time, without a server.

Names, types and label sets of every metric tlserve defines; the figures the store
collector derives from real (temporary) stores — models, artifacts, profiles, jobs
and running jobs' progress —; what a scrape does when the store fails; the GPU
collector with fake NVML and torch modules (there is no GPU here), absent included;
the job-duration histogram; and the README's metrics table against the registry.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import prometheus_client
import pytest
from google.protobuf import timestamp_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import metrics
from tlserve.service.metrics import gpu as metrics_gpu
from tlserve.service.metrics import store as metrics_store
from tlserve.service.store import ArtifactStore, MetadataStore
from tlserve.service.store.jobs import JobStore
from tlserve.service.store.models import ModelStore
from tlserve.service.variant import Variant

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every label a tlserve metric may carry: each has a small, known set of values.
BOUNDED_LABELS = {"method", "code", "model", "version", "variant", "reason", "state", "split", "percentile",
                  "precision", "outcome", "device", "backbone", "collector", "torch_version"}
UNIT_SUFFIXES = ("_seconds", "_bytes", "_total", "_ratio", "_images", "_requests", "_requests_in_flight",
                 "_images_per_second")
# Unit-less counts and quantities: the unit is in the word itself.
UNITLESS = {"tlserve_build_info", "tlserve_inference_loaded_models", "tlserve_model_parameters",
            "tlserve_model_gflops", "tlserve_training_jobs", "tlserve_training_epoch", "tlserve_training_loss"}


def catalogue() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed name → (type, label names) of every tlserve metric: the objects declared
    in service.metrics and the families its collectors yield."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    objects = [metrics.BUILD_INFO, metrics.COLLECT_ERRORS]
    for group in (metrics.GRPC, metrics.INFERENCE, metrics.TRAINING, metrics.EXPORTS):
        objects += [getattr(group, f) for f in group.__dataclass_fields__]
    for metric in objects:
        name = metric._name + ("_total" if metric._type == "counter" else "")
        found[name] = (metric._type, tuple(metric._labelnames))
    for family in (*metrics_store.STORE_FAMILIES, *metrics_gpu.GPU_FAMILIES):
        found[family.name] = ("gauge", family.labels)
    return found


def system_tool(name: str) -> str:
    """Path of a Prometheus tool (Debian's `prometheus` package): skipped where it is
    missing, except under .ci/run (TLSERVE_REQUIRE_SYSTEM_TOOLS=1), which installs it, so
    that a missing one is a failure there."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("TLSERVE_REQUIRE_SYSTEM_TOOLS") or os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (Debian package prometheus)")
    return path


def samples(collector) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for family in collector.collect() for s in family.samples}


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, frozenset(labels.items())))


# -- the catalogue ---------------------------------------------------------------------


def test_every_metric_has_the_namespace_a_unit_and_only_bounded_labels():
    found = catalogue()
    assert len(found) >= 35
    for name, (kind, labels) in found.items():
        assert name.startswith("tlserve_"), name
        assert set(labels) <= BOUNDED_LABELS, (name, labels)
        assert (kind == "counter") == name.endswith("_total"), name
        assert name.endswith(UNIT_SUFFIXES) or name in UNITLESS, f"{name}: no unit in the name"


def test_predict_metrics_are_per_model_variant_and_histograms_where_they_are_latencies():
    found = catalogue()
    variant = ("model", "version", "variant")
    for name in ("tlserve_predict_duration_seconds", "tlserve_inference_queue_wait_seconds",
                 "tlserve_inference_compute_seconds", "tlserve_inference_batch_size_images",
                 "tlserve_inference_model_load_seconds"):
        assert found[name] == ("histogram", variant), name
    assert found["tlserve_predict_images_total"] == ("counter", variant)
    assert found["tlserve_predict_errors_total"] == ("counter", (*variant, "reason"))
    assert found["tlserve_predict_requests_in_flight"] == ("gauge", variant)
    assert found["tlserve_inference_queue_requests"] == ("gauge", variant)
    assert found["tlserve_training_job_duration_seconds"] == ("histogram", ("state",))
    assert found["tlserve_grpc_requests_total"] == ("counter", ("method", "code"))


def test_predict_buckets_resolve_milliseconds():
    buckets = metrics.PREDICT_LATENCY_BUCKETS_SECONDS
    assert sum(b <= 0.01 for b in buckets) >= 6  # 0.5, 1, 2, 3, 5, 7.5, 10 ms
    assert buckets == tuple(sorted(buckets)) and buckets[-1] >= 10


def test_readme_metrics_table_lists_every_metric_with_its_type_and_labels():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Metrics"):]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            for name in re.findall(r"`([a-z_]+)`", cells[0]):
                rows[name] = (cells[1], tuple(x.strip() for x in cells[2].split(",") if x.strip()))
    found = catalogue()
    assert {n for n in rows if n.startswith("tlserve_")} == set(found), "README table vs service.metrics"
    for name, (kind, labels) in found.items():
        assert rows[name] == (kind, labels), name
    assert rows["process_resident_memory_bytes"][0] == "gauge"


# -- the store collector ---------------------------------------------------------------


@pytest.fixture
def stores(tmp_path):
    metadata = MetadataStore(tmp_path / "db")
    artifacts = ArtifactStore(tmp_path / "artifacts")
    yield metadata, ModelStore(metadata, artifacts), JobStore(metadata)
    metadata.close()


@pytest.fixture
def collector():
    return metrics_store.StoreCollector(Counter("errors", "", ["collector"], registry=CollectorRegistry()))


def publish_model(models: ModelStore, name: str = "flowers", version: int = 1) -> pb.Model:
    ref = pb.ModelRef(name=name, version=version)
    pytorch = pb.ModelArtifact(model=ref, format=pb.ARTIFACT_FORMAT_PYTORCH, size_bytes=44_000_000,
                               test_top1_accuracy=0.91)
    int8 = pb.ModelArtifact(model=ref, format=pb.ARTIFACT_FORMAT_ONNX, precision=pb.PRECISION_INT8,
                            size_bytes=11_000_000, test_top1_accuracy=0.9)
    model = pb.Model(
        name=name, version=version, backbone="resnet18", parameter_count=11_178_051, gflops=1.81,
        val_metrics=pb.EvaluationReport(top1_accuracy=0.93, image_count=40),
        test_metrics=pb.EvaluationReport(top1_accuracy=0.91, image_count=40),
    )
    return models.publish(model, [(pytorch, "a/model.pt"), (int8, "a/model-int8.onnx")])


def test_store_collector_exports_models_per_variant_and_nothing_when_detached(stores, collector):
    metadata, models, jobs = stores
    publish_model(models)
    collector.attach(metadata, models, jobs)
    found = samples(collector)
    m = {"model": "flowers", "version": "1"}
    assert value(found, "tlserve_model_parameters", **m) == 11_178_051
    assert value(found, "tlserve_model_gflops", **m) == pytest.approx(1.81)
    assert value(found, "tlserve_model_size_bytes", **m, variant="pytorch") == 44_000_000
    assert value(found, "tlserve_model_size_bytes", **m, variant="onnx-int8-float_nchw") == 11_000_000
    assert value(found, "tlserve_model_accuracy_ratio", **m, variant="pytorch", split="test") == 0.91
    assert value(found, "tlserve_model_accuracy_ratio", **m, variant="pytorch", split="val") == 0.93
    assert value(found, "tlserve_model_accuracy_ratio", **m, variant="onnx-int8-float_nchw", split="test") == 0.9
    assert value(found, "tlserve_model_accuracy_ratio", **m, variant="onnx-int8-float_nchw", split="val") is None
    collector.detach(metadata)
    assert collector.collect() == []


def test_profile_gauges_follow_the_latest_profile_and_vanish_with_the_model(stores, collector):
    metadata, models, jobs = stores
    publish_model(models)
    when = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    profile = pb.VariantProfile(
        variant=pb.Variant(runtime=pb.RUNTIME_ONNX, precision=pb.PRECISION_INT8), latency_p50_seconds=0.002,
        latency_p95_seconds=0.003, latency_p99_seconds=0.004, batch_size=32, throughput_images_per_second=900.0,
        peak_memory_bytes=50_000_000, test_top1_accuracy=0.9, load_seconds=0.2, time=when,
    )
    models.put_profile("flowers", 1, Variant.onnx("int8"), profile)
    profile.latency_p50_seconds = 0.0015  # measured again: replaces the first
    models.put_profile("flowers", 1, Variant.onnx("int8"), profile)
    collector.attach(metadata, models, jobs)
    found = samples(collector)
    v = {"model": "flowers", "version": "1", "variant": "onnx-int8-float_nchw"}
    assert value(found, "tlserve_profile_latency_seconds", **v, percentile="50") == 0.0015
    assert value(found, "tlserve_profile_latency_seconds", **v, percentile="99") == 0.004
    assert value(found, "tlserve_profile_throughput_images_per_second", **v) == 900
    assert value(found, "tlserve_profile_batch_size_images", **v) == 32
    assert value(found, "tlserve_profile_peak_memory_bytes", **v) == 50_000_000
    assert value(found, "tlserve_profile_accuracy_ratio", **v) == 0.9
    assert value(found, "tlserve_profile_load_seconds", **v) == 0.2
    assert value(found, "tlserve_profile_timestamp_seconds", **v) == 1_700_000_000
    models.delete(pb.ModelRef(name="flowers"), all_versions=True)
    left = {name for name, _ in samples(collector)}
    assert not any(n.startswith(("tlserve_model_", "tlserve_profile_")) for n in left), left


def running_job(jobs: JobStore, model_name: str, backbone: str = "resnet18") -> str:
    job, _ = jobs.create(pb.FineTuneRequest(dataset="ds", model_name=model_name, backbone=backbone), "ds")
    jobs.transition(job.id, pb.JOB_STATE_RUNNING)
    return job.id


def test_jobs_by_state_and_running_jobs_progress_field_by_field(stores, collector):
    metadata, models, jobs = stores
    collector.attach(metadata, models, jobs)
    job_id = running_job(jobs, "flowers")
    failed, _ = jobs.create(pb.FineTuneRequest(dataset="ds", model_name="other", backbone="resnet50"), "ds")
    jobs.transition(failed.id, pb.JOB_STATE_FAILED, error="boom")
    labels = {"model": "flowers", "backbone": "resnet18"}

    found = samples(collector)
    assert [value(found, "tlserve_training_jobs", state=s)
            for s in ("queued", "running", "succeeded", "failed", "cancelled")] == [0, 1, 0, 1, 0]
    assert value(found, "tlserve_training_epoch", **labels) == 0  # before training starts
    assert value(found, "tlserve_training_loss", **labels, split="train") is None

    # An epoch's end carries val figures; the step reports after it carry train figures and images/s.
    jobs.append_event(job_id, pb.JobEvent(phase=pb.JOB_PHASE_TRAINING, epoch=1, train_loss=0.9, train_accuracy=0.6,
                                          val_loss=0.8, val_accuracy=0.7))
    found = samples(collector)
    assert value(found, "tlserve_training_loss", **labels, split="val") == 0.8
    jobs.append_event(job_id, pb.JobEvent(phase=pb.JOB_PHASE_TRAINING, epoch=2, train_loss=0.5, train_accuracy=0.8,
                                          images_per_second=120.0))
    found = samples(collector)
    assert value(found, "tlserve_training_epoch", **labels) == 2
    assert value(found, "tlserve_training_images_per_second", **labels) == 120
    assert value(found, "tlserve_training_loss", **labels, split="train") == 0.5
    assert value(found, "tlserve_training_accuracy_ratio", **labels, split="train") == 0.8
    assert value(found, "tlserve_training_loss", **labels, split="val") == 0.8  # the last finished epoch's
    assert value(found, "tlserve_training_accuracy_ratio", **labels, split="val") == 0.7
    assert not any("job-" in v for _, labelset in found for _, v in labelset)  # never a job id

    jobs.transition(job_id, pb.JOB_STATE_SUCCEEDED)
    found = samples(collector)
    assert value(found, "tlserve_training_jobs", state="succeeded") == 1
    assert value(found, "tlserve_training_epoch", **labels) is None  # only running jobs


def test_two_running_jobs_of_one_model_and_backbone_give_one_series(stores, collector):
    metadata, models, jobs = stores
    collector.attach(metadata, models, jobs)
    first, second = running_job(jobs, "flowers"), running_job(jobs, "flowers")
    jobs.append_event(first, pb.JobEvent(epoch=3))
    jobs.append_event(second, pb.JobEvent(epoch=1))
    running_job(jobs, "flowers", backbone="resnet50")
    epochs = {dict(labels)["backbone"]: v for (name, labels), v in samples(collector).items()
              if name == "tlserve_training_epoch"}
    assert len(epochs) == 2 and epochs["resnet50"] == 0
    assert epochs["resnet18"] in (1, 3)


def test_a_store_that_fails_leaves_its_figures_out_counts_the_error_and_the_scrape_goes_on(stores):
    metadata, models, jobs = stores
    publish_model(models)
    registry = CollectorRegistry()
    errors = Counter("errors", "", ["collector"], registry=registry)
    collector = metrics_store.StoreCollector(errors)
    broken = types.SimpleNamespace(summaries=lambda: 1 / 0, all_profiles=models.all_profiles)
    collector.attach(metadata, broken, jobs)
    found = samples(collector)
    assert value(found, "tlserve_training_jobs", state="queued") == 0  # the jobs part still read
    assert not any(name.startswith("tlserve_model_") for name, _ in found)
    assert registry.get_sample_value("errors_total", {"collector": "store"}) == 1
    metadata.close()  # closed under a scrape: everything left out, nothing raised
    assert collector.collect() == []
    assert registry.get_sample_value("errors_total", {"collector": "store"}) == 4


def test_two_servers_in_one_process_share_the_registered_collector(stores, tmp_path):
    metadata, models, jobs = stores
    other = MetadataStore(tmp_path / "other.db")
    try:
        metrics_store.STORE.attach(metadata, models, jobs)
        metrics_store.STORE.attach(other, ModelStore(other, ArtifactStore(tmp_path / "a2")), JobStore(other))
        running_job(jobs, "flowers")
        text = prometheus_client.generate_latest().decode()
        assert text.count("# TYPE tlserve_training_jobs gauge") == 1
        assert 'tlserve_training_jobs{state="running"} 1.0' in text  # the first attached wins
    finally:
        metrics_store.STORE.detach(metadata)
        metrics_store.STORE.detach(other)
        other.close()


# -- the GPU collector -----------------------------------------------------------------


class FakeNvml:
    """The few pynvml calls the collector makes, over (uuid, total, used) per device."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices, *, init_error: bool = False) -> None:
        self.devices, self.init_error, self.inits = devices, init_error, 0

    def nvmlInit(self):
        self.inits += 1
        if self.init_error:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, handle):
        return self.devices[handle][0].encode()  # older pynvml answers bytes

    def nvmlDeviceGetMemoryInfo(self, handle):
        _, total, used = self.devices[handle]
        return types.SimpleNamespace(total=total, used=used, free=total - used)


def fake_torch(initialised: bool, devices=((80 << 30, 1 << 30, 2 << 30),)):
    """(total, allocated, reserved) per device."""
    cuda = types.SimpleNamespace(
        is_initialized=lambda: initialised,
        device_count=lambda: len(devices),
        memory_allocated=lambda i: devices[i][1],
        memory_reserved=lambda i: devices[i][2],
        get_device_properties=lambda i: types.SimpleNamespace(total_memory=devices[i][0]),
    )
    return types.SimpleNamespace(cuda=cuda)


def gpu_collector(nvml=None, torch=None, environ=None):
    errors = Counter("errors", "", ["collector"], registry=CollectorRegistry())
    return metrics_gpu.GpuCollector(errors, nvml=lambda: nvml, torch=lambda: torch, environ=environ or {})


def test_without_a_gpu_the_gpu_families_are_absent_not_zero():
    for collector in (
        gpu_collector(),  # neither pynvml nor torch
        gpu_collector(nvml=FakeNvml([], init_error=True), torch=fake_torch(initialised=False)),
        gpu_collector(nvml=FakeNvml([])),  # a driver without devices
    ):
        assert collector.collect() == []


def test_nvml_is_initialised_once_even_when_it_fails():
    nvml = FakeNvml([], init_error=True)
    collector = gpu_collector(nvml=nvml)
    collector.collect(), collector.collect()
    assert nvml.inits == 1


def test_gpu_memory_from_nvml_and_torch_per_cuda_device():
    nvml = FakeNvml([("GPU-aaaa-1111", 16 << 30, 3 << 30), ("GPU-bbbb-2222", 80 << 30, 5 << 30)])
    found = samples(gpu_collector(nvml=nvml, torch=fake_torch(initialised=True)))
    assert value(found, "tlserve_gpu_memory_total_bytes", device="cuda:0") == 16 << 30  # NVML's figure kept
    assert value(found, "tlserve_gpu_memory_used_bytes", device="cuda:1") == 5 << 30
    assert value(found, "tlserve_gpu_memory_allocated_bytes", device="cuda:0") == 1 << 30
    assert value(found, "tlserve_gpu_memory_reserved_bytes", device="cuda:0") == 2 << 30
    assert value(found, "tlserve_gpu_memory_allocated_bytes", device="cuda:1") is None


def test_gpu_devices_are_numbered_as_cuda_visible_devices_numbers_them():
    nvml = FakeNvml([("GPU-aaaa", 16 << 30, 1), ("GPU-bbbb", 80 << 30, 2)])
    found = samples(gpu_collector(nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "1"}))
    assert found == {
        ("tlserve_gpu_memory_total_bytes", frozenset({("device", "cuda:0")})): 80 << 30,
        ("tlserve_gpu_memory_used_bytes", frozenset({("device", "cuda:0")})): 2,
    }
    uuid = {0: "GPU-aaaa", 1: "GPU-bbbb"}.__getitem__
    assert metrics_gpu.visible_gpus(None, 2, uuid) == [0, 1]
    assert metrics_gpu.visible_gpus("GPU-bb,0", 2, uuid) == [1, 0]
    assert metrics_gpu.visible_gpus("1,7,0", 2, uuid) == [1]  # CUDA stops at the first unknown device
    assert metrics_gpu.visible_gpus("", 2, uuid) == [] and metrics_gpu.visible_gpus("-1", 2, uuid) == []
    assert metrics_gpu.visible_gpus("MIG-1234", 2, uuid) == []


def test_torch_alone_gives_its_own_figures_and_the_device_total():
    found = samples(gpu_collector(torch=fake_torch(initialised=True)))
    assert value(found, "tlserve_gpu_memory_total_bytes", device="cuda:0") == 80 << 30
    assert value(found, "tlserve_gpu_memory_used_bytes", device="cuda:0") is None


def test_a_failing_driver_is_counted_and_leaves_the_rest():
    class Broken(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, handle):
            raise self.NVMLError("GPU is lost")

    registry = CollectorRegistry()
    collector = metrics_gpu.GpuCollector(Counter("errors", "", ["collector"], registry=registry),
                                     nvml=lambda: Broken([("GPU-a", 1, 1)]),
                                     torch=lambda: fake_torch(initialised=True), environ={})
    found = samples(collector)
    assert value(found, "tlserve_gpu_memory_allocated_bytes", device="cuda:0") == 1 << 30
    assert registry.get_sample_value("errors_total", {"collector": "gpu"}) == 1


def test_a_scrape_never_imports_torch():
    code = ("import sys, prometheus_client, tlserve.service.metrics; prometheus_client.generate_latest(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# -- job durations ---------------------------------------------------------------------


def test_job_duration_is_observed_by_final_state_from_first_start_to_end():
    training = metrics.TrainingMetrics.create(registry := CollectorRegistry())
    job = pb.Job(state=pb.JOB_STATE_SUCCEEDED)
    job.start_time.FromSeconds(1000)
    job.end_time.FromSeconds(1090)
    training.observe_job_end(job)
    never_started = pb.Job(state=pb.JOB_STATE_CANCELLED)
    never_started.end_time.FromSeconds(1000)
    training.observe_job_end(never_started)
    sample = registry.get_sample_value
    assert sample("tlserve_training_job_duration_seconds_count", {"state": "succeeded"}) == 1
    assert sample("tlserve_training_job_duration_seconds_sum", {"state": "succeeded"}) == 90
    assert sample("tlserve_training_job_duration_seconds_bucket", {"state": "succeeded", "le": "60.0"}) == 0
    assert sample("tlserve_training_job_duration_seconds_count", {"state": "cancelled"}) is None


def test_inference_limits_are_exported_for_alert_thresholds():
    inference = metrics.InferenceMetrics.create(registry := CollectorRegistry())
    inference.set_limits(256, 2 << 30)
    assert registry.get_sample_value("tlserve_inference_queue_capacity_requests") == 256
    assert registry.get_sample_value("tlserve_inference_model_cache_budget_bytes") == 2 << 30


def test_metric_objects_are_prometheus_client_types():
    for group in (metrics.GRPC, metrics.INFERENCE, metrics.TRAINING, metrics.EXPORTS):
        for field in group.__dataclass_fields__:
            assert isinstance(getattr(group, field), (Counter, Gauge, Histogram)), field
