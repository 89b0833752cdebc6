"""The metrics endpoint of a live server after known traffic, as Prometheus sees it.

One server over a home with a published model (`tests/modelfactory`): predictions
move the Predict metrics by exactly what was sent, the store's figures (model
sizes, accuracy, profiles, jobs) match what the API says, a fine-tuning job is
visible while it runs and its duration once it ends, the whole exposition passes
`promtool check metrics`, and a real Prometheus server scrapes it and answers a
query on a Predict metric.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tlserve.client as tlclient
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.manifest import Manifest
from tests.modelfactory import published_model
from tests.serverproc import ServerProcess, serving
from tests.test_metrics_units import catalogue, system_tool

FP32 = "onnx-fp32-float_nchw"


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as response:
        return response.read().decode()


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    home = tmp_path_factory.mktemp("scrape") / "home"
    return published_model(home)


@pytest.fixture(scope="module")
def server(made):
    settings, _ = made
    with serving(settings.home, "--data-root", str(settings.data_root)) as server:
        yield server


@pytest.fixture(scope="module")
def fp32(tl):
    return tl.export_model("shapes", precision="fp32")


@pytest.fixture(scope="module")
def image(made) -> bytes:
    settings, model = made
    manifest = Manifest.load(settings.datasets_dir / model.lineage.dataset_id / "manifest.json")
    return manifest.samples("test")[0][0].read_bytes()


def test_n_predictions_add_n_to_the_counters_of_their_model_variant(server, tl, fp32, image):
    labels = {"model": "shapes", "version": "1", "variant": FP32}
    before = parse(scrape(server))
    calls = 6
    for _ in range(calls):
        tl.predict("shapes", [image, image])
    with pytest.raises(tlclient.TLServeError) as e:
        tl.predict("shapes", [b"not an image"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    after = parse(scrape(server))

    def delta(name: str, **extra) -> float:
        return value(after, name, **labels, **extra) - value(before, name, **labels, **extra)

    assert delta("tlserve_predict_images_total") == 2 * calls
    assert delta("tlserve_predict_duration_seconds_count") == calls
    assert delta("tlserve_inference_batch_size_images_sum") == 2 * calls  # every image ran in some batch
    assert delta("tlserve_inference_queue_wait_seconds_count") == calls
    assert delta("tlserve_predict_errors_total", reason="invalid_argument") == 1
    assert value(after, "tlserve_predict_requests_in_flight", **labels) == 0
    assert value(after, "tlserve_inference_queue_requests", **labels) == 0
    assert value(after, "tlserve_inference_model_load_seconds_count", **labels) == 1  # loaded once, then cached
    assert value(after, "tlserve_inference_model_memory_bytes", **labels) > 0
    assert value(after, "tlserve_inference_loaded_models") == 1
    assert value(after, "tlserve_inference_queue_capacity_requests") == 256  # the defaults
    assert value(after, "tlserve_inference_model_cache_budget_bytes") == 2 << 30
    method = {"method": "tlserve.v1.TLServe/Predict"}
    assert (value(after, "tlserve_grpc_requests_total", **method, code="OK")
            - value(before, "tlserve_grpc_requests_total", **method, code="OK")) == calls
    assert value(after, "process_resident_memory_bytes") > 0


def test_model_figures_come_from_the_store_per_variant(server, tl, fp32):
    model = tl.get_model("shapes")
    found = parse(scrape(server))
    version = {"model": "shapes", "version": "1"}
    sizes = {a.format: a.size_bytes for a in model.artifacts}
    assert value(found, "tlserve_model_size_bytes", **version, variant="pytorch") == sizes[pb.ARTIFACT_FORMAT_PYTORCH]
    assert value(found, "tlserve_model_size_bytes", **version, variant=FP32) == fp32.size_bytes
    assert value(found, "tlserve_model_parameters", **version) == model.parameter_count > 0
    assert value(found, "tlserve_model_gflops", **version) == pytest.approx(model.gflops)
    assert value(found, "tlserve_model_accuracy_ratio", **version, variant="pytorch", split="val") == pytest.approx(
        model.val_metrics.top1_accuracy)
    assert value(found, "tlserve_model_accuracy_ratio", **version, variant=FP32, split="test") == pytest.approx(
        fp32.test_top1_accuracy)
    assert "tlserve_gpu_memory_total_bytes" not in scrape(server)  # no GPU here: absent, not zero


def test_profile_results_are_exported_as_gauges(server, tl, fp32):
    profile = tl.profile_model("shapes", variants=[pb.Variant(runtime=pb.RUNTIME_ONNX, precision=pb.PRECISION_FP32)],
                               batch_size=4, iterations=5)
    measured = profile.variants[0]
    found = parse(scrape(server))
    labels = {"model": "shapes", "version": "1", "variant": FP32}
    assert value(found, "tlserve_profile_latency_seconds", **labels, percentile="50") == pytest.approx(
        measured.latency_p50_seconds)
    assert value(found, "tlserve_profile_latency_seconds", **labels, percentile="99") == pytest.approx(
        measured.latency_p99_seconds)
    assert value(found, "tlserve_profile_throughput_images_per_second", **labels) == pytest.approx(
        measured.throughput_images_per_second)
    assert value(found, "tlserve_profile_timestamp_seconds", **labels) > 0


def test_a_finetune_job_is_seen_while_it_runs_and_its_duration_once_it_ends(server, tl):
    request = pb.FineTuneRequest(
        dataset="shapes", model_name="tiny", backbone="mobilenet_v3_small",
        weights=pb.WeightsSource(scratch=pb.WeightsSource.Scratch()), strategy=pb.STRATEGY_FULL, image_size=32,
        seed=7, training=pb.TrainingOptions(epochs=1, batch_size=8),
    )
    job = tl.fine_tune(request)
    running = {"model": "tiny", "backbone": "mobilenet_v3_small"}
    seen_running = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = parse(scrape(server))
        if ("tlserve_training_epoch", frozenset(running.items())) in found:
            seen_running = True
            assert value(found, "tlserve_training_jobs", state="running") == 1
        if value(found, "tlserve_training_job_duration_seconds_count", state="succeeded") == 1:
            break
        time.sleep(0.2)
    job = tl.get_job(job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert seen_running, "the running job's gauges were never scraped"
    assert value(found, "tlserve_training_jobs", state="succeeded") == 1
    assert value(found, "tlserve_training_jobs", state="running") == 0
    assert ("tlserve_training_epoch", frozenset(running.items())) not in found  # gone with the job
    assert 0 < value(found, "tlserve_training_job_duration_seconds_sum", state="succeeded") < 240
    assert value(found, "tlserve_model_parameters", model="tiny", version="1") > 0


def test_every_exported_tlserve_metric_is_in_the_catalogue(server):
    families = {f.name: f.type for f in text_string_to_metric_families(scrape(server))}
    known = catalogue()
    for name, kind in families.items():
        if name.startswith("tlserve_"):
            exposed = name + "_total" if kind == "counter" else name
            assert exposed in known and known[exposed][0] == kind, name


def test_the_exposition_after_traffic_passes_promtool(server):
    text = scrape(server)
    assert "tlserve_predict_images_total{" in text and "tlserve_model_size_bytes{" in text
    result = subprocess.run([system_tool("promtool"), "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_prometheus_scrapes_tlserve_and_answers_a_predict_query(server, tl, image, tmp_path):
    prometheus = system_tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "tlserve", "static_configs": [{"targets": [server.metrics_address]}]}],
    }))
    address = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={address}"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )

    def query(expr: str) -> list[dict]:
        url = f"http://{address}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    try:
        # The PyTorch variant: nothing else in this module predicts with it, so the count is exactly ours.
        predictions = 5
        for _ in range(predictions):
            tl.predict("shapes", [image], runtime="pytorch")
        expr = 'tlserve_predict_images_total{job="tlserve", model="shapes", variant="pytorch"}'
        result, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                result = query(expr)
            except OSError:  # not listening yet
                result = []
            if result and float(result[0]["value"][1]) == predictions:
                break
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        assert result and float(result[0]["value"][1]) == predictions, (result, (tmp_path / "prometheus.log").read_text())
        assert result[0]["metric"]["version"] == "1"
        assert query('up{job="tlserve"}')[0]["value"][1] == "1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_exports_are_counted_by_precision_and_outcome(server, tl, fp32):
    found = parse(scrape(server))
    assert value(found, "tlserve_exports_total", precision="fp32", outcome="ok") == 1
    assert value(found, "tlserve_export_duration_seconds_count", precision="fp32", outcome="ok") == 1
    with pytest.raises(tlclient.TLServeError) as e:
        tl.export_model("nosuch", precision="int8")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    found = parse(scrape(server))
    assert value(found, "tlserve_exports_total", precision="int8", outcome="not_found") == 1
    assert value(found, "tlserve_exports_total", precision="fp32", outcome="ok") == 1
