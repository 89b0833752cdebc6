"""The KServe v2 protocol service's conversions, without a server: model names,
tensors in and out, Triton's configuration and statistics, and the servicer's
RPCs over fake domain objects. Wire compatibility is checked by decoding what
we encode with tritonclient's own compiled copy of Triton's protos.

Statistics records are the inference service's own (`service.inference.stats`);
the inference service and the model store are fakes with the same methods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import struct
import sys
import time
import types

import numpy as np
import pytest

from tlserve.client.inference import grpc_service_pb2 as kpb
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.api import kserve
from tlserve.service.errors import FailedPrecondition, InvalidArgument, NotFound
from tlserve.service.inference.stats import BatchStats, Duration, ModelStatistics
from tlserve.service.variant import LAYOUTS, Variant

V = Variant.parse

CLASSES = ["circle", "square", "triangle"]


def tritonclient_grpc():
    """tritonclient.grpc, its protos loaded into a private descriptor pool.

    Ours and tritonclient's both define package `inference`; protobuf's default
    pool refuses the second copy (kserve/kserve#3099), so tritonclient gets a
    pool of its own, whichever of the two a process imported first."""
    if "tritonclient.grpc" in sys.modules:
        return sys.modules["tritonclient.grpc"]
    from google.protobuf import descriptor_pool, symbol_database  # noqa: F401  (the default database exists first)

    private = descriptor_pool.DescriptorPool()
    default = descriptor_pool.Default
    descriptor_pool.Default = lambda: private
    try:
        return importlib.import_module("tritonclient.grpc")
    finally:
        descriptor_pool.Default = default


# --- fakes ----------------------------------------------------------------------


def spec(name: str, dtype: int, shape: list[int]) -> pb.TensorSpec:
    return pb.TensorSpec(name=name, dtype=dtype, shape=shape)


FP32_INPUT = spec("input", pb.DATA_TYPE_FLOAT32, [-1, 3, 32, 32])
UINT8_INPUT = spec("input", pb.DATA_TYPE_UINT8, [-1, 32, 32, 3])
OUTPUTS = [spec("logits", pb.DATA_TYPE_FLOAT32, [-1, 3]), spec("embedding", pb.DATA_TYPE_FLOAT32, [-1, 8])]


def artifact(
    version: int, precision: int = pb.PRECISION_FP32, *, pytorch: bool = False, nhwc: bool | None = None,
) -> pb.ModelArtifact:
    """An artifact of model "shapes"; ONNX INT8 takes uint8 NHWC pixels unless `nhwc` says otherwise."""
    uint8 = precision == pb.PRECISION_INT8 if nhwc is None else nhwc
    return pb.ModelArtifact(
        model=pb.ModelRef(name="shapes", version=version),
        format=pb.ARTIFACT_FORMAT_PYTORCH if pytorch else pb.ARTIFACT_FORMAT_ONNX,
        precision=precision,
        input_format=pb.INPUT_FORMAT_UINT8_NHWC if uint8 else pb.INPUT_FORMAT_FLOAT_NCHW,
        inputs=[UINT8_INPUT if uint8 else FP32_INPUT],
        outputs=OUTPUTS,
        has_embedding=True,
        class_names=CLASSES,
    )


def shapes_model(version: int, *artifacts: pb.ModelArtifact) -> pb.Model:
    return pb.Model(name="shapes", version=version, class_names=CLASSES, artifacts=artifacts)


_PRECISIONS = {pb.PRECISION_FP32: "fp32", pb.PRECISION_FP16: "fp16", pb.PRECISION_INT8: "int8"}


class FakeInference:
    """The InferenceService API the servicer calls; logits are the first pixels of each image."""

    def __init__(self, stats=()):
        self.loaded: set[tuple[str, int, str]] = set()
        self.calls: list[tuple] = []
        self.stats = list(stats)
        self.models: FakeModels | None = None  # the store the service reads records from

    async def target(self, name, version, runtime, precision, layout=None):
        model = self.models.get(name, version)
        return model, self.choose_variant(model, runtime, precision, layout)

    def choose_variant(self, model, runtime, precision, layout=None):
        """As the service chooses: the float NCHW export, else the uint8 NHWC one, or `layout` only."""
        if runtime == pb.RUNTIME_PYTORCH:
            wanted = [Variant.PYTORCH]
        else:
            layouts = [layout] if layout else LAYOUTS
            wanted = [Variant.onnx(_PRECISIONS[precision], x) for x in layouts]
        have = {Variant.of_artifact(a) for a in model.artifacts}
        for variant in wanted:
            if variant in have:
                return variant
        raise FailedPrecondition(f"model {model.name} version {model.version} has no {' or '.join(map(str, wanted))} export")

    def is_ready(self, name, version, variant):
        return (name, version, variant) in self.loaded

    def loaded_model(self, name, version, variant):
        """Loaded variants run on the CPU, two lanes."""
        if (name, version, variant) not in self.loaded:
            return None
        return types.SimpleNamespace(
            providers=("CPUExecutionProvider",), batcher=types.SimpleNamespace(max_concurrent_batches=2)
        )

    async def ensure_loaded(self, name, version, variant):
        self.loaded.add((name, version, variant))

    async def infer(self, name, version, variant, inputs, *, deadline=None):
        self.calls.append((name, version, variant, inputs, deadline))
        flat = inputs.reshape(len(inputs), -1).astype(np.float32)
        return {"logits": flat[:, :3], "embedding": flat[:, :8]}

    def statistics(self):
        return self.stats


class FakeModels:
    def __init__(self, *models: pb.Model):
        self.models = {(m.name, m.version): m for m in models}

    def get(self, name, version=0):
        versions = [v for (n, v) in self.models if n == name]
        if not versions or version and version not in versions:
            raise NotFound(f"model {name!r} does not exist")
        return self.models[(name, version or max(versions))]

    def list(self, name, latest_only, page_size, page_token):
        return [m for (n, _), m in sorted(self.models.items()) if n == name], ""


def servicer(inference=None, models=None, ready=True) -> kserve.KServeServicer:
    models = models or FakeModels(
        shapes_model(1, artifact(1)),
        shapes_model(2, artifact(2), artifact(2, pb.PRECISION_INT8), artifact(2, pytorch=True)),
    )
    inference = inference or FakeInference()
    inference.models = models
    return kserve.KServeServicer(
        inference, models, server_name="tlserve", server_version="9.9",
        is_ready=lambda: ready, max_batch_size=4, batch_delay_seconds=0.002,
    )


def run(coroutine):
    return asyncio.run(coroutine)


def typed_request(datatype: str, shape: list[int], **contents) -> kpb.ModelInferRequest:
    """A request for input "input" with typed contents (fp32_contents=..., uint_contents=...)."""
    tensor = kpb.ModelInferRequest.InferInputTensor(
        name="input", datatype=datatype, shape=shape, contents=kpb.InferTensorContents(**contents)
    )
    return kpb.ModelInferRequest(inputs=[tensor])


def infer_request(array: np.ndarray, *, model="shapes", datatype="FP32", name="input", **kw) -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(
        model_name=model,
        inputs=[kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape)],
        raw_input_contents=[array.tobytes()],
        **kw,
    )


# --- names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, version, expected",
    [
        ("shapes", "", ("shapes", 0, pb.RUNTIME_ONNX, pb.PRECISION_FP32, None)),
        ("shapes", "3", ("shapes", 3, pb.RUNTIME_ONNX, pb.PRECISION_FP32, None)),
        ("shapes@fp16", "", ("shapes", 0, pb.RUNTIME_ONNX, pb.PRECISION_FP16, None)),
        ("my.model-2@int8", "12", ("my.model-2", 12, pb.RUNTIME_ONNX, pb.PRECISION_INT8, None)),
        ("shapes@pytorch", "1", ("shapes", 1, pb.RUNTIME_PYTORCH, pb.PRECISION_FP32, None)),
        ("shapes@nhwc", "", ("shapes", 0, pb.RUNTIME_ONNX, pb.PRECISION_FP32, "uint8_nhwc")),
        ("shapes@fp16-nhwc", "2", ("shapes", 2, pb.RUNTIME_ONNX, pb.PRECISION_FP16, "uint8_nhwc")),
        ("shapes@int8-nhwc", "", ("shapes", 0, pb.RUNTIME_ONNX, pb.PRECISION_INT8, "uint8_nhwc")),
    ],
)
def test_model_names_select_runtime_and_precision(name, version, expected):
    assert dataclasses.astuple(kserve.parse_model(name, version)) == expected


@pytest.mark.parametrize(
    "name, version, words",
    [
        ("", "", "model_name is required"),
        ("@fp16", "", "model_name is required"),
        ("shapes@fp64", "", "@fp16, @int8, @pytorch, @nhwc, @fp16-nhwc, @int8-nhwc"),
        ("shapes@nhwc-int8", "", "unknown variant"),
        ("shapes@uint8", "", "unknown variant"),
        ("shapes@", "", "unknown variant"),
        ("shapes@FP16", "", "unknown variant"),
        ("shapes", "latest", "model_version"),
        ("shapes", "0", "model_version"),
        ("shapes", "-1", "model_version"),
        ("shapes", "1.0", "model_version"),
        ("shapes", "\u0663", "model_version"),  # an Arabic-Indic 3: a digit to str.isdigit, not a version
    ],
)
def test_bad_model_names_and_versions_are_invalid_arguments_that_say_what_is_valid(name, version, words):
    with pytest.raises(InvalidArgument, match=words):
        kserve.parse_model(name, version)


def test_variant_keys_map_back_to_protocol_names():
    assert kserve.protocol_names("m", V("onnx-fp32-float_nchw")) == ("m",)
    assert kserve.protocol_names("m", V("onnx-fp32-uint8_nhwc")) == ("m", "m@nhwc")
    assert kserve.protocol_names("m", V("onnx-fp16-float_nchw")) == ("m@fp16",)
    assert kserve.protocol_names("m", V("onnx-int8-uint8_nhwc")) == ("m@int8", "m@int8-nhwc")
    assert kserve.protocol_names("m", V("pytorch")) == ("m@pytorch",)
    every_export = shapes_model(1, *(artifact(1, p, nhwc=n) for p in _PRECISIONS for n in (False, True)),
                                artifact(1, pytorch=True))
    for suffix in kserve.SUFFIXES:
        name = "shapes" + (f"@{suffix}" if suffix else "")
        selector = kserve.parse_model(name)
        variant = FakeInference().choose_variant(every_export, selector.runtime, selector.precision, selector.layout)
        assert name in kserve.protocol_names("shapes", variant)


# --- tensors in -------------------------------------------------------------------


def test_raw_fp32_input_decodes_to_the_same_array():
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    decoded = kserve.decode_input(infer_request(x), FP32_INPUT, max_batch_size=4)
    assert decoded.dtype == np.float32 and decoded.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(decoded, x)


def test_raw_input_is_read_little_endian():
    x = np.arange(3 * 32 * 32, dtype=np.float32).reshape(1, 3, 32, 32)
    request = infer_request(x)
    request.raw_input_contents[0] = x.astype(">f4").tobytes()  # a big-endian sender: wrong bytes, must not match
    assert not np.array_equal(kserve.decode_input(request, FP32_INPUT, 4), x)
    request.raw_input_contents[0] = x.astype("<f4").tobytes()
    np.testing.assert_array_equal(kserve.decode_input(request, FP32_INPUT, 4), x)


def test_typed_fp32_and_uint8_contents_decode():
    x = np.linspace(-1, 1, 3 * 32 * 32, dtype=np.float32).reshape(1, 3, 32, 32)
    request = typed_request("FP32", x.shape, fp32_contents=x.ravel())
    np.testing.assert_array_equal(kserve.decode_input(request, FP32_INPUT, 4), x)

    pixels = np.arange(2 * 32 * 32 * 3).reshape(2, 32, 32, 3) % 256
    request = typed_request("UINT8", pixels.shape, uint_contents=pixels.ravel())
    decoded = kserve.decode_input(request, UINT8_INPUT, 4)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "datatype 'FP16', expected 'input' FP32 [-1, 3, 32, 32]"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 1),
         "shape [2, 1, 32, 32] does not match the model's input 'input' FP32"),
        (lambda r: r.inputs[0].shape.pop(), "does not match"),
        (lambda r: setattr(r.inputs[0], "name", "image"),
         "takes one input, 'input' FP32 [-1, 3, 32, 32]; the request has inputs ['image']"),
        (lambda r: r.inputs.add(name="input", datatype="FP32", shape=[2, 3, 32, 32]),
         "the request has inputs ['input', 'input']"),
        (lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-4]),
         "24572 bytes; shape [2, 3, 32, 32] of FP32 needs 24576"),
        (lambda r: r.raw_input_contents.append(b""), "2 entries for 1 input"),
        (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "both contents and raw_input_contents"),
    ],
)
def test_malformed_inputs_are_refused_naming_the_tensor_and_the_expected_spec(change, words):
    request = infer_request(np.zeros((2, 3, 32, 32), np.float32))
    change(request)
    with pytest.raises(InvalidArgument) as e:
        kserve.decode_input(request, FP32_INPUT, max_batch_size=4)
    assert words in str(e.value)


def test_batches_above_max_batch_size_and_empty_batches_are_refused():
    with pytest.raises(InvalidArgument, match="batch of 5 is more than max_batch_size 4"):
        kserve.decode_input(infer_request(np.zeros((5, 3, 32, 32), np.float32)), FP32_INPUT, max_batch_size=4)
    with pytest.raises(InvalidArgument, match="empty axis"):
        kserve.decode_input(infer_request(np.zeros((0, 3, 32, 32), np.float32)), FP32_INPUT, max_batch_size=4)


def test_typed_contents_errors_name_the_field():
    request = typed_request("FP32", [1, 3, 32, 32], fp32_contents=[0.0] * 10)
    with pytest.raises(InvalidArgument, match=r"fp32_contents has 10 values; shape \[1, 3, 32, 32\] needs 3072"):
        kserve.decode_input(request, FP32_INPUT, 4)
    request = typed_request("UINT8", [1, 32, 32, 3], uint_contents=[256] * 3072)
    with pytest.raises(InvalidArgument, match="UINT8 values must be 0..255, got 256"):
        kserve.decode_input(request, UINT8_INPUT, 4)
    fp16 = spec("input", pb.DATA_TYPE_FLOAT16, [-1, 3, 32, 32])
    request = typed_request("FP16", [1, 3, 32, 32], fp32_contents=[0.0] * 3072)
    with pytest.raises(InvalidArgument, match="FP16 data must be sent in raw_input_contents"):
        kserve.decode_input(request, fp16, 4)


# --- tensors out ----------------------------------------------------------------


def _results():
    return {"logits": np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], np.float32),
            "embedding": np.ones((2, 8), np.float32)}


def test_outputs_default_to_all_in_model_order_as_raw_little_endian_bytes():
    tensors, raw = kserve.encode_outputs(_results(), OUTPUTS, [])
    assert [(t.name, t.datatype, list(t.shape)) for t in tensors] == [
        ("logits", "FP32", [2, 3]), ("embedding", "FP32", [2, 8])
    ]
    assert not any(t.HasField("contents") for t in tensors)
    np.testing.assert_array_equal(np.frombuffer(raw[0], "<f4").reshape(2, 3), _results()["logits"])


def test_requested_outputs_come_in_requested_order_and_unknown_ones_are_refused():
    requested = [kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("embedding", "logits")]
    tensors, raw = kserve.encode_outputs(_results(), OUTPUTS, requested)
    assert [t.name for t in tensors] == ["embedding", "logits"] and len(raw[0]) == 2 * 8 * 4
    unknown = [kpb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")]
    with pytest.raises(InvalidArgument, match=r"'probabilities' is not one of this model's outputs \['logits', 'embed"):
        kserve.encode_outputs(_results(), OUTPUTS, unknown)
    only_logits = {"logits": _results()["logits"]}  # an export without the embedding
    with pytest.raises(InvalidArgument, match=r"\['logits'\]"):
        kserve.encode_outputs(only_logits, OUTPUTS, requested)


def test_classification_answers_top_k_as_triton_strings_with_labels():
    output = kpb.ModelInferRequest.InferRequestedOutputTensor(name="logits")
    output.parameters["classification"].int64_param = 2
    tensors, raw = kserve.encode_outputs(_results(), OUTPUTS, [output], CLASSES)
    assert (tensors[0].datatype, list(tensors[0].shape)) == ("BYTES", [2, 2])
    from tritonclient.utils import deserialize_bytes_tensor

    top = deserialize_bytes_tensor(raw[0]).reshape(2, 2)
    assert top.tolist() == [
        [b"2.000000:1:square", b"0.100000:0:circle"],
        [b"3.000000:0:circle", b"0.500000:2:triangle"],
    ]


def test_bytes_tensors_are_length_prefixed():
    assert kserve.encode_bytes([b"ab", b""]) == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)


# --- configuration and metadata ----------------------------------------------------------


def test_instance_groups_say_where_a_loaded_variant_runs_and_how_many_batches_at_once():
    cpu = kserve.instance_group("shapes", ("CPUExecutionProvider",), 2)
    assert (cpu.name, cpu.kind, cpu.count, list(cpu.gpus)) == ("shapes_0", kpb.ModelInstanceGroup.KIND_CPU, 2, [])
    for providers in (("TensorrtExecutionProvider", "CUDAExecutionProvider"), ("pytorch-cuda",)):
        gpu = kserve.instance_group("shapes@fp16", providers, 2)
        assert (gpu.kind, gpu.count, list(gpu.gpus)) == (kpb.ModelInstanceGroup.KIND_GPU, 2, [0])
    assert kserve.instance_group("shapes@pytorch", ("pytorch-cpu",), 1).kind == kpb.ModelInstanceGroup.KIND_CPU


def test_model_config_has_an_instance_group_once_the_variant_is_loaded():
    inference = FakeInference()
    s = servicer(inference)
    assert not run(s.ModelConfig(kpb.ModelConfigRequest(name="shapes"), None)).config.instance_group
    run(s.ModelReady(kpb.ModelReadyRequest(name="shapes"), None))  # loads v2's FP32 export
    (group,) = run(s.ModelConfig(kpb.ModelConfigRequest(name="shapes"), None)).config.instance_group
    assert (group.kind, group.count) == (kpb.ModelInstanceGroup.KIND_CPU, 2)
    assert not run(s.ModelConfig(kpb.ModelConfigRequest(name="shapes", version="1"), None)).config.instance_group


def test_model_config_follows_triton_conventions():
    config = kserve.model_config("shapes", artifact(1), max_batch_size=32, batch_delay_seconds=0.002)
    assert (config.platform, config.backend, config.max_batch_size) == ("onnxruntime_onnx", "onnxruntime", 32)
    assert [(i.name, i.data_type, i.format, list(i.dims)) for i in config.input] == [
        ("input", kpb.TYPE_FP32, kpb.ModelInput.FORMAT_NCHW, [3, 32, 32])  # no batch axis
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [3]), ("embedding", [8])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert not config.model_transaction_policy.decoupled

    int8 = kserve.model_config("shapes@int8", artifact(1, pb.PRECISION_INT8), max_batch_size=8)
    assert (int8.input[0].data_type, int8.input[0].format, list(int8.input[0].dims)) == (
        kpb.TYPE_UINT8, kpb.ModelInput.FORMAT_NHWC, [32, 32, 3])
    assert kserve.model_config("shapes@pytorch", artifact(1, pytorch=True), 8).platform == "pytorch_libtorch"


def test_model_metadata_keeps_the_batch_axis_as_minus_one():
    metadata = kserve.model_metadata("shapes", [1, 2], artifact(2))
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("shapes", ["1", "2"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 3, 32, 32])]


# --- statistics ------------------------------------------------------------------


def _stats(variant="onnx-fp32-float_nchw", version=1, images=5, last=1_700_000_000_000):
    return ModelStatistics(
        name="shapes", version=version, variant=V(variant), last_inference_ms=last, inference_count=images,
        execution_count=2, success=Duration(3, 3000), queue=Duration(3, 300), compute_input=Duration(3, 30),
        compute_infer=Duration(3, 2000), compute_output=Duration(3, 20),
        batch_stats={1: BatchStats(1, 10, 400, 5), 4: BatchStats(1, 20, 1600, 15)},
    )


def test_statistics_convert_to_triton_messages_named_by_protocol_name():
    stats = [_stats(), _stats("onnx-int8-uint8_nhwc", version=2, images=1), _stats("pytorch", version=2)]
    messages = kserve.statistics_messages(stats)
    assert [(m.name, m.version) for m in messages] == [("shapes", "1"), ("shapes@int8", "2"), ("shapes@pytorch", "2")]
    m = messages[0]
    assert (m.last_inference, m.inference_count, m.execution_count) == (1_700_000_000_000, 5, 2)
    assert (m.inference_stats.success.count, m.inference_stats.success.ns) == (3, 3000)
    assert m.inference_stats.fail.count == 0 and m.inference_stats.HasField("fail")
    batches = [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in m.batch_stats]
    assert batches == [(1, 1, 400), (4, 1, 1600)]
    assert [(m.name, m.version) for m in kserve.statistics_messages(stats, "shapes@int8")] == [("shapes@int8", "2")]
    assert kserve.statistics_messages(stats, "shapes", 2) == []


def test_statistics_of_two_fp32_input_formats_are_summed_under_one_name():
    both = [_stats(last=5), _stats("onnx-fp32-uint8_nhwc", images=7, last=9)]
    (m,) = kserve.statistics_messages(both)
    assert (m.name, m.inference_count, m.execution_count, m.last_inference) == ("shapes", 12, 4, 9)
    assert m.inference_stats.success.ns == 6000
    batches = [(b.batch_size, b.compute_input.count, b.compute_input.ns) for b in m.batch_stats]
    assert batches == [(1, 2, 20), (4, 2, 40)]


def test_statistics_of_the_nhwc_name_count_the_uint8_export_alone():
    both = [_stats(images=5), _stats("onnx-fp32-uint8_nhwc", images=7), _stats("onnx-int8-uint8_nhwc", images=2)]
    (nhwc,) = kserve.statistics_messages(both, "shapes@nhwc")
    assert (nhwc.name, nhwc.inference_count) == ("shapes@nhwc", 7)
    (plain,) = kserve.statistics_messages(both, "shapes")
    assert plain.inference_count == 12
    (int8,) = kserve.statistics_messages(both, "shapes@int8-nhwc")
    assert (int8.name, int8.inference_count) == ("shapes@int8-nhwc", 2)
    assert kserve.statistics_messages(both, "shapes@fp16-nhwc") == []


def test_statistics_recorded_by_the_batcher_convert_per_request_and_per_batch():
    stats = ModelStatistics("shapes", 1, V("onnx-fp16-float_nchw"))
    stats.record_batch(images=4, queue_ns=[100, 50], total_ns=[900, 850], input_ns=10, infer_ns=700, output_ns=20,
                       end_unix_ms=1_700_000_000_123)
    stats.record_failure(400)
    (m,) = kserve.statistics_messages([stats.snapshot()])
    assert (m.name, m.version, m.inference_count, m.execution_count) == ("shapes@fp16", "1", 4, 1)
    s = m.inference_stats
    assert (s.success.count, s.success.ns, s.fail.count, s.queue.ns) == (2, 1750, 1, 150)
    assert (s.compute_infer.count, s.compute_infer.ns) == (2, 1400)  # each request carries its batch's time
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in m.batch_stats] == [(4, 1, 700)]


# --- wire compatibility with tritonclient ---------------------------------------------


def test_tritonclient_decodes_what_we_encode():
    tc = tritonclient_grpc()
    service_pb2 = tc.service_pb2
    config = kpb.ModelConfigResponse(config=kserve.model_config("shapes", artifact(1), 32, 0.001))
    theirs = service_pb2.ModelConfigResponse.FromString(config.SerializeToString())
    assert theirs.config.input[0].data_type == tc.model_config_pb2.TYPE_FP32
    assert list(theirs.config.input[0].dims) == [3, 32, 32]
    assert theirs.config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert theirs.config.backend == "onnxruntime" and theirs.config.max_batch_size == 32

    stats = kpb.ModelStatisticsResponse(model_stats=kserve.statistics_messages([_stats()]))
    theirs = service_pb2.ModelStatisticsResponse.FromString(stats.SerializeToString())
    assert theirs.model_stats[0].inference_stats.compute_infer.ns == 2000
    assert theirs.model_stats[0].batch_stats[1].batch_size == 4

    x = np.ones((1, 3, 32, 32), np.float32)
    request = service_pb2.ModelInferRequest(model_name="shapes", id="7")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(x.tobytes())
    ours = kpb.ModelInferRequest.FromString(request.SerializeToString())
    np.testing.assert_array_equal(kserve.decode_input(ours, FP32_INPUT, 4), x)


def test_our_messages_have_tritons_field_numbers():
    service_pb2 = tritonclient_grpc().service_pb2
    theirs = service_pb2.DESCRIPTOR.pool

    def check(message):
        other = theirs.FindMessageTypeByName(message.full_name)
        for field in message.fields:
            twin = other.fields_by_number[field.number]
            assert (twin.name, twin.type) == (field.name, field.type), f"{message.full_name}.{field.name}"
        for nested in message.nested_types:
            check(nested)

    for message in kpb.DESCRIPTOR.message_types_by_name.values():
        check(message)
    ours_enum = kpb.DESCRIPTOR.enum_types_by_name["DataType"]
    assert [(v.name, v.number) for v in ours_enum.values] == [
        (v.name, v.number) for v in theirs.FindEnumTypeByName("inference.DataType").values
    ]
    ours_rpcs = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    their_rpcs = theirs.FindServiceByName("inference.GRPCInferenceService").methods_by_name
    for name, method in ours_rpcs.items():
        assert method.input_type.full_name == their_rpcs[name].input_type.full_name
        assert method.output_type.full_name == their_rpcs[name].output_type.full_name


# --- the servicer over fakes -----------------------------------------------------------


def test_health_and_server_metadata():
    s = servicer(ready=False)
    assert run(s.ServerLive(kpb.ServerLiveRequest(), None)).live
    assert not run(s.ServerReady(kpb.ServerReadyRequest(), None)).ready
    metadata = run(s.ServerMetadata(kpb.ServerMetadataRequest(), None))
    assert (metadata.name, metadata.version) == ("tlserve", "9.9")
    assert {"model_configuration", "statistics"} <= set(metadata.extensions)


def test_model_ready_loads_a_model_and_is_false_for_missing_ones():
    inference = FakeInference()
    s = servicer(inference)
    assert run(s.ModelReady(kpb.ModelReadyRequest(name="shapes@int8"), None)).ready
    assert inference.loaded == {("shapes", 2, V("onnx-int8-uint8_nhwc"))}
    assert not run(s.ModelReady(kpb.ModelReadyRequest(name="shapes@fp16"), None)).ready  # not exported
    assert not run(s.ModelReady(kpb.ModelReadyRequest(name="shapes@int8", version="1"), None)).ready
    assert not run(s.ModelReady(kpb.ModelReadyRequest(name="nothing"), None)).ready
    with pytest.raises(InvalidArgument, match="version"):
        run(s.ModelReady(kpb.ModelReadyRequest(name="shapes", version="v1"), None))


def test_model_metadata_lists_the_versions_that_have_the_variant():
    s = servicer()
    assert list(run(s.ModelMetadata(kpb.ModelMetadataRequest(name="shapes"), None)).versions) == ["1", "2"]
    int8 = run(s.ModelMetadata(kpb.ModelMetadataRequest(name="shapes@int8"), None))
    assert list(int8.versions) == ["2"] and int8.inputs[0].datatype == "UINT8"
    with pytest.raises(FailedPrecondition):
        run(s.ModelConfig(kpb.ModelConfigRequest(name="shapes@fp16"), None))
    with pytest.raises(NotFound):
        run(s.ModelConfig(kpb.ModelConfigRequest(name="shapes", version="7"), None))


def test_model_infer_calls_the_domain_and_answers_raw_outputs():
    inference = FakeInference()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    request = infer_request(x, id="req-1")
    request.parameters["binary_data_output"].bool_param = True  # accepted, as from tritonclient
    response = run(servicer(inference).ModelInfer(request, None))
    ((name, version, variant, inputs, deadline),) = inference.calls
    assert (name, version, variant, deadline) == ("shapes", 2, V("onnx-fp32-float_nchw"), None)
    np.testing.assert_array_equal(inputs, x)
    assert (response.model_name, response.model_version, response.id) == ("shapes", "2", "req-1")
    assert [o.name for o in response.outputs] == ["logits", "embedding"]
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 3)
    np.testing.assert_array_equal(logits, x.reshape(2, -1)[:, :3])


def test_nhwc_names_serve_the_uint8_export_of_a_model_exported_both_ways():
    inference = FakeInference()
    s = servicer(inference, FakeModels(
        shapes_model(1, artifact(1)),
        shapes_model(2, artifact(2), artifact(2, nhwc=True), artifact(2, pb.PRECISION_INT8, nhwc=False)),
    ))
    plain = run(s.ModelMetadata(kpb.ModelMetadataRequest(name="shapes"), None))
    assert (list(plain.versions), plain.inputs[0].datatype, list(plain.inputs[0].shape)) == (
        ["1", "2"], "FP32", [-1, 3, 32, 32])
    nhwc = run(s.ModelMetadata(kpb.ModelMetadataRequest(name="shapes@nhwc"), None))
    assert (list(nhwc.versions), nhwc.inputs[0].datatype, list(nhwc.inputs[0].shape)) == (
        ["2"], "UINT8", [-1, 32, 32, 3])
    pixels = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    request = kpb.ModelInferRequest(model_name="shapes@nhwc")
    request.inputs.add(name="input", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    response = run(s.ModelInfer(request, None))
    ((name, version, variant, inputs, _),) = inference.calls
    assert (name, version, variant) == ("shapes", 2, V("onnx-fp32-uint8_nhwc"))
    np.testing.assert_array_equal(inputs, pixels)
    assert (response.model_name, response.model_version) == ("shapes@nhwc", "2")
    assert run(s.ModelReady(kpb.ModelReadyRequest(name="shapes@nhwc"), None)).ready
    assert not run(s.ModelReady(kpb.ModelReadyRequest(name="shapes@nhwc", version="1"), None)).ready
    with pytest.raises(FailedPrecondition, match="uint8_nhwc"):  # INT8 exported as float NCHW only
        run(s.ModelConfig(kpb.ModelConfigRequest(name="shapes@int8-nhwc"), None))
    with pytest.raises(InvalidArgument, match="UINT8"):  # FP32 data for the uint8 export: the spec says why
        run(s.ModelInfer(infer_request(np.zeros((1, 3, 32, 32), np.float32), model="shapes@nhwc"), None))


def test_model_infer_timeout_parameter_becomes_a_deadline():
    inference = FakeInference()
    request = infer_request(np.zeros((1, 3, 32, 32), np.float32), model="shapes", model_version="1")
    request.parameters["timeout"].int64_param = 5_000_000  # microseconds
    run(servicer(inference).ModelInfer(request, None))
    deadline = inference.calls[0][4]
    assert deadline is not None and 0 < deadline - time.monotonic() <= 5


def test_model_stream_infer_answers_in_order_and_goes_on_after_an_error():
    async def requests():
        yield infer_request(np.zeros((1, 3, 32, 32), np.float32), id="a")
        yield infer_request(np.zeros((1, 3, 32, 32), np.float32), model="missing", id="b")
        yield infer_request(np.zeros((1, 3, 16, 16), np.float32), id="c")
        yield infer_request(np.ones((2, 3, 32, 32), np.float32), id="d")

    class Context:
        def time_remaining(self):
            return None

    async def collect():
        return [r async for r in servicer().ModelStreamInfer(requests(), Context())]

    replies = run(collect())
    assert [r.infer_response.id for r in replies] == ["a", "b", "c", "d"]
    assert [bool(r.error_message) for r in replies] == [False, True, True, False]
    assert "does not exist" in replies[1].error_message and "does not match" in replies[2].error_message
    assert list(replies[3].infer_response.outputs[0].shape) == [2, 3]


def test_model_statistics_answers_zeros_for_an_existing_model_not_used_yet():
    s = servicer(FakeInference(stats=[_stats("pytorch", version=2)]))
    everything = run(s.ModelStatistics(kpb.ModelStatisticsRequest(), None))
    assert [(m.name, m.version) for m in everything.model_stats] == [("shapes@pytorch", "2")]
    idle = run(s.ModelStatistics(kpb.ModelStatisticsRequest(name="shapes"), None))
    assert [(m.name, m.version, m.inference_count) for m in idle.model_stats] == [("shapes", "2", 0)]
    with pytest.raises(NotFound):
        run(s.ModelStatistics(kpb.ModelStatisticsRequest(name="missing"), None))
