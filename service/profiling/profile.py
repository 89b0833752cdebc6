"""ProfileModel: a model's variants measured on this server's hardware.

For each variant (PyTorch, ONNX fp32/fp16/int8) one child process loads it the
way the inference service does (same session classes, threads and providers),
warms it up, then measures:

- batch-1 latency: `iterations` timed calls on one real test image (p50/p95/p99);
- throughput at `batch_size`: images per second of the median timed batch;
- peak memory: the most resident memory the process held while loading and
  running the variant, above what it held before (the runtime library imported),
  with CPU lanes both sessions Predict holds; on a GPU, PyTorch's peak device
  memory instead;
- load time: opening the session and warming it up;
- test-split top-1 accuracy with this runtime when asked (`measure_accuracy`),
  else the figure stored at training (PyTorch) or export (ONNX) time.

Artifact size, parameter count and GFLOPs come from the store. Each variant
runs in a fresh process (spawned, one task per child) so that its memory is
measured alone and goes back to the OS when it ends, and a crash or an
out-of-memory kill there fails the profile, not the server. One profile runs at
a time: it uses every core, and two would measure each other. The server keeps
serving meanwhile; its traffic shares the cores, so profile a quiet server for
figures to compare.

The latest measurement of each variant is stored with the model
(`ModelStore.put_profile`), returned by GetModel as `Model.profile`, and
exported as gauges by the metrics collector.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
import time
from collections.abc import Callable

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import childproc
from tlserve.service.clock import now
from tlserve.service.config import Settings
from tlserve.service.errors import Cancelled, FailedPrecondition, InvalidArgument
from tlserve.service.inference.sessions import cpu_lanes
from tlserve.service.store.artifacts import ArtifactStore
from tlserve.service.store.models import ModelStore
from tlserve.service.variant import Variant

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
MAX_BATCH_SIZE = 256
# 50 batch-1 calls: p50 and p95 are well estimated; p99 is close to the slowest call.
DEFAULT_ITERATIONS = 50
MAX_ITERATIONS = 10_000
WARMUP_CALLS = 5
# Timed batches behind the throughput figure (their median is used).
THROUGHPUT_BATCHES = 5
ACCURACY_BATCH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class VariantTask:
    """What a child process needs to measure one variant: plain values, picklable."""

    variant: Variant
    path: str
    backbone: str
    class_count: int
    preprocessing: bytes  # tlserve.v1.Preprocessing
    batch_size: int
    iterations: int
    measure_accuracy: bool
    # (absolute path, label) of the test images (or validation, when there is no test split).
    samples: tuple[tuple[str, int], ...]
    threads: int
    lanes: int  # CPU lanes, as Predict loads the model (sessions.cpu_lanes)
    max_batch_size: int
    tensorrt_cache: str


class ProfileService:
    def __init__(
        self,
        settings: Settings,
        models: ModelStore,
        artifacts: ArtifactStore,
        choose_variant: Callable[[pb.Model, int, int], Variant],
    ) -> None:
        """`choose_variant(model, runtime, precision)` maps a requested variant to the
        artifact variant that serves it (the inference service's own rule), raising
        FailedPrecondition naming the export to run when there is none."""
        self._settings = settings
        self._models = models
        self._artifacts = artifacts
        self._choose_variant = choose_variant
        self._lock = threading.Lock()

    def profile(self, request: pb.ProfileModelRequest, cancelled: threading.Event | None = None) -> pb.ModelProfile:
        """Measures the requested variants one after the other; blocks (call it off the
        event loop). `cancelled` set stops it with Cancelled, the running measurement's
        process at once."""
        batch_size = request.batch_size or DEFAULT_BATCH_SIZE
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise InvalidArgument(f"batch_size must be within 1..{MAX_BATCH_SIZE} (0 means {DEFAULT_BATCH_SIZE}), "
                                  f"got {request.batch_size}")
        iterations = request.iterations or DEFAULT_ITERATIONS
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise InvalidArgument(f"iterations must be within 1..{MAX_ITERATIONS} (0 means {DEFAULT_ITERATIONS}), "
                                  f"got {request.iterations}")
        name, version = self._models.resolve(request.model)
        model = self._models.get(name, version)
        variants = self._variants(model, request.variants)
        samples = self._samples(model, request.measure_accuracy)
        artifacts = {Variant.of_artifact(a): a for a in model.artifacts}

        with self._lock:
            profiles = []
            for variant in variants:
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled(f"ProfileModel of {name}:{version} was cancelled")
                artifact = artifacts[variant]
                task = VariantTask(
                    variant=variant,
                    path=str(self._artifacts.path(self._models.artifact_path(name, version, variant))),
                    backbone=model.backbone, class_count=len(model.class_names),
                    preprocessing=model.preprocessing.SerializeToString(),
                    batch_size=batch_size, iterations=iterations, measure_accuracy=request.measure_accuracy,
                    samples=samples, threads=self._settings.inference_threads, lanes=cpu_lanes(self._settings),
                    max_batch_size=max(batch_size, 1), tensorrt_cache=str(self._settings.home / "cache" / "tensorrt"),
                )
                start = time.monotonic()
                measured = pb.VariantProfile.FromString(childproc.run_in_child(
                    measure_or_refuse, task, what=f"measuring {name}:{version} ({variant})", cancelled=cancelled,
                    memory_hint="profile a smaller batch_size",
                ))
                measured.variant.CopyFrom(variant.to_proto())
                measured.size_bytes = artifact.size_bytes
                measured.parameter_count = model.parameter_count
                measured.gflops = model.gflops
                if not measured.accuracy_measured:
                    measured.test_top1_accuracy = (
                        model.test_metrics.top1_accuracy if variant.is_pytorch else artifact.test_top1_accuracy
                    )
                measured.time.CopyFrom(now())
                self._models.put_profile(name, version, variant, measured)
                profiles.append(measured)
                log.info(
                    "profiled %s:%d %s in %.1f s: p50 %.2f ms, %.1f img/s at batch %d, peak %d bytes on %s",
                    name, version, variant, time.monotonic() - start, measured.latency_p50_seconds * 1e3,
                    measured.throughput_images_per_second, batch_size, measured.peak_memory_bytes, measured.device,
                )
        profile = pb.ModelProfile(model=pb.ModelRef(name=name, version=version), variants=profiles)
        profile.time.CopyFrom(now())
        return profile

    def _variants(self, model: pb.Model, requested) -> list[Variant]:
        """Artifact variants to measure, in request order without repeats. Empty asks for
        every variant the model has: PyTorch and each ONNX precision (the float NCHW
        graph where a precision has both layouts)."""
        if requested:
            chosen = [self._choose_variant(model, v.runtime, v.precision) for v in requested]
        else:
            have = {Variant.of_artifact(a) for a in model.artifacts}
            chosen = [Variant.PYTORCH] if Variant.PYTORCH in have else []
            for precision in (pb.PRECISION_FP32, pb.PRECISION_FP16, pb.PRECISION_INT8):
                try:
                    chosen.append(self._choose_variant(model, pb.RUNTIME_ONNX, precision))
                except FailedPrecondition:  # not exported at this precision
                    continue
        return list(dict.fromkeys(chosen))

    def _samples(self, model: pb.Model, measure_accuracy: bool) -> tuple[tuple[str, int], ...]:
        """The model's test images (validation where there is no test split): the inputs
        of the timed calls, and of the accuracy when asked. Without its dataset, timing
        still works on blank images; accuracy cannot be measured."""
        from tlserve.service.manifest import Manifest

        path = self._settings.datasets_dir / model.lineage.dataset_id / "manifest.json"
        try:
            manifest = Manifest.load(path)
        except FileNotFoundError:
            if measure_accuracy:
                raise FailedPrecondition(
                    f"dataset {model.lineage.dataset_id!r} that model {model.name}:{model.version} was trained on "
                    "no longer exists, so its test accuracy cannot be measured: profile without measure_accuracy "
                    "(the accuracy stored at training and export time is reported)"
                ) from None
            return ()
        for split in ("test", "val"):
            samples = manifest.samples(split)
            if samples:
                return tuple((str(p), label) for p, label in samples)
        if measure_accuracy:
            raise FailedPrecondition(
                f"dataset {manifest.name} ({manifest.id}) of model {model.name}:{model.version} has no test or "
                "validation images to measure accuracy on"
            )
        return ()


# -- in the child process ---------------------------------------------------------


def measure_or_refuse(task: VariantTask) -> bytes:
    """`measure`, with a file that cannot be read refused as FailedPrecondition."""
    try:
        return measure(task)
    except OSError as error:
        raise FailedPrecondition(f"cannot measure {task.variant} from {task.path}: {error}") from error


def measure(task: VariantTask) -> bytes:
    """Loads and measures one variant; returns a serialised VariantProfile with the
    figures measured here (the parent adds those from the store)."""
    import numpy as np

    from tlserve.service.inference import sessions
    from tlserve.service.profiling.measure import Latency, PeakMemory, time_calls

    preprocessing = pb.Preprocessing.FromString(task.preprocessing)
    crop = preprocessing.crop_size
    sessions.load_runtime(task.variant)
    torch_device = None
    if task.variant.is_pytorch:
        import torch

        if task.threads > 0:
            torch.set_num_threads(task.threads)
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch_device == "cuda":
            torch.cuda.reset_peak_memory_stats()
    images = _images(task, preprocessing, limit=task.batch_size)

    with PeakMemory() as peak:
        start = time.perf_counter()
        session: sessions.Session
        if task.variant.is_pytorch:
            session = sessions.TorchSession(task.path, backbone=task.backbone, num_classes=task.class_count,
                                            preprocessing=preprocessing, device=torch_device)
            sessions.warm_up(session, task.batch_size, crop)
        else:
            from tlserve.service import hardware

            # Opened as Predict opens it (spinning between runs decided the same way; with
            # CPU lanes both sessions, so that peak memory is what serving holds).
            session = sessions.open_onnx_session(
                task.path, warm_batch=task.batch_size, fill_size=crop, lanes=task.lanes,
                threads=task.threads, max_batch_size=task.max_batch_size,
                providers=hardware.onnxruntime_providers(), fp16=task.variant.precision == "fp16",
                sample_shape=(crop, crop, 3) if task.variant.uint8_nhwc else (3, crop, crop),
                cache_dir=pathlib.Path(task.tensorrt_cache),
            )
        load_seconds = time.perf_counter() - start

        sync = _synchronize(torch_device)
        # Timed on the session a lone batch runs on: with lanes, the wide one.
        run = session.run_wide if isinstance(session, sessions.LanedSession) else session.run
        one = images[:1]
        latency = Latency.of(time_calls(lambda: (run(one), sync()), task.iterations, WARMUP_CALLS))
        batch = np.resize(images, (task.batch_size, *images.shape[1:])) if len(images) else images
        batch_seconds = time_calls(lambda: (run(batch), sync()), THROUGHPUT_BATCHES, warmup=1)
    throughput = task.batch_size / sorted(batch_seconds)[len(batch_seconds) // 2]

    device = "cpu"
    peak_bytes = peak.bytes
    if torch_device == "cuda":
        import torch

        device, peak_bytes = "cuda:0", int(torch.cuda.max_memory_allocated())
    elif any(p.startswith(("CUDA", "Tensorrt")) for p in session.providers):
        device = "cuda:0"

    profile = pb.VariantProfile(
        latency_p50_seconds=latency.p50, latency_p95_seconds=latency.p95, latency_p99_seconds=latency.p99,
        batch_size=task.batch_size, throughput_images_per_second=throughput, peak_memory_bytes=peak_bytes,
        device=device, iterations=latency.count, load_seconds=load_seconds,
    )
    if task.measure_accuracy:
        correct = 0
        for start in range(0, len(task.samples), ACCURACY_BATCH_SIZE):
            chunk = task.samples[start:start + ACCURACY_BATCH_SIZE]
            inputs = _load(chunk, preprocessing, task.variant.uint8_nhwc)
            logits = run(inputs)["logits"]
            correct += int((logits.argmax(1) == np.array([label for _, label in chunk])).sum())
        profile.accuracy_measured = True
        profile.test_image_count = len(task.samples)
        profile.test_top1_accuracy = correct / max(1, len(task.samples))
    session.close()
    return profile.SerializeToString()


def _synchronize(torch_device: str | None) -> Callable[[], None]:
    """Waits for queued GPU kernels, so a timed call covers them; nothing on the CPU."""
    if torch_device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _load(samples, preprocessing: pb.Preprocessing, uint8_nhwc: bool):
    """Prepared inputs of `samples`, exactly as in evaluation (the export's loader)."""
    from tlserve.service import backbones
    from tlserve.service.export import onnx_export as ox

    images = ox.load_images([(pathlib.Path(p), label) for p, label in samples],
                            backbones.Preprocessing.from_proto(preprocessing))
    return images.inputs(uint8_nhwc)


def _images(task: VariantTask, preprocessing: pb.Preprocessing, limit: int):
    """Up to `limit` prepared test images for the timed calls; blank ones (zeros of
    the input's shape) when the dataset is gone."""
    import numpy as np

    if task.samples:
        return _load(task.samples[:limit], preprocessing, task.variant.uint8_nhwc)
    crop = preprocessing.crop_size
    if task.variant.uint8_nhwc:
        return np.zeros((limit, crop, crop, 3), np.uint8)
    return np.zeros((limit, 3, crop, crop), np.float32)
