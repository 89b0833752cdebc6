"""The pure parts of bench/predict.py: percentiles, the headline figures from
measurements, and the figures the output must end with. No timing is asserted."""

from __future__ import annotations

import pytest

from bench import predict


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert predict.percentile(values, 50) == 50.0
    assert predict.percentile(values, 99) == 99.0
    assert predict.percentile([3.0], 99) == 3.0
    assert predict.percentile([], 50) == 0.0


def test_headline_figures_compare_grpc_with_inprocess_at_the_same_batch_size():
    inprocess = {1: {"ratio": 2.0, "ort_p50_ms": 10.0, "ort_images_per_second": 100.0},
                 8: {"ratio": 1.5, "ort_p50_ms": 70.0, "ort_images_per_second": 114.0}}
    on = {("tensor", 1): {"p50_ms": 12.5, "images_per_second": 80.0, "p99_ms": 20.0},
          ("tensor", 8): {"p50_ms": 75.0, "images_per_second": 108.3, "p99_ms": 90.0}}
    off = {("tensor", 8): {"p50_ms": 80.0, "images_per_second": 95.0, "p99_ms": 99.0}}
    figures = predict.headline_figures(inprocess, on, off)
    assert figures["grpc_overhead_ms_c1"] == pytest.approx(2.5)
    assert figures["grpc_vs_inprocess_ratio_c8"] == pytest.approx(108.3 / 114.0)
    assert figures["batching_gain_c8"] == pytest.approx(108.3 / 95.0)
    assert figures["p99_ms_c8"] == 90.0
    assert figures["ort_vs_torch_ratio_b8"] == 1.5


def test_final_lines_put_the_required_figures_first_in_order():
    figures = {"extra": 1.0, "p99_ms_c8": 30.0, "ort_vs_torch_ratio_b1": 1.234}
    assert predict.final_lines(figures) == ["ort_vs_torch_ratio_b1: 1.23", "p99_ms_c8: 30.00", "extra: 1.00"]


def test_a_predict_request_for_the_load_client_parses_back():
    from client.tlserve.v1 import tlserve_pb2 as pb

    request = pb.PredictRequest.FromString(predict.predict_request_bytes("m", "tensor", 8))
    assert list(request.images[0].tensor.shape) == [8, 8, 3]
    assert len(request.images[0].tensor.data) == 8 * 8 * 3
    jpeg = pb.PredictRequest.FromString(predict.predict_request_bytes("m", "jpeg", 8))
    assert jpeg.images[0].encoded[:2] == b"\xff\xd8"
