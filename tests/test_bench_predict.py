"""The pure parts of bench/predict.py: percentiles, the headline figures from
measurements, and the figures the output must end with. No timing is asserted."""

from __future__ import annotations

import math

import pytest

from bench import common, predict


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert common.percentile(values, 50) == 50.0
    assert common.percentile(values, 99) == 99.0
    assert common.percentile([3.0], 99) == 3.0
    assert common.percentile([], 50) == 0.0


def test_headline_figures_take_the_rounds_paired_with_inprocess_ones():
    inprocess = {1: {"ratio": 2.0, "ort_p50_ms": 10.0, "ort_images_per_second": 100.0},
                 8: {"ratio": 1.5, "ort_p50_ms": 70.0, "ort_images_per_second": 114.0}}
    on = {("tensor", 1): {"p50_ms": 12.5, "added_ms": 2.5, "ratio": 0.8, "p99_ms": 20.0,
                          "added_ms_iqr": (2.0, 3.0), "ratio_iqr": (0.7, 0.9)},
          ("tensor", 8): {"p50_ms": 75.0, "added_ms": 5.0, "ratio": 0.95, "p99_ms": 90.0,
                          "added_ms_iqr": (4.0, 6.0), "ratio_iqr": (0.9, 0.97), "ratio_whole": 0.9}}
    off = {("tensor", 8): {"p50_ms": 80.0, "added_ms": 10.0, "ratio": 0.76, "p99_ms": 99.0}}
    figures = predict.headline_figures(inprocess, on, off)
    assert figures["grpc_overhead_ms_c1"] == 2.5
    assert figures["grpc_vs_inprocess_ratio_c8"] == 0.95
    assert figures["batching_gain_c8"] == pytest.approx(0.95 / 0.76)
    assert figures["p99_ms_c8"] == 90.0
    assert figures["ort_vs_torch_ratio_b8"] == 1.5
    assert (figures["grpc_vs_inprocess_ratio_c8_q1"], figures["grpc_vs_inprocess_ratio_c8_q3"]) == (0.9, 0.97)
    assert (figures["grpc_overhead_ms_c1_q1"], figures["grpc_overhead_ms_c1_q3"]) == (2.0, 3.0)
    assert figures["grpc_vs_inprocess_ratio_c8_whole_rounds"] == 0.9


class _Client:
    """Answers each measurement as callers each with one call of `latency_ms` in flight
    would: back to back from the start until `ramp + seconds`, the last one finishing
    after that (the drain)."""

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self.commands: list[tuple[int, float, float, float]] = []

    def run(self, concurrency: int, seconds: float, warmup: float = 0.0, ramp: float = 0.0) -> dict:
        self.commands.append((concurrency, seconds, warmup, ramp))
        latency = self.latency_ms / 1e3
        per_caller = math.ceil(round((ramp + seconds) / latency, 9))  # calls started before the stop
        ends = [round(i * latency, 9) for i in range(1, per_caller + 1)] * concurrency
        return {"concurrency": concurrency, "wall_s": per_caller * latency, "errors": {},
                "latencies_ms": [self.latency_ms] * len(ends), "ends_s": ends}


class _Reference:
    """Calls of `seconds_per_call`, or of the next of several per round."""

    def __init__(self, seconds_per_call: float | list[float]) -> None:
        self.per_round = seconds_per_call if isinstance(seconds_per_call, list) else None
        self.seconds_per_call = seconds_per_call
        self.batches: list[int] = []

    def run(self, batch: int, seconds: float) -> list[float]:
        self.batches.append(batch)
        per_call = self.per_round[len(self.batches) - 1] if self.per_round else self.seconds_per_call
        return [per_call] * 5


def test_paired_load_compares_each_round_with_its_inprocess_neighbour():
    settings = predict.Settings(backbones=("resnet18",), paired_rounds=4, load_seconds=8.0, warmup_seconds=1.0)
    client, reference = _Client(latency_ms=100.0), _Reference(seconds_per_call=0.08)
    result = predict.paired_load(client, reference, concurrency=8, batch=8, settings=settings)
    assert client.commands[0] == (8, 0.0, 1.0, 0.0)  # a warm-up first, not recorded
    assert client.commands[1:] == [(8, 2.0, 0.0, 0.25)] * 4  # ramp max(0.25, 2 × 8 × 0.08 / 8 s)
    assert reference.batches == [8] * 4
    assert result["added_ms"] == pytest.approx(20.0)
    # 8 callers × 10 calls/s = 80 images/s against 8 / 0.08 = 100 in-process
    assert result["ratio"] == pytest.approx(0.8)
    assert result["images_per_second"] == pytest.approx(80.0)
    assert result["p50_ms"] == 100.0
    assert result["ratio_iqr"] == pytest.approx((0.8, 0.8))


def test_paired_load_counts_the_steady_window_and_reports_whole_rounds_beside_it():
    # Calls of 300 ms, in-process 4 images in 0.3 s: the ramp is 2 × 4 × 0.3 / 4 s, each
    # round's window 1 s; a caller's calls end at 0.3, 0.6, ..., 1.8 s (the last one
    # started at 1.5 s, before the stop at 1.6).
    settings = predict.Settings(backbones=("resnet18",), paired_rounds=2, load_seconds=2.0, warmup_seconds=1.0)
    client, reference = _Client(latency_ms=300.0), _Reference(seconds_per_call=0.3)
    result = predict.paired_load(client, reference, concurrency=4, batch=4, settings=settings)
    assert result["ramp_s"] == pytest.approx(0.6)
    assert client.commands[1:] == [(4, 1.0, 0.0, 0.6)] * 2
    # In the window [0.6, 1.6): ends at 0.6, 0.9, 1.2, 1.5 per caller, 16 in 1 s, against
    # 4 / 0.3 = 13.3 in-process; the whole round, 24 calls over 1.8 s, has its drain in it.
    assert result["images_per_second"] == pytest.approx(16.0)
    assert result["ratio"] == pytest.approx(16.0 / (4 / 0.3))
    assert result["ratio_whole"] == pytest.approx((24 / 1.8) / (4 / 0.3))
    assert result["calls"] == 32


def test_paired_load_gives_the_quartiles_of_its_rounds():
    settings = predict.Settings(backbones=("resnet18",), paired_rounds=5, load_seconds=10.0)
    # In-process batch 8 at 100, 80, 50, 200 and 160 images/s; gRPC 80 images/s throughout.
    reference = _Reference([0.08, 0.1, 0.16, 0.04, 0.05])
    result = predict.paired_load(_Client(latency_ms=100.0), reference, concurrency=8, batch=8, settings=settings)
    assert result["ratio"] == pytest.approx(0.8)  # ratios 0.8, 1.0, 1.6, 0.4, 0.5
    assert result["ratio_iqr"] == pytest.approx((0.5, 1.0))
    assert result["added_ms_iqr"] == pytest.approx((0.0, 50.0))  # 20, 0, -60, 60, 50
    assert predict.quartiles([]) != predict.quartiles([])  # NaN: no rounds, no spread
    assert predict.quartiles([3.0]) == (3.0, 3.0)


def test_final_lines_end_with_the_required_figures_in_order():
    figures = {"p99_ms_c8": 30.0, "extra": 1.0, "ort_vs_torch_ratio_b1": 1.234, "later": 2.0}
    assert predict.final_lines(figures) == [
        "extra: 1.00", "later: 2.00", "ort_vs_torch_ratio_b1: 1.23", "p99_ms_c8: 30.00"]


def test_a_predict_request_for_the_load_client_parses_back():
    from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

    request = pb.PredictRequest.FromString(predict.predict_request_bytes("m", "tensor", 8))
    assert list(request.images[0].tensor.shape) == [8, 8, 3]
    assert len(request.images[0].tensor.data) == 8 * 8 * 3
    jpeg = pb.PredictRequest.FromString(predict.predict_request_bytes("m", "jpeg", 8))
    assert jpeg.images[0].encoded[:2] == b"\xff\xd8"


def test_a_variant_export_refused_is_reported_with_its_reason_not_measured(tmp_path):
    from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

    settings = predict.Settings(backbones=("resnet18",))
    reason = "the ONNX export of m:1 int8 float_nchw does not match PyTorch on 24 val images"
    rows = predict.bench_precisions(tmp_path, pb.Model(name="m", version=1), {pb.PRECISION_INT8: reason},
                                    {pb.PRECISION_INT8: reason}, settings)
    row = rows[pb.PRECISION_INT8]
    assert row["refused"] == [f"accuracy model: {reason}", f"speed model: {reason}"]
    assert all(row[k] != row[k] for k in ("size_bytes", "p50_ms_b8", "test_top1", "delta_points"))  # NaN
