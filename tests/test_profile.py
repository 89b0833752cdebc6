"""ProfileModel through the client against a live server: a real model's variants
measured on this machine, stored with the model, and every bad input refused
with the status a user can act on while the server keeps serving.

The model is `tests/modelfactory.published_model` (resnet18 at 32 px, three
procedural shapes), exported here in FP32 and INT8.
"""

from __future__ import annotations

import grpc
import pytest

import tlserve.client as tlclient
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.manifest import Manifest
from tests.modelfactory import published_model
from tests.serverproc import serving

ITERATIONS = 12


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    home = tmp_path_factory.mktemp("profile") / "home"
    settings, model = published_model(home)
    return home, settings, model


@pytest.fixture(scope="module")
def server(made):
    home, settings, _ = made
    # Two CPU lanes whatever the machine's cores: ONNX variants are profiled as Predict
    # loads them with lanes (wide and narrow sessions), timed on the wide one.
    with serving(home, "--data-root", str(settings.data_root), "--inference-threads", "1",
                 "--cpu-lanes", "2") as server:
        yield server


@pytest.fixture(scope="module")
def pytorch_only(tl):
    """A profile taken before any export: the PyTorch variant alone."""
    return tl.profile_model("shapes", iterations=ITERATIONS, batch_size=4)


@pytest.fixture(scope="module")
def exported(tl, pytorch_only):
    fp32 = tl.export_model("shapes", precision="fp32")
    int8 = tl.export_model("shapes", precision="int8")
    return {"fp32": fp32, "int8": int8}


@pytest.fixture(scope="module")
def profiled(tl, exported):
    """Every variant profiled once the model is exported."""
    return tl.profile_model("shapes", iterations=ITERATIONS, batch_size=8)


def _check_figures(v: pb.VariantProfile, batch_size: int) -> None:
    assert 0 < v.latency_p50_seconds <= v.latency_p95_seconds <= v.latency_p99_seconds < 5
    assert v.batch_size == batch_size and v.throughput_images_per_second > 0
    assert v.iterations == ITERATIONS
    assert v.peak_memory_bytes > 0 and v.load_seconds > 0
    assert v.device == "cpu"
    assert v.time.seconds > 0


def test_a_model_not_yet_exported_is_profiled_on_pytorch(pytorch_only, made):
    _, _, model = made
    (v,) = pytorch_only.variants
    assert (v.variant.runtime, v.variant.precision) == (pb.RUNTIME_PYTORCH, pb.PRECISION_FP32)
    _check_figures(v, 4)
    assert v.parameter_count == model.parameter_count > 0
    assert v.gflops == pytest.approx(model.gflops) and v.gflops > 0
    pytorch_artifact = next(a for a in model.artifacts if a.format == pb.ARTIFACT_FORMAT_PYTORCH)
    assert v.size_bytes == pytorch_artifact.size_bytes
    # Accuracy not asked for: the figure stored at training time, said so.
    assert not v.accuracy_measured
    assert v.test_top1_accuracy == pytest.approx(model.test_metrics.top1_accuracy)


def test_every_variant_is_profiled_and_stored_with_the_model(tl, exported, profiled):
    profile = profiled
    kinds = [(v.variant.runtime, v.variant.precision) for v in profile.variants]
    assert kinds == [(pb.RUNTIME_PYTORCH, pb.PRECISION_FP32), (pb.RUNTIME_ONNX, pb.PRECISION_FP32),
                     (pb.RUNTIME_ONNX, pb.PRECISION_INT8)]
    for v in profile.variants:
        _check_figures(v, 8)
    _, onnx32, onnx8 = profile.variants
    assert onnx32.size_bytes == exported["fp32"].size_bytes
    assert onnx8.size_bytes == exported["int8"].size_bytes < onnx32.size_bytes
    assert onnx8.test_top1_accuracy == pytest.approx(exported["int8"].test_top1_accuracy)

    stored = tl.get_model("shapes").profile
    assert stored.model.name == "shapes" and stored.model.version == 1
    assert [v.latency_p50_seconds for v in stored.variants] == [v.latency_p50_seconds for v in profile.variants]
    listed = tl.list_models(name="shapes").models[0].profile
    assert len(listed.variants) == 3


def test_measured_accuracy_matches_the_export_on_the_same_test_images(tl, exported, profiled, made):
    _, settings, model = made
    profile = tl.profile_model("shapes", variants=[("onnx", "fp32")], iterations=ITERATIONS,
                               measure_accuracy=True)
    (v,) = profile.variants
    manifest = Manifest.load(settings.datasets_dir / model.lineage.dataset_id / "manifest.json")
    assert v.accuracy_measured and v.test_image_count == len(manifest.samples("test"))
    # Same images, same runtime, same preprocessing as the export's own measurement.
    assert v.test_top1_accuracy == pytest.approx(exported["fp32"].test_top1_accuracy)
    # Re-profiling one variant replaces its stored figures and keeps the others.
    stored = {(s.variant.runtime, s.variant.precision): s for s in tl.get_model("shapes").profile.variants}
    assert stored[(pb.RUNTIME_ONNX, pb.PRECISION_FP32)].accuracy_measured
    assert (pb.RUNTIME_PYTORCH, pb.PRECISION_FP32) in stored


@pytest.mark.parametrize(
    "kwargs, code, words",
    [
        ({"model": "nosuch"}, grpc.StatusCode.NOT_FOUND, ["nosuch"]),
        ({"version": 9}, grpc.StatusCode.NOT_FOUND, ["version 9"]),
        ({"batch_size": -1}, grpc.StatusCode.INVALID_ARGUMENT, ["batch_size", "1..256"]),
        ({"batch_size": 257}, grpc.StatusCode.INVALID_ARGUMENT, ["batch_size"]),
        ({"iterations": -5}, grpc.StatusCode.INVALID_ARGUMENT, ["iterations"]),
        ({"iterations": 10_001}, grpc.StatusCode.INVALID_ARGUMENT, ["iterations"]),
        ({"variants": [("onnx", "fp16")]}, grpc.StatusCode.FAILED_PRECONDITION, ["ExportModel", "fp16"]),
        ({"variants": [pb.Variant(runtime=7)]}, grpc.StatusCode.INVALID_ARGUMENT, ["runtime"]),
    ],
)
def test_bad_requests_are_refused_and_nothing_is_stored(tl, exported, kwargs, code, words):
    before = tl.get_model("shapes").profile
    args = {"model": "shapes", "iterations": ITERATIONS, **kwargs}
    with pytest.raises(tlclient.TLServeError) as e:
        tl.profile_model(args.pop("model"), **args)
    assert e.value.code == code, e.value.message
    for word in words:
        assert word in e.value.message
    assert tl.get_model("shapes").profile == before
    assert tl.health() == "SERVING"


def test_a_measurement_of_a_version_deleted_meanwhile_is_dropped(tl, made):
    from tlserve.service.store.artifacts import ArtifactStore
    from tlserve.service.store.metadata import MetadataStore
    from tlserve.service.store.models import ModelStore
    from tlserve.service.variant import Variant

    _, settings, _ = made
    store = ModelStore(MetadataStore(settings.database_path), ArtifactStore(settings.artifacts_dir))
    assert store.profiles("shapes", 1)
    # A measurement for a version that is gone is dropped, not an error.
    store.put_profile("shapes", 99, Variant.PYTORCH, pb.VariantProfile(latency_p50_seconds=0.001))
    assert store.profiles("shapes", 99) == []


def _tlserve(server, *args: str, check: bool = True):
    import subprocess
    import sys
    from pathlib import Path

    tlserve = str(Path(sys.executable).with_name("tlserve"))
    result = subprocess.run([tlserve, "--address", server.address, "--timeout", "300", *args],
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_report_uses_the_stored_profile_and_writes_chart_and_page(tl, server, profiled, tmp_path):
    import json

    from PIL import Image

    stored = tl.get_model("shapes").profile
    assert len(stored.variants) == 3
    out = tmp_path / "report"
    document = json.loads(_tlserve(server, "--json", "report", "shapes", "--out", str(out),
                                   "--max-size-mb", "10").stdout)
    # Read back, not measured again: the figures are the stored ones.
    points = {p["variant"]: p for p in document["points"]}
    assert set(points) == {"pytorch", "onnx fp32", "onnx int8"}
    by_kind = {(v.variant.runtime, v.variant.precision): v for v in stored.variants}
    assert points["onnx int8"]["latency_seconds"] == pytest.approx(
        by_kind[(pb.RUNTIME_ONNX, pb.PRECISION_INT8)].latency_p50_seconds)
    # resnet18 is ~45 MB in FP32 and ~11 MB in INT8: a 10 MB budget fits nothing,
    # and the recommendation says which figure missed.
    recommendation = document["recommendation"]
    assert recommendation["point"] is None and "MB" in recommendation["reason"]

    with Image.open(out / "report.png") as png:
        assert png.format == "PNG" and png.size == (1200, 750)
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "onnx int8" in page
    assert "http://" not in page and "https://" not in page


def test_report_recommends_the_most_accurate_variant_within_a_size_budget(tl, server, profiled, tmp_path):
    text = _tlserve(server, "report", "shapes", "--out", str(tmp_path / "r"), "--max-size-mb", "20",
                    "--no-chart").stdout
    lines = text.splitlines()
    # The table: one row per stored variant, figures formatted.
    assert sum("shapes:1" in line for line in lines) >= 3
    recommendation = next(line for line in lines if line.startswith("recommendation:"))
    assert "shapes:1 onnx int8" in recommendation and "20 MB" in recommendation
    assert not (tmp_path / "r").exists()  # --no-chart writes nothing


def test_report_remeasure_profiles_again(tl, server, profiled, tmp_path):
    before = tl.get_model("shapes").profile
    _tlserve(server, "report", "shapes", "--remeasure", "--no-chart", "--batch-size", "2")
    after = tl.get_model("shapes").profile
    assert all(v.batch_size == 2 for v in after.variants)
    assert after.time.ToNanoseconds() > before.time.ToNanoseconds()
