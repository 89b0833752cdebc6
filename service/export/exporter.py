"""ExportModel and DownloadModel: the export domain over the stores.

`ExportService.export` turns a published model version into one ONNX variant
(precision × input layout, optionally with the embedding output), proves it
(checker, dynamic batch, parity with PyTorch on the dataset's validation images,
test accuracy against PyTorch's FP32 on the same test images), and only then
publishes the file atomically as `models/NAME/V/model-{precision}-{layout}.onnx`
and records it as an artifact of the version, replacing an earlier export of the
same variant. Exports run one at a time (a lock): each uses every core.
`download` streams any artifact: its metadata first, then the file in chunks,
from a file opened before the first message so a concurrent delete or re-export
cannot break a download already started.

    service = ExportService(settings, models, artifacts)
    artifact = service.export(pb.ExportModelRequest(model=pb.ModelRef(name="shapes"), precision=pb.PRECISION_INT8))
    for message in service.download(pb.DownloadModelRequest(model=artifact.model, precision=pb.PRECISION_INT8)):
        ...
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

import onnx

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones, metrics
from tlserve.service.clock import now
from tlserve.service.config import Settings
from tlserve.service.errors import FailedPrecondition, InvalidArgument, NotFound, TLServeError
from tlserve.service.export import onnx_export as ox
from tlserve.service.manifest import Manifest
from tlserve.service.store.artifacts import ArtifactStore
from tlserve.service.store.models import ModelStore, model_dir
from tlserve.service.variant import LAYOUT_OF, PRECISION_OF, Variant

log = logging.getLogger("tlserve.export")

# Parity images: 64 is enough to see a broken graph (any real bug moves every image)
# and costs well under a second even at 224 px.
PARITY_IMAGES = 64
# Calibration beyond a few hundred images no longer moves MinMax ranges; the bound keeps
# a request from turning an export into an hour of calibration.
MAX_CALIBRATION_IMAGES = 2048

DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4 << 10  # smaller chunks are all per-message overhead
MAX_CHUNK_BYTES = 4 << 20  # the gRPC default receive limit of most clients is 4 MiB per message
_MESSAGE_OVERHEAD_BYTES = 1 << 10

_PRECISIONS = PRECISION_OF
_LAYOUTS = LAYOUT_OF
_METHODS = {
    pb.CalibrationOptions.METHOD_MINMAX: "minmax",
    pb.CalibrationOptions.METHOD_ENTROPY: "entropy",
    pb.CalibrationOptions.METHOD_PERCENTILE: "percentile",
}
_DATA_TYPES = {
    onnx.TensorProto.UINT8: pb.DATA_TYPE_UINT8,
    onnx.TensorProto.FLOAT16: pb.DATA_TYPE_FLOAT16,
    onnx.TensorProto.FLOAT: pb.DATA_TYPE_FLOAT32,
    onnx.TensorProto.INT64: pb.DATA_TYPE_INT64,
}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """An ExportModelRequest validated, server defaults filled in."""

    precision: str  # "fp32", "fp16" or "int8"
    layout: str  # "float_nchw" or "uint8_nhwc"
    include_embedding: bool
    opset: int
    max_accuracy_drop_points: float | None
    calibration: ox.Calibration | None  # INT8 only

    @property
    def uint8_nhwc(self) -> bool:
        return self.layout == "uint8_nhwc"

    @property
    def variant(self) -> Variant:
        return Variant.onnx(self.precision, self.layout)

    @classmethod
    def from_request(cls, request: pb.ExportModelRequest) -> ExportOptions:
        if request.precision not in _PRECISIONS:
            raise InvalidArgument(f"precision {request.precision} is not a known Precision; use FP32, FP16 or INT8")
        if request.input_format not in _LAYOUTS:
            raise InvalidArgument(
                f"input_format {request.input_format} is not a known InputFormat; use FLOAT_NCHW or UINT8_NHWC"
            )
        opset = request.opset or ox.DEFAULT_OPSET
        if not ox.MIN_OPSET <= opset <= ox.MAX_OPSET:
            raise InvalidArgument(
                f"opset must be between {ox.MIN_OPSET} and {ox.MAX_OPSET} (0: the default, {ox.DEFAULT_OPSET}), "
                f"got {request.opset}"
            )
        drop = None
        if request.HasField("max_accuracy_drop_points"):
            drop = request.max_accuracy_drop_points
            if not (math.isfinite(drop) and 0 <= drop <= 100):
                raise InvalidArgument(
                    f"max_accuracy_drop_points must be between 0 and 100 percentage points, got {drop}"
                )
        precision = _PRECISIONS[request.precision]
        return cls(
            precision=precision,
            layout=_LAYOUTS[request.input_format],
            include_embedding=request.include_embedding,
            opset=opset,
            max_accuracy_drop_points=drop,
            calibration=_calibration(request.calibration, precision),
        )


def _calibration(options: pb.CalibrationOptions, precision: str) -> ox.Calibration | None:
    if precision != "int8":
        if options.ByteSize():
            raise InvalidArgument(
                f"calibration applies to INT8 exports only; clear it or set precision INT8 (precision is "
                f"{precision.upper()})"
            )
        return None
    if options.image_count < 0:
        raise InvalidArgument(
            f"calibration.image_count must be >= 0 (0: the server default, "
            f"{ox.DEFAULT_CALIBRATION.image_count}), got {options.image_count}"
        )
    if options.image_count > MAX_CALIBRATION_IMAGES:
        raise InvalidArgument(
            f"calibration.image_count must be at most {MAX_CALIBRATION_IMAGES}, got {options.image_count}"
        )
    if options.method not in (pb.CalibrationOptions.METHOD_UNSPECIFIED, *_METHODS):
        raise InvalidArgument(
            f"calibration.method {options.method} is not a known method; use MINMAX, ENTROPY or PERCENTILE"
        )
    default = ox.DEFAULT_CALIBRATION
    return ox.Calibration(
        method=_METHODS.get(options.method, default.method),
        per_channel=options.per_channel if options.HasField("per_channel") else default.per_channel,
        reduce_range=options.reduce_range if options.HasField("reduce_range") else default.reduce_range,
        image_count=options.image_count or default.image_count,
    )


class ExportService:
    def __init__(self, settings: Settings, models: ModelStore, artifacts: ArtifactStore, *,
                 export_metrics: metrics.ExportMetrics = metrics.EXPORTS) -> None:
        self._settings = settings
        self._metrics = export_metrics
        self._models = models
        self._artifacts = artifacts
        self._export_lock = threading.Lock()  # one export at a time: each uses every core
        # Held while a file and its row change together (publish) and while a download reads
        # the row and opens the file, so a download never pairs one export's metadata with
        # another's bytes. Held for milliseconds, unlike the export lock.
        self._publish_lock = threading.Lock()

    # -- ExportModel ------------------------------------------------------------------

    def export(self, request: pb.ExportModelRequest) -> pb.ModelArtifact:
        """Exports, proves and publishes one variant; returns the stored artifact."""
        options = ExportOptions.from_request(request)
        start = time.monotonic()
        outcome = "internal"
        try:
            name, version = self._models.resolve(request.model)
            with self._export_lock:
                artifact = self._export(name, version, options)
            outcome = "ok"
            return artifact
        except TLServeError as error:
            outcome = type(error).__name__
            outcome = "".join(f"_{c.lower()}" if c.isupper() else c for c in outcome).lstrip("_")
            raise
        finally:
            self._metrics.observe(options.precision, outcome, time.monotonic() - start)

    def _export(self, name: str, version: int, options: ExportOptions) -> pb.ModelArtifact:
        start = time.monotonic()
        model = self._models.get(name, version)
        what = f"{name}:{version} {options.precision} {options.layout}"
        manifest = self._manifest(model)
        preprocessing = backbones.Preprocessing.from_proto(model.preprocessing)
        pytorch_path = self._artifacts.path(self._models.artifact_path(name, version, Variant.PYTORCH))
        built = backbones.load_published(pytorch_path, model.backbone, len(model.class_names), preprocessing)

        parity_split, parity_samples = _first_nonempty(manifest, ("val", "test", "train"))
        parity_samples = _spread(parity_samples, PARITY_IMAGES)
        parity_images = self._load(parity_samples, preprocessing, manifest, parity_split)

        graph = ox.export_onnx(
            built.model, preprocessing, uint8_nhwc=options.uint8_nhwc,
            include_embedding=options.include_embedding, opset=options.opset,
        )
        if options.precision == "fp16":
            graph = ox.to_fp16(graph)
        elif options.precision == "int8":
            batches = self._calibration_batches(manifest, preprocessing, options)
            graph = ox.quantize_int8(graph, batches, options.calibration, work_dir=self._settings.scratch_dir)
        ox.set_metadata(graph, {
            "tlserve.model": {"name": name, "version": version, "backbone": model.backbone},
            "tlserve.class_names": list(model.class_names),
            "tlserve.preprocessing": dataclasses.asdict(preprocessing),
            "tlserve.precision": options.precision,
            "tlserve.input_format": options.layout,
        })
        ox.check_graph(graph)
        data = graph.SerializeToString()
        session = ox.ort_session(data)

        try:
            ox.check_dynamic_batch(session, parity_images.inputs(options.uint8_nhwc))
        except ox.DynamicBatchError as error:
            raise FailedPrecondition(
                f"the ONNX graph of {what} ({model.backbone}) does not take a dynamic batch: {error}; "
                "nothing was published"
            ) from error

        reference_logits, reference_embedding = ox.run_pytorch(built.model, parity_images.float_nchw)
        outputs = ox.run(session, parity_images.inputs(options.uint8_nhwc))
        parity = ox.compare(reference_logits, outputs[ox.LOGITS])
        threshold = ox.PARITY_THRESHOLDS[options.precision]
        failures = threshold.failures(parity)
        if options.include_embedding:
            # The embedding is held to the same relative limit; its argmax means nothing.
            embedding_threshold = dataclasses.replace(threshold, min_top1_agreement=0.0)
            embedding_parity = ox.compare(reference_embedding, outputs[ox.EMBEDDING])
            failures += [f"embedding: {f}" for f in embedding_threshold.failures(embedding_parity)]
        if failures:
            raise FailedPrecondition(
                f"the ONNX export of {what} does not match PyTorch on {parity.images_compared} {parity_split} "
                f"images: {'; '.join(failures)}; nothing was published"
                + (" (other calibration settings may do better)" if options.precision == "int8" else "")
            )

        accuracy_split, test_samples = _first_nonempty(manifest, ("test", "val"))
        accuracy, reference_accuracy = self._accuracy(session, built.model, test_samples, preprocessing, manifest,
                                                      accuracy_split, options.uint8_nhwc)
        delta_points = (accuracy - reference_accuracy) * 100
        limit = options.max_accuracy_drop_points
        if limit is not None and -delta_points > limit + 1e-9:
            hint = (
                "other calibration settings (method, per_channel, reduce_range, image_count) may lose less"
                if options.precision == "int8" else "a higher precision loses less"
            )
            raise FailedPrecondition(
                f"{what} loses {-delta_points:.2f} points of {accuracy_split} top-1 accuracy against FP32 "
                f"({accuracy:.4f} vs {reference_accuracy:.4f} on {len(test_samples)} images), more than "
                f"max_accuracy_drop_points {limit:g}; nothing was published; {hint}"
            )

        path = f"{model_dir(name, version)}/{options.variant.file_name}"
        artifact = pb.ModelArtifact(
            model=pb.ModelRef(name=name, version=version), format=pb.ARTIFACT_FORMAT_ONNX,
            precision=options.variant.precision_enum, input_format=options.variant.input_format,
            opset=options.opset, inputs=_tensor_specs(graph.graph.input), outputs=_tensor_specs(graph.graph.output),
            has_embedding=options.include_embedding,
            parity=pb.ParityReport(
                images_compared=parity.images_compared, max_abs_logit_diff=parity.max_abs_logit_diff,
                top1_agreement=parity.top1_agreement,
            ),
            test_top1_accuracy=accuracy, accuracy_delta_points=delta_points,
            class_names=model.class_names, preprocessing=model.preprocessing,
        )
        with self._publish_lock:
            info = self._artifacts.publish_bytes(data, path)
            artifact.size_bytes, artifact.sha256 = info.size_bytes, info.sha256
            artifact.create_time.CopyFrom(now())
            try:
                self._models.add_artifact(artifact, path)
            except sqlite3.IntegrityError:  # the version's row went (DeleteModel) while this export ran
                self._artifacts.delete(path)
                raise NotFound(f"model {name} version {version} was deleted while it was exported") from None
        log.info(
            "exported %s in %.1f s: %d bytes, parity max |diff| %.3g agreement %.3f on %d images, "
            "%s top-1 %.4f (%+.2f points vs FP32)", what, time.monotonic() - start, info.size_bytes,
            parity.max_abs_logit_diff, parity.top1_agreement, parity.images_compared, accuracy_split,
            accuracy, delta_points,
        )
        return self._stored(name, version, options.variant)

    def _manifest(self, model: pb.Model) -> Manifest:
        dataset = model.lineage.dataset_id
        path = self._settings.datasets_dir / dataset / "manifest.json"
        try:
            return Manifest.load(path)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"dataset {dataset!r} that model {model.name}:{model.version} was trained on no longer exists; "
                "an export is checked against PyTorch on that dataset's validation and test images, so it "
                "cannot be exported now: fine-tune again on a registered dataset and export the new version"
            ) from None

    def _load(self, samples, preprocessing: backbones.Preprocessing, manifest: Manifest, split: str) -> ox.Images:
        try:
            return ox.load_images(samples, preprocessing)
        except OSError as error:
            raise FailedPrecondition(
                f"an image of the {split} split of dataset {manifest.name} ({manifest.id}) cannot be read "
                f"({error}); the export needs them: restore the dataset's files"
            ) from error

    def _calibration_batches(self, manifest: Manifest, preprocessing: backbones.Preprocessing,
                             options: ExportOptions) -> list:
        split, samples = _first_nonempty(manifest, ("train", "val"))
        chosen = _spread(samples, options.calibration.image_count)
        return [
            lambda batch=chosen[i:i + ox.BATCH_SIZE]: self._load(batch, preprocessing, manifest, split).inputs(
                options.uint8_nhwc
            )
            for i in range(0, len(chosen), ox.BATCH_SIZE)
        ]

    def _accuracy(self, session, model, samples, preprocessing, manifest, split, uint8_nhwc) -> tuple[float, float]:
        """(top-1 of the ONNX graph, top-1 of PyTorch FP32) on the same images, read a
        batch at a time so a large test split never sits in memory at once."""
        correct = reference_correct = 0
        for start in range(0, len(samples), ox.BATCH_SIZE):
            images = self._load(samples[start:start + ox.BATCH_SIZE], preprocessing, manifest, split)
            logits = ox.run(session, images.inputs(uint8_nhwc))[ox.LOGITS]
            reference, _ = ox.run_pytorch(model, images.float_nchw)
            correct += int((logits.argmax(1) == images.labels).sum())
            reference_correct += int((reference.argmax(1) == images.labels).sum())
        n = max(1, len(samples))
        return correct / n, reference_correct / n

    def _stored(self, name: str, version: int, variant: Variant) -> pb.ModelArtifact:
        for artifact, _ in self._models.artifacts(name, version):
            if Variant.of_artifact(artifact) == variant:
                return artifact
        raise NotFound(f"model {name} version {version} was deleted while it was exported")

    # -- DownloadModel ----------------------------------------------------------------

    def download(self, request: pb.DownloadModelRequest) -> Iterator[pb.DownloadModelResponse]:
        """Checks the request and opens the file now (errors raise here, not mid-stream);
        returns the stream: the artifact, then chunks of the file."""
        chunk_bytes = request.chunk_size_bytes or DEFAULT_CHUNK_BYTES
        max_chunk = min(MAX_CHUNK_BYTES, self._settings.max_send_message_bytes - _MESSAGE_OVERHEAD_BYTES)
        if not MIN_CHUNK_BYTES <= chunk_bytes <= max_chunk:
            raise InvalidArgument(
                f"chunk_size_bytes must be between {MIN_CHUNK_BYTES} and {max_chunk} (0: {DEFAULT_CHUNK_BYTES}), "
                f"got {request.chunk_size_bytes}"
            )
        variant = _requested_variant(request)
        name, version = self._models.resolve(request.model)
        with self._publish_lock:
            found = [(a, p) for a, p in self._models.artifacts(name, version) if Variant.of_artifact(a) == variant]
            if not found:
                raise _missing_variant(name, version, variant)
            artifact, path = found[0]
            try:
                file = open(self._artifacts.path(path), "rb")  # noqa: SIM115 — closed by the stream
            except FileNotFoundError:
                raise NotFound(f"model {name} version {version} was deleted") from None
        return _stream(artifact, file, chunk_bytes)


def _stream(artifact: pb.ModelArtifact, file: BinaryIO, chunk_bytes: int) -> Iterator[pb.DownloadModelResponse]:
    with file:
        yield pb.DownloadModelResponse(artifact=artifact)
        while chunk := file.read(chunk_bytes):
            yield pb.DownloadModelResponse(chunk=chunk)


def _requested_variant(request: pb.DownloadModelRequest) -> Variant:
    if request.format not in (pb.ARTIFACT_FORMAT_UNSPECIFIED, pb.ARTIFACT_FORMAT_ONNX, pb.ARTIFACT_FORMAT_PYTORCH):
        raise InvalidArgument(f"format {request.format} is not a known ArtifactFormat; use ONNX or PYTORCH")
    if request.precision not in _PRECISIONS:
        raise InvalidArgument(f"precision {request.precision} is not a known Precision; use FP32, FP16 or INT8")
    if request.input_format not in _LAYOUTS:
        raise InvalidArgument(
            f"input_format {request.input_format} is not a known InputFormat; use FLOAT_NCHW or UINT8_NHWC"
        )
    if request.format == pb.ARTIFACT_FORMAT_PYTORCH:
        if _PRECISIONS[request.precision] != "fp32" or _LAYOUTS[request.input_format] != "float_nchw":
            raise InvalidArgument(
                "the PYTORCH artifact is FP32 with FLOAT_NCHW input only; leave precision and input_format unset, "
                "or ask for format ONNX"
            )
        return Variant.PYTORCH
    return Variant.onnx(_PRECISIONS[request.precision], _LAYOUTS[request.input_format])


def _missing_variant(name: str, version: int, variant: Variant) -> Exception:
    if variant.is_pytorch:
        return NotFound(f"model {name} version {version} has no PyTorch weights artifact")
    precision, layout = variant.precision, variant.layout
    flags = f" --precision {precision}" + (f" --input-format {layout}" if layout != "float_nchw" else "")
    return FailedPrecondition(
        f"model {name} version {version} has no ONNX {precision.upper()} {layout.upper()} export yet; run "
        f"ExportModel with precision {precision.upper()} and input_format {layout.upper()} first "
        f"(`tlserve export {name}:{version}{flags}`), then download it"
    )


def _first_nonempty(manifest: Manifest, splits: tuple[str, ...]) -> tuple[str, list]:
    """The first of `splits` that has images, and its samples."""
    for split in splits:
        if samples := manifest.samples(split):
            return split, samples
    raise FailedPrecondition(
        f"dataset {manifest.name} ({manifest.id}) has no images in its {' or '.join(splits)} split; the export "
        "needs them to check the ONNX graph against PyTorch"
    )


def _spread(samples: list, count: int) -> list:
    """Up to `count` samples, drawn with a fixed seed so that every class shows (manifests
    list a class's images together) and every export of a model uses the same ones."""
    if len(samples) <= count:
        return list(samples)
    return random.Random(0).sample(samples, count)


def _tensor_specs(values) -> list[pb.TensorSpec]:
    """The graph's inputs or outputs; a named (symbolic) axis, the batch, is -1."""
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        specs.append(pb.TensorSpec(name=value.name, dtype=_DATA_TYPES.get(tensor.elem_type, pb.DATA_TYPE_UNSPECIFIED),
                                   shape=shape))
    return specs
