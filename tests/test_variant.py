"""`Variant`: the one type for what runs a model version, parsed from and written
to the keys the store, the metrics and the artifact files use."""

from __future__ import annotations

import pickle

import pytest

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.variant import LAYOUTS, PRECISIONS, Variant


def test_keys_and_file_names():
    assert (Variant.PYTORCH.key, Variant.PYTORCH.file_name) == ("pytorch", "model.pt")
    int8 = Variant.onnx("int8", "uint8_nhwc")
    assert (int8.key, int8.file_name, str(int8)) == (
        "onnx-int8-uint8_nhwc", "model-int8-uint8_nhwc.onnx", "onnx-int8-uint8_nhwc")
    assert Variant.onnx("fp16").key == "onnx-fp16-float_nchw"


def test_every_key_parses_back_to_its_variant():
    every = [Variant.PYTORCH] + [Variant.onnx(p, layout) for p in PRECISIONS for layout in LAYOUTS]
    assert len({v.key for v in every}) == len({v.file_name for v in every}) == 7
    for variant in every:
        assert Variant.parse(variant.key) == variant
        assert pickle.loads(pickle.dumps(variant)) == variant  # crosses into profiling's child process


@pytest.mark.parametrize("key", ["", "onnx", "onnx-fp32", "onnx-fp64-float_nchw", "onnx-fp32-nchw", "torch",
                                 "pytorch-fp32-float_nchw", "ONNX-fp32-float_nchw"])
def test_malformed_keys_are_refused(key):
    with pytest.raises(ValueError):
        Variant.parse(key)


def test_pytorch_is_fp32_on_float_input_only():
    with pytest.raises(ValueError, match="PyTorch"):
        Variant("pytorch", "int8")
    with pytest.raises(ValueError, match="runtime"):
        Variant("tensorrt")


def test_from_artifacts_with_unset_enums_read_as_fp32_float():
    assert Variant.of_artifact(pb.ModelArtifact(format=pb.ARTIFACT_FORMAT_PYTORCH)) == Variant.PYTORCH
    assert Variant.of_artifact(pb.ModelArtifact(format=pb.ARTIFACT_FORMAT_ONNX)) == Variant.onnx("fp32")
    onnx = pb.ModelArtifact(format=pb.ARTIFACT_FORMAT_ONNX, precision=pb.PRECISION_INT8,
                            input_format=pb.INPUT_FORMAT_UINT8_NHWC)
    variant = Variant.of_artifact(onnx)
    assert variant == Variant.onnx("int8", "uint8_nhwc")
    assert (variant.precision_enum, variant.input_format) == (pb.PRECISION_INT8, pb.INPUT_FORMAT_UINT8_NHWC)
    assert variant.to_proto() == pb.Variant(runtime=pb.RUNTIME_ONNX, precision=pb.PRECISION_INT8)
    assert Variant.PYTORCH.to_proto() == pb.Variant(runtime=pb.RUNTIME_PYTORCH, precision=pb.PRECISION_FP32)


def test_sort_order_pytorch_then_onnx_by_precision_float_graph_first():
    keys = ["onnx-int8-float_nchw", "pytorch", "onnx-fp16-float_nchw", "onnx-fp32-uint8_nhwc", "onnx-fp32-float_nchw"]
    ordered = sorted((Variant.parse(k) for k in keys), key=Variant.sort_key)
    assert [v.key for v in ordered] == [
        "pytorch", "onnx-fp32-float_nchw", "onnx-fp32-uint8_nhwc", "onnx-fp16-float_nchw", "onnx-int8-float_nchw"]
