"""Pure parts of profiling: percentiles, timing, peak memory, and stored profiles."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.profiling import measure
from tlserve.service.store.artifacts import ArtifactStore
from tlserve.service.store.metadata import MetadataStore
from tlserve.service.store.models import ModelStore
from tlserve.service.variant import Variant


def test_percentiles_interpolate_between_ranks_like_numpy():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0, 7.0]
    for q in (0, 25, 50, 95, 99, 100):
        assert measure.percentile(samples, q) == pytest.approx(np.percentile(samples, q))
    assert measure.percentile([1.0, 2.0], 50) == 1.5
    assert measure.percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        measure.percentile([], 50)
    with pytest.raises(ValueError):
        measure.percentile([1.0], 101)


def test_latency_summary():
    lat = measure.Latency.of([0.001 * i for i in range(1, 101)])
    assert lat.count == 100
    assert lat.p50 == pytest.approx(0.0505)
    assert lat.p95 == pytest.approx(0.09505)
    assert lat.p99 == pytest.approx(0.09901)
    assert lat.mean == pytest.approx(0.0505)


def test_time_calls_runs_warmup_untimed_then_times_each_call():
    calls = []
    samples = measure.time_calls(lambda: (calls.append(1), time.sleep(0.002)), iterations=4, warmup=2)
    assert len(calls) == 6 and len(samples) == 4
    assert all(0.0015 < s < 0.5 for s in samples)
    with pytest.raises(ValueError):
        measure.time_calls(lambda: None, iterations=0)


# Measured in a fresh interpreter, as ProfileModel measures in a fresh child process:
# in a long test process, memory other threads free or fault in meanwhile is counted too.
_PEAK_SCRIPT = """
import sys, time
import numpy as np
from tlserve.service.profiling import measure
if sys.argv[1] == "sampled":
    measure._reset_peak = lambda: False
with measure.PeakMemory() as peak:
    block = np.ones(64 * 1024 * 1024, dtype=np.uint8)  # 64 MiB, touched
    time.sleep(0.05)  # the sampler looks every millisecond
    del block
with measure.PeakMemory() as quiet:
    pass
print(peak.bytes, int(peak.exact), quiet.bytes)
"""


def _peak_in_child(mode: str) -> tuple[int, bool, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, mode], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    return int(out[0]), bool(int(out[1])), int(out[2])


def test_peak_memory_sees_an_allocation_that_is_freed_before_the_block_ends():
    peak, exact, quiet = _peak_in_child("exact")
    assert 60 * 1024 * 1024 <= peak < 200 * 1024 * 1024, (peak, exact)
    assert quiet < 16 * 1024 * 1024


def test_peak_memory_falls_back_to_sampling():
    peak, exact, _ = _peak_in_child("sampled")
    assert not exact
    assert peak >= 60 * 1024 * 1024


def test_profiles_are_stored_per_variant_and_go_with_their_model(tmp_path):
    store = ModelStore(MetadataStore(tmp_path / "db.sqlite"), ArtifactStore(tmp_path / "artifacts"))
    store.publish(pb.Model(name="m", version=1, backbone="resnet18", class_names=["a", "b"]), [])
    int8 = pb.Variant(runtime=pb.RUNTIME_ONNX, precision=pb.PRECISION_INT8)
    first = pb.VariantProfile(latency_p50_seconds=0.004, variant=int8)
    first.time.FromSeconds(100)
    store.put_profile("m", 1, Variant.onnx("int8"), first)
    second = pb.VariantProfile(latency_p50_seconds=0.009,
                               variant=pb.Variant(runtime=pb.RUNTIME_PYTORCH, precision=pb.PRECISION_FP32))
    second.time.FromSeconds(200)
    store.put_profile("m", 1, Variant.PYTORCH, second)
    replaced = pb.VariantProfile(latency_p50_seconds=0.003, variant=int8)
    replaced.time.FromSeconds(150)
    store.put_profile("m", 1, Variant.onnx("int8"), replaced)

    model = store.get("m")
    assert [v.latency_p50_seconds for v in model.profile.variants] == [0.009, 0.003]
    assert model.profile.time.seconds == 200
    assert (model.profile.model.name, model.profile.model.version) == ("m", 1)
    assert [(n, v, var.key) for n, v, var, _ in store.all_profiles()] == [
        ("m", 1, "onnx-int8-float_nchw"), ("m", 1, "pytorch"),
    ]

    # The same precision measured through another input layout: the latest one is shown.
    uint8 = pb.VariantProfile(latency_p50_seconds=0.002, variant=int8)
    uint8.time.FromSeconds(300)
    store.put_profile("m", 1, Variant.onnx("int8", "uint8_nhwc"), uint8)
    store.put_profile("m", 1, Variant.onnx("int8"), replaced)
    assert [v.latency_p50_seconds for v in store.get("m").profile.variants] == [0.009, 0.002]

    store.delete(pb.ModelRef(name="m", version=1), all_versions=False)
    assert store.all_profiles() == []
