"""The KServe v2 / Open Inference Protocol servicer (`inference.GRPCInferenceService`).

Served on tlserve's own port next to tlserve.v1.TLServe, so that tritonclient,
perf_analyzer and KServe call tlserve unchanged. Like the TLServe servicer it is
thin: each RPC converts protocol messages to numpy and domain names, makes one
call into the inference service or the model store, and converts back; domain
errors propagate and the server's `ErrorInterceptor` turns them into status codes.

    kserve.add_to_server(KServeServicer(inference, models, server_name="tlserve",
                         server_version=v, is_ready=lambda: ..., max_batch_size=32), server)

Model names (`parse_model`): the protocol's NAME is the FP32 ONNX export of tlserve
model NAME; NAME@fp16 and NAME@int8 pick other ONNX precisions, NAME@pytorch the
PyTorch checkpoint (tlserve names cannot hold '@'). These take normalised float NCHW
tensors when that export exists, else uint8 NHWC pixels. NAME@nhwc, NAME@fp16-nhwc
and NAME@int8-nhwc name the uint8 NHWC exports themselves, so that a client can send
pixels (a quarter of FP32's bytes) to a model exported both ways. A version is an
integer string, "" the latest.

ModelReady loads the model (and warms it up) when it is not loaded yet, as Triton
would have at start; a model that does not exist or has no such export is not
ready (ready=false, as Triton answers for a model it does not hold).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tlserve.client.inference import grpc_service_pb2 as kpb
from tlserve.client.inference import grpc_service_pb2_grpc
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.api.streams import call_deadline, ordered_replies
from tlserve.service.errors import FailedPrecondition, InvalidArgument, NotFound, TLServeError
from tlserve.service.inference.sessions import runs_on_cpu
from tlserve.service.store import paging
from tlserve.service.store.models import ModelStore
from tlserve.service.variant import Variant

if TYPE_CHECKING:
    from tlserve.service.inference.predictor import InferenceService

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# What ServerMetadata announces: the Triton extensions served here.
EXTENSIONS = ("classification", "model_configuration", "statistics")

# Suffix after '@' → (runtime, precision, layout) handed to InferenceService.choose_variant
# (layout None: the float NCHW export, else the uint8 NHWC one).
SUFFIXES: dict[str, tuple[int, int, str | None]] = {
    "": (pb.RUNTIME_ONNX, pb.PRECISION_FP32, None),
    "fp16": (pb.RUNTIME_ONNX, pb.PRECISION_FP16, None),
    "int8": (pb.RUNTIME_ONNX, pb.PRECISION_INT8, None),
    "pytorch": (pb.RUNTIME_PYTORCH, pb.PRECISION_FP32, None),
    "nhwc": (pb.RUNTIME_ONNX, pb.PRECISION_FP32, "uint8_nhwc"),
    "fp16-nhwc": (pb.RUNTIME_ONNX, pb.PRECISION_FP16, "uint8_nhwc"),
    "int8-nhwc": (pb.RUNTIME_ONNX, pb.PRECISION_INT8, "uint8_nhwc"),
}

# Requests computed at once per ModelStreamInfer stream; replies still go out in order.
STREAM_WINDOW = 32

LOGITS = "logits"


# --- names and versions -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSelector:
    """A protocol model name and version, read as tlserve's."""

    name: str
    version: int  # 0: the latest (or, for statistics, every version)
    runtime: int
    precision: int
    layout: str | None = None  # None: float NCHW, else uint8 NHWC; "uint8_nhwc": only that


def parse_version(version: str, field: str = "model_version") -> int:
    """The version a string names: "" → 0 (the latest), "3" → 3; anything else is InvalidArgument."""
    if version == "":
        return 0
    if not version.isascii() or not version.isdigit() or int(version) < 1:
        raise InvalidArgument(f"{field} must be a model version (1, 2, ...) or empty for the latest, got {version!r}")
    return int(version)


# The request fields that carry the model: ModelInferRequest's, and every other request's.
INFER_FIELDS = ("model_name", "model_version")
FIELDS = ("name", "version")


def parse_model(name: str, version: str = "", fields: tuple[str, str] = INFER_FIELDS) -> ModelSelector:
    """NAME[@SUFFIX] (a key of SUFFIXES) and a version string → what tlserve serves; errors name `fields`."""
    field, version_field = fields
    base, at, suffix = name.partition("@")
    if not base:
        raise InvalidArgument(
            f"{field} is required: a tlserve model name, optionally with @fp16, @int8, @pytorch or @nhwc"
        )
    if at and (not suffix or suffix not in SUFFIXES):
        valid = ", ".join(f"@{s}" for s in SUFFIXES if s)
        raise InvalidArgument(
            f"{field} {name!r}: unknown variant @{suffix}; use {base!r} for the FP32 ONNX export or one of {valid}"
        )
    runtime, precision, layout = SUFFIXES[suffix]
    return ModelSelector(base, parse_version(version, version_field), runtime, precision, layout)


def protocol_names(name: str, variant: Variant) -> tuple[str, ...]:
    """Every protocol name that can reach a variant: ("m", ONNX int8 uint8 NHWC) →
    ("m@int8", "m@int8-nhwc"); the first is the one statistics are listed under."""
    if variant.is_pytorch:
        return (f"{name}@pytorch",)
    precision = variant.precision
    plain = name if precision == "fp32" else f"{name}@{precision}"
    if not variant.uint8_nhwc:
        return (plain,)
    return plain, (f"{name}@nhwc" if precision == "fp32" else f"{name}@{precision}-nhwc")


# --- tensors ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Type:
    datatype: str  # the protocol's name
    numpy: np.dtype  # little-endian, as raw contents are
    triton: int  # model_config DataType
    contents: str | None  # InferTensorContents field; None: raw only


TYPES: dict[int, _Type] = {
    pb.DATA_TYPE_UINT8: _Type("UINT8", np.dtype("u1"), kpb.TYPE_UINT8, "uint_contents"),
    pb.DATA_TYPE_FLOAT16: _Type("FP16", np.dtype("<f2"), kpb.TYPE_FP16, None),
    pb.DATA_TYPE_FLOAT32: _Type("FP32", np.dtype("<f4"), kpb.TYPE_FP32, "fp32_contents"),
    pb.DATA_TYPE_INT64: _Type("INT64", np.dtype("<i8"), kpb.TYPE_INT64, "int64_contents"),
}


def _type(spec: pb.TensorSpec) -> _Type:
    try:
        return TYPES[spec.dtype]
    except KeyError:
        raise FailedPrecondition(
            f"tensor {spec.name!r} has element type {pb.DataType.Name(spec.dtype)}, which the KServe protocol "
            "service does not serve"
        ) from None


def describe(spec: pb.TensorSpec) -> str:
    """'"input" FP32 [-1, 3, 32, 32]' (-1: any size)."""
    return f"{spec.name!r} {_type(spec).datatype} [{', '.join(str(d) for d in spec.shape)}]"


def check_shape(name: str, shape: Sequence[int], spec: pb.TensorSpec, max_batch_size: int) -> None:
    if len(shape) != len(spec.shape) or any(s != d and d != -1 for s, d in zip(shape, spec.shape)):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} does not match the model's input {describe(spec)}")
    if any(s < 1 for s in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has an empty axis; send at least one image")
    if shape and shape[0] > max_batch_size:
        raise InvalidArgument(
            f"input {name!r}: a batch of {shape[0]} is more than max_batch_size {max_batch_size} (see ModelConfig);"
            " split the request"
        )


def decode_input(
    request: kpb.ModelInferRequest, spec: pb.TensorSpec, max_batch_size: int
) -> np.ndarray:
    """The model's one input from `request` (raw or typed contents), checked against `spec`.

    Raw contents come back as a read-only view of the request's bytes (no copy)."""
    names = [t.name for t in request.inputs]
    if names != [spec.name]:
        raise InvalidArgument(f"the model takes one input, {describe(spec)}; the request has inputs {names}")
    tensor = request.inputs[0]
    kind = _type(spec)
    if tensor.datatype != kind.datatype:
        raise InvalidArgument(f"input {spec.name!r}: datatype {tensor.datatype!r}, expected {describe(spec)}")
    shape = list(tensor.shape)
    check_shape(spec.name, shape, spec, max_batch_size)
    count = math.prod(shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input; send one per input"
            )
        if tensor.HasField("contents"):
            raise InvalidArgument(f"input {spec.name!r} has both contents and raw_input_contents; send one of them")
        raw = request.raw_input_contents[0]
        if len(raw) != count * kind.numpy.itemsize:
            raise InvalidArgument(
                f"input {spec.name!r}: raw_input_contents has {len(raw)} bytes; shape {shape} of {kind.datatype}"
                f" needs {count * kind.numpy.itemsize}"
            )
        return np.frombuffer(raw, dtype=kind.numpy).reshape(shape).astype(kind.numpy.newbyteorder("="), copy=False)
    if kind.contents is None:
        raise InvalidArgument(f"input {spec.name!r}: {kind.datatype} data must be sent in raw_input_contents")
    values = getattr(tensor.contents, kind.contents)
    if len(values) != count:
        raise InvalidArgument(
            f"input {spec.name!r}: contents.{kind.contents} has {len(values)} values; shape {shape} needs {count}"
        )
    if kind.datatype == "UINT8":
        wide = np.fromiter(values, dtype=np.uint32, count=count)
        if count and wide.max() > 255:
            raise InvalidArgument(f"input {spec.name!r}: UINT8 values must be 0..255, got {int(wide.max())}")
        return wide.astype(np.uint8).reshape(shape)
    return np.fromiter(values, dtype=kind.numpy.newbyteorder("="), count=count).reshape(shape)


def _int_parameter(parameter: kpb.InferParameter, what: str) -> int:
    choice = parameter.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"{what} must be an integer parameter, got {choice or 'no value'}")
    return getattr(parameter, choice)


def encode_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES tensor contents as raw bytes: each element as a little-endian uint32 length, then the bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def classify(values: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification output: the top k of each row as b"value:index[:label]", (N, k)."""
    k = min(k, values.shape[1])
    top = np.argsort(-values, axis=1, kind="stable")[:, :k]
    out = np.empty(top.shape, dtype=object)
    for row, indices in enumerate(top):
        for j, i in enumerate(indices):
            text = f"{values[row, i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) else "")
            out[row, j] = text.encode()
    return out


def encode_outputs(
    results: Mapping[str, np.ndarray],
    specs: Sequence[pb.TensorSpec],
    requested: Sequence[kpb.ModelInferRequest.InferRequestedOutputTensor],
    class_names: Sequence[str] = (),
) -> tuple[list[kpb.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Output tensors and their raw contents, in requested order (none requested: every output)."""
    by_name = {s.name: s for s in specs if s.name in results}
    wanted = list(requested) or [kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in by_name]
    tensors, raw = [], []
    for output in wanted:
        if output.name not in by_name:
            raise InvalidArgument(
                f"requested output {output.name!r} is not one of this model's outputs {list(by_name)}"
            )
        value = results[output.name]
        if "classification" in output.parameters:
            k = _int_parameter(output.parameters["classification"], f"output {output.name!r} classification")
            if k < 1 or value.ndim != 2:
                raise InvalidArgument(f"output {output.name!r}: classification needs k >= 1 on a (batch, C) output")
            labels = class_names if output.name == LOGITS else ()
            top = classify(value, k, labels)
            tensors.append(
                kpb.ModelInferResponse.InferOutputTensor(name=output.name, datatype="BYTES", shape=top.shape)
            )
            raw.append(encode_bytes(top.flat))
            continue
        kind = _type(by_name[output.name])
        tensors.append(
            kpb.ModelInferResponse.InferOutputTensor(name=output.name, datatype=kind.datatype, shape=value.shape)
        )
        raw.append(np.ascontiguousarray(value, dtype=kind.numpy).tobytes())
    return tensors, raw


# --- metadata and configuration --------------------------------------------------


def find_artifact(model: pb.Model, variant: Variant) -> pb.ModelArtifact:
    for artifact in model.artifacts:
        if Variant.of_artifact(artifact) == variant:
            return artifact
    raise FailedPrecondition(f"model {model.name} version {model.version} has no {variant} artifact")


def _platform(artifact: pb.ModelArtifact) -> tuple[str, str]:
    if artifact.format == pb.ARTIFACT_FORMAT_PYTORCH:
        return "pytorch_libtorch", "pytorch"
    return "onnxruntime_onnx", "onnxruntime"


def model_metadata(name: str, versions: Sequence[int], artifact: pb.ModelArtifact) -> kpb.ModelMetadataResponse:
    def tensor(spec: pb.TensorSpec) -> kpb.ModelMetadataResponse.TensorMetadata:
        return kpb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=_type(spec).datatype, shape=spec.shape)

    return kpb.ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in versions],
        platform=_platform(artifact)[0],
        inputs=[tensor(s) for s in artifact.inputs],
        outputs=[tensor(s) for s in artifact.outputs],
    )


def instance_group(name: str, providers: Sequence[str], count: int) -> kpb.ModelInstanceGroup:
    """A loaded variant as Triton's instance group: `count` batches at once (CPU lanes,
    or the batches a GPU pipelines) on the device its first provider runs on."""
    if runs_on_cpu(providers):
        return kpb.ModelInstanceGroup(name=f"{name}_0", kind=kpb.ModelInstanceGroup.KIND_CPU, count=count)
    # sessions.provider_options: device 0
    return kpb.ModelInstanceGroup(name=f"{name}_0", kind=kpb.ModelInstanceGroup.KIND_GPU, count=count, gpus=[0])


def model_config(
    name: str, artifact: pb.ModelArtifact, max_batch_size: int, batch_delay_seconds: float = 0.0,
    instances: kpb.ModelInstanceGroup | None = None,
) -> kpb.ModelConfig:
    """Triton's view of one variant; dims leave out the batch axis (Triton's convention when
    max_batch_size > 0); `instances`, where the variant is loaded (where it would run is
    known only then)."""
    platform, backend = _platform(artifact)
    nhwc = artifact.input_format == pb.INPUT_FORMAT_UINT8_NHWC
    input_format = kpb.ModelInput.FORMAT_NHWC if nhwc else kpb.ModelInput.FORMAT_NCHW
    return kpb.ModelConfig(
        name=name,
        platform=platform,
        backend=backend,
        version_policy=kpb.ModelVersionPolicy(all=kpb.ModelVersionPolicy.All()),
        max_batch_size=max_batch_size,
        input=[
            kpb.ModelInput(name=s.name, data_type=_type(s).triton, format=input_format, dims=s.shape[1:])
            for s in artifact.inputs
        ],
        output=[kpb.ModelOutput(name=s.name, data_type=_type(s).triton, dims=s.shape[1:]) for s in artifact.outputs],
        dynamic_batching=kpb.ModelDynamicBatching(
            max_queue_delay_microseconds=round(batch_delay_seconds * 1e6), preserve_ordering=True
        ),
        model_transaction_policy=kpb.ModelTransactionPolicy(decoupled=False),
        instance_group=[instances] if instances is not None else [],
    )


# --- statistics ---------------------------------------------------------------


def _duration(count: int, ns: int) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=count, ns=ns)


def _add(total: kpb.StatisticDuration, count: int, ns: int) -> None:
    total.count += count
    total.ns += ns


def statistics_messages(stats: Iterable[Any], name: str = "", version: int = 0) -> list[kpb.ModelStatistics]:
    """The inference service's per-variant statistics as Triton's messages, one per protocol
    (name, version); `name`/`version` filter ("" / 0: all). Variants that share a protocol
    name (the FP32 export in two input formats, under NAME) are summed; NAME@nhwc counts
    the uint8 NHWC export alone."""
    merged: dict[tuple[str, int], kpb.ModelStatistics] = {}
    batches: dict[tuple[str, int], dict[int, list[int]]] = {}
    for s in stats:
        names = protocol_names(s.name, s.variant)
        if name and name not in names or version and s.version != version:
            continue
        key = (name or names[0], s.version)
        m = merged.get(key)
        if m is None:
            m = merged[key] = kpb.ModelStatistics(name=key[0], version=str(key[1]))
            for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                getattr(m.inference_stats, field).SetInParent()
        m.last_inference = max(m.last_inference, int(s.last_inference_ms))
        m.inference_count += s.inference_count
        m.execution_count += s.execution_count
        for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            d = getattr(s, field)
            _add(getattr(m.inference_stats, field), d.count, d.ns)
        sizes = batches.setdefault(key, {})
        for size, (count, input_ns, infer_ns, output_ns) in s.batch_stats.items():
            total = sizes.setdefault(size, [0, 0, 0, 0])
            for i, v in enumerate((count, input_ns, infer_ns, output_ns)):
                total[i] += v
    for key, m in merged.items():
        for size, (count, input_ns, infer_ns, output_ns) in sorted(batches[key].items()):
            m.batch_stats.append(
                kpb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=_duration(count, input_ns),
                    compute_infer=_duration(count, infer_ns),
                    compute_output=_duration(count, output_ns),
                )
            )
    return [merged[k] for k in sorted(merged)]


def empty_statistics(name: str, version: int) -> kpb.ModelStatistics:
    """A model that exists but has not inferred yet: zeros, as Triton reports a loaded, idle model."""
    m = kpb.ModelStatistics(name=name, version=str(version))
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        getattr(m.inference_stats, field).SetInParent()
    return m


# --- the servicer ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved model variant: what the inference service is called with."""

    model: pb.Model
    variant: Variant
    artifact: pb.ModelArtifact

    @property
    def key(self) -> tuple[str, int, Variant]:
        return self.model.name, self.model.version, self.variant

    @property
    def class_names(self) -> Sequence[str]:
        return self.artifact.class_names or self.model.class_names


def request_deadline(request: kpb.ModelInferRequest, deadline: float | None) -> float | None:
    """The call's deadline, shortened by the request's "timeout" parameter (microseconds; 0: none)."""
    if "timeout" not in request.parameters:
        return deadline
    timeout_us = _int_parameter(request.parameters["timeout"], "parameter 'timeout' (microseconds)")
    if timeout_us <= 0:
        return deadline
    own = time.monotonic() + timeout_us / 1e6
    return own if deadline is None else min(deadline, own)


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        inference: InferenceService,
        models: ModelStore,
        *,
        server_name: str,
        server_version: str,
        is_ready: Callable[[], bool],
        max_batch_size: int,
        batch_delay_seconds: float = 0.0,
    ) -> None:
        self._inference = inference
        self._models = models
        self._server_name = server_name
        self._server_version = server_version
        self._is_ready = is_ready
        self._max_batch_size = max_batch_size
        self._batch_delay_seconds = batch_delay_seconds

    async def _resolve(self, selector: ModelSelector) -> Target:
        """NotFound for an unknown model or version; FailedPrecondition for a variant not exported."""
        # As Predict resolves: from the service's cache of records, no store query per call.
        model, variant = await self._inference.target(
            selector.name, selector.version, selector.runtime, selector.precision, selector.layout
        )
        return Target(model, variant, find_artifact(model, variant))

    # --- health and metadata ------------------------------------------------

    async def ServerLive(self, request: kpb.ServerLiveRequest, context) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=bool(self._is_ready()))

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest, context) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(
            name=self._server_name, version=self._server_version, extensions=EXTENSIONS
        )

    async def ModelReady(self, request: kpb.ModelReadyRequest, context) -> kpb.ModelReadyResponse:
        """Loads and warms the model if needed (our models load lazily; Triton's are loaded
        at start, so "ready" means "can serve now"). Unknown or not exported: false."""
        selector = parse_model(request.name, request.version, FIELDS)
        try:
            target = await self._resolve(selector)
            if not self._inference.is_ready(*target.key):
                await self._inference.ensure_loaded(*target.key)
        except (NotFound, FailedPrecondition):
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context) -> kpb.ModelMetadataResponse:
        selector = parse_model(request.name, request.version, FIELDS)
        target = await self._resolve(selector)
        versions = await asyncio.to_thread(self._versions_with, selector)
        return model_metadata(request.name, versions or [target.model.version], target.artifact)

    def _versions_with(self, selector: ModelSelector) -> list[int]:
        """Versions of the model that have the selected variant, oldest first."""
        models, _ = self._models.list(selector.name, False, paging.MAX_PAGE_SIZE, "")
        versions = []
        for model in models:
            try:
                self._inference.choose_variant(model, selector.runtime, selector.precision, selector.layout)
            except FailedPrecondition:
                continue
            versions.append(model.version)
        return sorted(versions)

    async def ModelConfig(self, request: kpb.ModelConfigRequest, context) -> kpb.ModelConfigResponse:
        target = await self._resolve(parse_model(request.name, request.version, FIELDS))
        loaded = self._inference.loaded_model(*target.key)
        instances = None if loaded is None else instance_group(
            request.name, loaded.providers, loaded.batcher.max_concurrent_batches
        )
        config = model_config(
            request.name, target.artifact, self._max_batch_size, self._batch_delay_seconds, instances
        )
        return kpb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: kpb.ModelStatisticsRequest, context) -> kpb.ModelStatisticsResponse:
        stats = self._inference.statistics()
        if not request.name:
            return kpb.ModelStatisticsResponse(model_stats=statistics_messages(stats))
        selector = parse_model(request.name, request.version, FIELDS)
        found = statistics_messages(stats, request.name, selector.version)
        if not found:  # not inferred yet: zeros, once we know the model exists
            target = await self._resolve(selector)
            found = [empty_statistics(request.name, target.model.version)]
        return kpb.ModelStatisticsResponse(model_stats=found)

    # --- inference --------------------------------------------------------------

    async def ModelInfer(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        return await self._infer(request, call_deadline(context))

    async def _infer(self, request: kpb.ModelInferRequest, deadline: float | None) -> kpb.ModelInferResponse:
        target = await self._resolve(parse_model(request.model_name, request.model_version))
        if len(target.artifact.inputs) != 1:
            raise FailedPrecondition(
                f"model {request.model_name!r} has {len(target.artifact.inputs)} inputs; the protocol service"
                " serves models with one"
            )
        inputs = decode_input(request, target.artifact.inputs[0], self._max_batch_size)  # (N, ...) per the spec
        results = await self._inference.infer(*target.key, inputs, deadline=request_deadline(request, deadline))
        outputs, raw = encode_outputs(results, target.artifact.outputs, request.outputs, target.class_names)
        return kpb.ModelInferResponse(
            model_name=request.model_name,
            model_version=str(target.model.version),
            id=request.id,
            outputs=outputs,
            raw_output_contents=raw,
        )

    async def ModelStreamInfer(self, request_iterator, context):
        """Replies in request order; each request is computed as soon as it arrives (up to
        STREAM_WINDOW at once). A failed request gets a reply with error_message set and the
        stream goes on, as Triton's does."""
        deadline = call_deadline(context)
        async for reply in ordered_replies(
            request_iterator, lambda request: self._infer_in_stream(request, deadline), STREAM_WINDOW,
        ):
            yield reply

    async def _infer_in_stream(self, request: kpb.ModelInferRequest, deadline: float | None):
        try:
            return kpb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
        except TLServeError as e:
            return kpb.ModelStreamInferResponse(
                error_message=str(e),
                infer_response=kpb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                ),
            )


def add_to_server(servicer: KServeServicer, server) -> None:
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
