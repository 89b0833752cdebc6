"""The inference domain: what the Predict and KServe servicers call.

    inference = InferenceService(settings, models, artifacts)
    response = await inference.predict(request, deadline=time.monotonic() + 5)   # pb.PredictResponse
    outputs = await inference.infer("shapes", 1, Variant.onnx("fp32"), x)      # {"logits": (N, C), ...}

A prediction: validate the request → resolve the model ("latest" is looked up at
most every `LATEST_TTL_SECONDS`; model records are cached until `evict`) → choose
the artifact variant (runtime + precision) → prepare the images (uint8 tensors of
the model's size are passed on as they are and normalised batch by batch in the
compute thread; float tensors of its size are copied on the event loop; anything
else is decoded or resized in the decode pool) → the model's `DynamicBatcher` →
the session (ONNX Runtime or PyTorch) in the compute pool → softmax and top-k.
Loading a model (first request, or `ensure_loaded`) happens in a thread,
measured for the memory budget, warmed up before it serves; concurrent first
requests share one load. Loaded models live in a `ModelCache`;
a model in use is never unloaded under its requests.

Errors are the domain's (`service.errors`): InvalidArgument for the request's
fields and images, NotFound for the model, FailedPrecondition for a missing export,
ResourceExhausted for a full queue or a model larger than the cache, and
DeadlineExceeded for work whose deadline passed. No gRPC here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Iterator

import numpy as np

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import hardware, metrics
from tlserve.service.config import Settings
from tlserve.service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from tlserve.service.inference import cache
from tlserve.service.inference.batcher import DynamicBatcher
from tlserve.service.inference.postprocess import predictions, run_ranked
from tlserve.service.inference.preprocess import Preprocessor
from tlserve.service.inference.sessions import (
    LanedSession,
    Session,
    TensorInfo,
    TorchSession,
    cpu_lanes,
    load_runtime,
    open_onnx_session,
    runs_on_cpu,
    warm_up,
)
from tlserve.service.inference.stats import ModelStatistics
from tlserve.service.store.artifacts import ArtifactStore
from tlserve.service.store.models import ModelStore
from tlserve.service.variant import LAYOUTS, Variant

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
# How long "version 0" (latest) keeps resolving to the same version without asking
# the store: a version published less than this ago may not be "latest" yet.
LATEST_TTL_SECONDS = 1.0
# Tensor inputs up to this size are prepared on the event loop (a copy of a few
# hundred KiB takes microseconds); anything bigger or needing a decode goes to a thread.
INLINE_PREPARE_BYTES = 1 << 20
_LAYOUT_WORDS = {"float_nchw": "normalised float NCHW tensors", "uint8_nhwc": "uint8 NHWC pixels"}

# Batches of one model computing at once (see batcher). On a GPU the next batch's
# host work and copies overlap the running one's kernels, so two may compute. On the
# CPU a multi-threaded session's intra-op threads already take every core: a second
# batch alongside only splits the cores between two barrier-synchronised runs
# (measured on 2 cores, resnet18 at 224 px, Predict at concurrency 8 against
# in-process ONNX Runtime at batch 8: 0.80 of it with 2 batches, 0.93 with 1). So on
# the CPU batches run one at a time on that session, or, with lanes (`cpu_lanes`,
# the default), one per core on a single-threaded session (batcher: "Lanes").
MAX_CONCURRENT_BATCHES_GPU = 2
MAX_CONCURRENT_BATCHES_CPU = 1

Key = tuple[str, int, Variant]  # (name, version, variant)

_ERROR_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (InvalidArgument, "invalid_argument"),
    (NotFound, "not_found"),
    (FailedPrecondition, "failed_precondition"),
    (ResourceExhausted, "resource_exhausted"),
    (DeadlineExceeded, "deadline_exceeded"),
    (Unavailable, "unavailable"),
    (asyncio.CancelledError, "cancelled"),
)


def error_reason(error: BaseException) -> str:
    """The `reason` label of tlserve_predict_errors_total for an exception."""
    for cls, reason in _ERROR_REASONS:
        if isinstance(error, cls):
            return reason
    return "internal"


def _precision_name(precision: int) -> str:
    return pb.Precision.Name(precision).removeprefix("PRECISION_").lower()


class _Call:
    """What `_call_metrics` knows of a call: its model's metrics, once resolved."""

    metrics: metrics.ModelMetrics | None = None

    def track(self, bound: metrics.ModelMetrics) -> None:
        bound.in_flight.inc()  # dec when the call ends
        self.metrics = bound


@dataclasses.dataclass(eq=False)
class LoadedModel:
    """A model variant loaded, warmed up and serving through its batcher."""

    name: str
    version: int
    variant: Variant
    input: TensorInfo  # what `infer` takes: name, numpy dtype, shape with -1 for the batch
    outputs: tuple[TensorInfo, ...]
    memory_bytes: int
    class_names: tuple[str, ...]
    preprocessing: pb.Preprocessing
    has_embedding: bool
    providers: tuple[str, ...]
    session: Session = dataclasses.field(repr=False)
    batcher: DynamicBatcher = dataclasses.field(repr=False)
    metrics: metrics.ModelMetrics = dataclasses.field(repr=False)
    ready: bool = False
    in_use: int = 0  # requests holding it now
    retired: bool = False  # out of the cache; unloaded when in_use reaches 0

    @property
    def key(self) -> Key:
        return (self.name, self.version, self.variant)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)


@dataclasses.dataclass
class _ModelRecord:
    """One model version as the store has it: the record and its artifacts by variant."""

    model: pb.Model
    artifacts: dict[str, tuple[pb.ModelArtifact, str]]  # variant → (artifact, relative path)
    # (runtime, precision, layout) → the variant chosen for them
    variants: dict[tuple[int, int, str | None], str] = dataclasses.field(default_factory=dict)


class InferenceService:
    def __init__(
        self, settings: Settings, models: ModelStore, artifacts: ArtifactStore, *,
        inference_metrics: metrics.InferenceMetrics = metrics.INFERENCE,
    ) -> None:
        self._settings = settings
        self._models = models
        self._artifacts = artifacts
        self._metrics = inference_metrics
        self._metrics.set_limits(settings.max_queue_size, settings.model_cache_bytes)
        cache.configure_allocator()
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(settings.executor_threads, "tlserve-decode")
        self._compute_pool = concurrent.futures.ThreadPoolExecutor(
            max(MAX_CONCURRENT_BATCHES_GPU, cpu_lanes(settings), settings.executor_threads), "tlserve-infer"
        )
        # One thread: loads and unloads are serialised by cache.LOAD_LOCK anyway.
        self._load_pool = concurrent.futures.ThreadPoolExecutor(1, "tlserve-load")
        self._cache: cache.ModelCache[Key, LoadedModel] = cache.ModelCache(settings.model_cache_bytes)
        self._loading: dict[Key, asyncio.Task] = {}
        self._stats: dict[Key, ModelStatistics] = {}
        self._bound_metrics: dict[Key, metrics.ModelMetrics] = {}
        self._records: dict[tuple[str, int], _ModelRecord] = {}
        self._latest: dict[str, tuple[int, float]] = {}  # name → (version, when looked up)
        self._preprocessors: dict[Key, Preprocessor] = {}
        self._background: set[asyncio.Task] = set()  # unloads under way
        self._held: set[LoadedModel] = set()  # retired, unloaded once their requests finish
        self._closed = False

    # -- Predict ---------------------------------------------------------------------

    async def predict(self, request: pb.PredictRequest, *, deadline: float | None = None) -> pb.PredictResponse:
        """Validates, prepares the images, runs them through the model's batcher and
        answers top-k (and logits, embeddings) per image, in order."""
        start = time.perf_counter()
        with self._call_metrics() as call:
            self._check_open()
            if request.top_k < 0:
                raise InvalidArgument(f"top_k must be >= 0 (0 means {DEFAULT_TOP_K}), got {request.top_k}")
            if not request.images:
                raise InvalidArgument("images is empty: send at least one image")
            _check_deadline(deadline, "before the request was read")
            name, version = await self._resolve(request.model)
            runtime, precision = _runtime(request.runtime), _precision(request.runtime, request.precision)
            record, variant = await self._variant(name, version, runtime, precision)
            key = (name, version, variant)
            call.track(self._bound(key))
            artifact, _ = record.artifacts[variant]
            if request.return_embeddings and not (variant.is_pytorch or artifact.has_embedding):
                raise FailedPrecondition(
                    f"model {name}:{version} ({variant}) has no embedding output: export it again with "
                    f"include_embedding (tlserve export {name}:{version} --precision "
                    f"{_precision_name(precision)} --embedding), "
                    "or predict with runtime PYTORCH"
                )
            x = await self._prepare(key, record.model, request.images)
            model = await self._acquire(key)
            try:
                outputs = await model.batcher.submit(x, deadline)
            finally:
                self._release(model)
            response = pb.PredictResponse(
                model=pb.ModelRef(name=name, version=version), runtime=runtime, precision=precision,
                request_id=request.request_id,
            )
            response.predictions.extend(predictions(
                outputs, model.class_names, request.top_k or DEFAULT_TOP_K,
                logits=request.return_logits, embeddings=request.return_embeddings,
            ))
        call.metrics.observe_predict(len(request.images), time.perf_counter() - start)
        return response

    async def target(
        self, name: str, version: int, runtime: int, precision: int, layout: str | None = None
    ) -> tuple[pb.Model, Variant]:
        """The model record and the variant that serve `runtime`/`precision`/`layout` (see
        `choose_variant`), resolved as Predict resolves them: from the cache of records
        ("latest", version 0, is asked again after LATEST_TTL_SECONDS; `evict`, on a delete
        or an export, forgets a model). NotFound for an unknown model or version,
        FailedPrecondition for a variant not exported."""
        name, version = await self._resolve(pb.ModelRef(name=name, version=version))
        record, variant = await self._variant(name, version, runtime, precision, layout)
        return record.model, variant

    def choose_variant(self, model: pb.Model, runtime: int, precision: int, layout: str | None = None) -> Variant:
        """The artifact variant that serves `runtime` at `precision` (0 = ONNX, FP32):
        ONNX prefers the float NCHW graph, else the uint8 NHWC one; `layout`
        ("float_nchw" or "uint8_nhwc") asks for that graph only."""
        runtime, precision = _runtime(runtime), _precision(runtime, precision)
        if layout is not None and layout not in LAYOUTS:
            raise InvalidArgument(f"input layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        variants = {Variant.of_artifact(a) for a in model.artifacts}
        where = f"model {model.name}:{model.version}"
        if runtime == pb.RUNTIME_PYTORCH:
            if Variant.PYTORCH not in variants:
                raise FailedPrecondition(f"{where} has no PyTorch artifact: predict with runtime ONNX")
            return Variant.PYTORCH
        p = _precision_name(precision)
        for candidate in (layout,) if layout else LAYOUTS:
            if Variant.onnx(p, candidate) in variants:
                return Variant.onnx(p, candidate)
        if layout:
            raise FailedPrecondition(
                f"{where} has no ONNX {p} export taking {_LAYOUT_WORDS[layout]}: run ExportModel "
                f"(tlserve export {model.name}:{model.version} --precision {p} --input-format {layout})"
            )
        fallback = ", or predict with runtime PYTORCH" if Variant.PYTORCH in variants and p == "fp32" else ""
        raise FailedPrecondition(
            f"{where} has no ONNX {p} export: run ExportModel "
            f"(tlserve export {model.name}:{model.version} --precision {p}){fallback}"
        )

    # -- KServe ----------------------------------------------------------------------

    async def infer(
        self, name: str, version: int, variant: Variant, inputs: np.ndarray, *, deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs prepared inputs (the variant's input spec with a batch axis) through the
        model's batcher: {"logits": (N, C) float32, "embedding": (N, D) if it has one}."""
        key = (name, version, variant)
        with self._call_metrics() as call:
            self._check_open()
            _check_deadline(deadline, "before the request was read")
            model = await self._acquire(key)
            call.track(model.metrics)  # labels only for a model that exists (bounded cardinality)
            try:
                _check_input(model, inputs)
                outputs = await model.batcher.submit(inputs, deadline)
            finally:
                self._release(model)
        return {name: outputs[name] for name in model.output_names}

    # -- models ----------------------------------------------------------------------

    async def ensure_loaded(self, name: str, version: int, variant: Variant) -> LoadedModel:
        """The loaded model (most recently used now), loading and warming it up first
        if needed; concurrent callers share one load."""
        self._check_open()
        key = (name, version, variant)
        model = self._cache.get(key)
        if model is not None:
            return model
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key), name=f"load {name}:{version} {variant}")
            self._loading[key] = task
        # shield: a caller that is cancelled does not cancel the load others wait for.
        return await asyncio.shield(task)

    def is_ready(self, name: str, version: int, variant: Variant) -> bool:
        return self.loaded_model(name, version, variant) is not None

    def loaded_model(self, name: str, version: int, variant: Variant) -> LoadedModel | None:
        """The variant if it is loaded and serving, without counting as a use (the cache's order stays)."""
        model = self._cache.peek((name, version, variant))
        return model if model is not None and model.ready and not model.retired else None

    def loaded(self) -> list[LoadedModel]:
        """The models loaded now, least recently used first."""
        return [m for k in self._cache if (m := self._cache.peek(k)) is not None]

    def statistics(self) -> list[ModelStatistics]:
        """A snapshot per (name, version, variant) that has been loaded since start."""
        return [s.snapshot() for s in self._stats.values()]

    def evict(self, name: str, version: int | None = None) -> None:
        """Drops the loaded variants of a model (one version, or all): new requests no
        longer reach them; each is unloaded once its in-flight requests are done."""
        def matches(key) -> bool:
            return key[0] == name and (version is None or key[1] == version)

        for key in [k for k in self._cache if matches(k)]:
            self._retire(self._cache.pop(key))
        for key in [k for k in self._loading if matches(k)]:
            del self._loading[key]  # its load finishes, then sees it is no longer wanted
        for key in [k for k in self._records if matches(k)]:
            del self._records[key]
        for key in [k for k in self._preprocessors if matches(k)]:
            del self._preprocessors[key]
        self._latest.pop(name, None)
        self._metrics.loaded_models.set(len(self._cache))

    async def unloaded(self) -> None:
        """Returns once every unload scheduled so far (by `evict` or the cache) is done."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def close(self) -> None:
        """Unloads every model (queued and running batches finish first) and stops the pools."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._loading.values()):
            task.cancel()
        self._loading.clear()
        for key in list(self._cache):
            self._retire(self._cache.pop(key))
        # Models still held by requests unload when those finish (the server stops its
        # calls first, within its grace period); wait for them as long as that period.
        end = time.monotonic() + self._settings.grace_seconds
        while self._held and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await self.unloaded()
        self._metrics.loaded_models.set(0)
        for pool in (self._decode_pool, self._compute_pool, self._load_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    # -- internals: resolution -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down; retry on another replica or later")

    async def _resolve(self, ref: pb.ModelRef) -> tuple[str, int]:
        if not ref.name:
            raise InvalidArgument("model.name is required")
        if ref.version < 0:
            raise InvalidArgument(f"model.version must be >= 0 (0 = latest), got {ref.version}")
        if ref.version:
            if (ref.name, ref.version) in self._records:
                return ref.name, ref.version
        else:
            latest = self._latest.get(ref.name)
            if latest is not None and time.monotonic() - latest[1] < LATEST_TTL_SECONDS:
                return ref.name, latest[0]
        name, version = await self._in_pool(self._models.resolve, ref)
        if not ref.version:
            self._latest[name] = (version, time.monotonic())
        return name, version

    async def _variant(
        self, name: str, version: int, runtime: int, precision: int, layout: str | None = None
    ) -> tuple[_ModelRecord, Variant]:
        record = await self._record(name, version)
        wanted = (runtime, precision, layout)
        variant = record.variants.get(wanted)
        if variant is None:
            try:
                variant = self.choose_variant(record.model, runtime, precision, layout)
            except FailedPrecondition:  # an export may have been published since the record was read
                record = await self._record(name, version, refresh=True)
                variant = self.choose_variant(record.model, runtime, precision, layout)
            record.variants[wanted] = variant
        return record, variant

    async def _record(self, name: str, version: int, refresh: bool = False) -> _ModelRecord:
        record = None if refresh else self._records.get((name, version))
        if record is None:
            def fetch() -> _ModelRecord:
                model = self._models.get(name, version)
                return _ModelRecord(model, {Variant.of_artifact(a): (a, p) for a, p in self._models.artifacts(name, version)})

            record = await self._in_pool(fetch)
            self._records[(name, version)] = record
        return record

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, fn, *args)

    def _bound(self, key: Key) -> metrics.ModelMetrics:
        bound = self._bound_metrics.get(key)
        if bound is None:
            bound = self._bound_metrics[key] = self._metrics.bind(*key)
        return bound

    @contextlib.contextmanager
    def _call_metrics(self) -> Iterator[_Call]:
        """One Predict or ModelInfer call's metrics: in flight from `track` (once its
        model is known) to the end; an error counted against that model, or without
        model labels if it came before the model was known."""
        call = _Call()
        try:
            yield call
        except BaseException as e:
            self._count_error(call.metrics, e)
            raise
        finally:
            if call.metrics is not None:
                call.metrics.in_flight.dec()

    def _count_error(self, bound: metrics.ModelMetrics | None, error: BaseException) -> None:
        reason = error_reason(error)
        if bound is not None:
            bound.observe_error(reason)
        else:  # before a model was resolved: no model labels (their values would be unbounded)
            self._metrics.errors.labels(model="", version="", variant="", reason=reason).inc()

    # -- internals: images ---------------------------------------------------------------

    def _preprocessor(self, key: Key, model: pb.Model) -> Preprocessor:
        prep = self._preprocessors.get(key)
        if prep is None:
            prep = self._preprocessors[key] = Preprocessor(model.preprocessing, key[2].layout)
        return prep

    async def _prepare(self, key: Key, model: pb.Model, images) -> np.ndarray:
        prep = self._preprocessor(key, model)
        max_pixels = self._settings.max_image_pixels
        if prep.crop * prep.crop <= max_pixels:
            # uint8 pixels at the model's size, as they came: the batch is normalised in
            # the compute thread (`Preprocessor.collate`), not here on the event loop.
            pixels = prep.pixels(images)
            if pixels is not None:
                return pixels
        inline = all(prep.is_prepared(image) for image in images) and (
            sum(len(image.tensor.data) for image in images) <= INLINE_PREPARE_BYTES
        )
        if inline:
            return prep.prepare(images, max_pixels)
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, prep.prepare, images, max_pixels)

    # -- internals: loading and unloading -----------------------------------------------

    async def _acquire(self, key: Key) -> LoadedModel:
        """The loaded model, held (in_use) until `_release`."""
        for _ in range(3):
            model = await self.ensure_loaded(*key)
            if not model.retired:  # else it was evicted between its load and now: load again
                model.in_use += 1
                return model
        raise Unavailable(f"model {key[0]}:{key[1]} ({key[2]}) was unloaded while loading; retry")

    def _release(self, model: LoadedModel) -> None:
        model.in_use -= 1
        if model.in_use:
            return
        if model.retired:
            self._held.discard(model)
            self._schedule_unload(model)
        else:  # the cache may have stayed over budget while this model was busy
            for evicted in self._cache.trim():
                self._retire(evicted)

    async def _load(self, key: Key) -> LoadedModel:
        name, version, variant = key
        try:
            record = await self._record(name, version)
            if variant not in record.artifacts:
                record = await self._record(name, version, refresh=True)
            if variant not in record.artifacts:
                have = ", ".join(sorted(v.key for v in record.artifacts)) or "none"
                raise NotFound(f"model {name}:{version} has no {variant} artifact (it has: {have})")
            artifact, relpath = record.artifacts[variant]
            path = self._artifacts.path(relpath)
            stats = self._stats.setdefault(key, ModelStatistics(name, version, variant))
            t0 = time.perf_counter()
            session, memory = await asyncio.get_running_loop().run_in_executor(
                self._load_pool, self._open_session, record.model, artifact, variant, path
            )
            budget = self._settings.model_cache_bytes
            if memory > budget:
                await self._in_load_pool(cache.unload, session.close)
                raise ResourceExhausted(
                    f"model {name}:{version} ({variant}) needs {memory} bytes loaded, more than the whole "
                    f"model_cache_bytes {budget} (TLSERVE_MODEL_CACHE_BYTES): raise the budget"
                )
            bound = self._bound(key)
            model = LoadedModel(
                name=name, version=version, variant=variant, input=session.input, outputs=session.outputs,
                memory_bytes=memory, class_names=tuple(record.model.class_names),
                preprocessing=record.model.preprocessing,
                has_embedding=any(o.name == "embedding" for o in session.outputs),
                providers=session.providers, session=session,
                batcher=DynamicBatcher(
                    functools.partial(run_ranked, session.run), max_batch_size=self._settings.max_batch_size,
                    max_delay_seconds=self._settings.batch_delay_seconds,
                    max_queue_size=self._settings.max_queue_size, executor=self._compute_pool, stats=stats,
                    observer=bound, max_concurrent_batches=concurrent_batches(session),
                    collate=self._preprocessor(key, record.model).collate,
                    solo_fn=functools.partial(run_ranked, session.run_wide) if isinstance(session, LanedSession)
                    else None,
                    name=f"model {name}:{version} ({variant})",
                ),
                metrics=bound, ready=True,
            )
            if self._loading.get(key) is asyncio.current_task():
                for evicted in self._cache.put(key, model):
                    self._retire(evicted)
                bound.set_memory(memory)
                self._metrics.loaded_models.set(len(self._cache))
                seconds = time.perf_counter() - t0
                bound.observe_load(seconds)
                log.info("model loaded", extra={"fields": {
                    "model": name, "version": version, "variant": variant.key, "memory_bytes": memory,
                    "providers": list(session.providers), "seconds": round(seconds, 3),
                    "spin_between_runs": getattr(session, "spin_between_runs", None),
                    "cpu_lanes": getattr(session, "lanes", 1),
                }})
            else:  # evicted (DeleteModel) or the service closed while it loaded
                self._retire(model)
            return model
        finally:
            if self._loading.get(key) is asyncio.current_task():
                del self._loading[key]

    def _open_session(self, model: pb.Model, artifact: pb.ModelArtifact, variant: Variant, path) -> tuple[Session, int]:
        """In the load thread: the session, loaded and warmed up, and its measured memory."""
        settings = self._settings
        crop = model.preprocessing.crop_size
        # Libraries imported and devices probed now, outside the measurement: the first
        # model would otherwise be charged for ONNX Runtime's import and torch's (which
        # `onnxruntime_providers` imports to count GPUs), ~500 MiB together.
        load_runtime(variant)
        providers = hardware.onnxruntime_providers()

        def load() -> Session:
            if variant.is_pytorch:
                session = TorchSession(path, backbone=model.backbone, num_classes=len(model.class_names),
                                       preprocessing=model.preprocessing)
                warm_up(session, settings.max_batch_size, crop)
                return session
            return open_onnx_session(
                path, warm_batch=settings.max_batch_size, fill_size=crop, lanes=cpu_lanes(settings),
                threads=settings.inference_threads, max_batch_size=settings.max_batch_size,
                providers=providers, fp16=variant.precision == "fp16",
                sample_shape=(crop, crop, 3) if variant.uint8_nhwc else (3, crop, crop),
                cache_dir=settings.home / "cache" / "tensorrt",
            )

        return cache.measure_load(load, floor_bytes=path.stat().st_size)

    async def _in_load_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._load_pool, fn, *args)

    def _retire(self, model: LoadedModel | None) -> None:
        """Out of the cache: unloaded now if idle, else by its last request's `_release`."""
        if model is None or model.retired:
            return
        model.retired = True
        model.ready = False
        model.metrics.set_memory(None)
        self._metrics.loaded_models.set(len(self._cache))
        if model.in_use == 0:
            self._schedule_unload(model)
        else:
            self._held.add(model)

    def _schedule_unload(self, model: LoadedModel) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the event loop (a script, a test): unload here
            cache.unload(model.session.close)
            return
        task = loop.create_task(self._unload(model), name=f"unload {model.name}:{model.version} {model.variant}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unload(self, model: LoadedModel) -> None:
        await model.batcher.close()
        await asyncio.get_running_loop().run_in_executor(self._load_pool, cache.unload, model.session.close)
        log.info("model unloaded", extra={"fields": {
            "model": model.name, "version": model.version, "variant": model.variant.key,
        }})


# -- helpers ---------------------------------------------------------------------------


def concurrent_batches(session: Session) -> int:
    """How many batches of a model may compute at once: its lanes for a LanedSession,
    else by where its session runs (its first provider: ONNX Runtime's, or
    "pytorch-<device>")."""
    if isinstance(session, LanedSession):
        return session.lanes
    return MAX_CONCURRENT_BATCHES_CPU if runs_on_cpu(session.providers) else MAX_CONCURRENT_BATCHES_GPU


def _runtime(runtime: int) -> int:
    if runtime not in (pb.RUNTIME_UNSPECIFIED, pb.RUNTIME_ONNX, pb.RUNTIME_PYTORCH):
        raise InvalidArgument(f"runtime {runtime} is not a Runtime value (ONNX or PYTORCH)")
    return runtime or pb.RUNTIME_ONNX


def _precision(runtime: int, precision: int) -> int:
    if precision not in (pb.PRECISION_UNSPECIFIED, pb.PRECISION_FP32, pb.PRECISION_FP16, pb.PRECISION_INT8):
        raise InvalidArgument(f"precision {precision} is not a Precision value (FP32, FP16 or INT8)")
    precision = precision or pb.PRECISION_FP32
    if runtime == pb.RUNTIME_PYTORCH and precision != pb.PRECISION_FP32:
        raise InvalidArgument(
            f"runtime PYTORCH runs FP32 only, not {_precision_name(precision).upper()}: "
            "leave precision unset, or use runtime ONNX with an exported model"
        )
    return precision


def _check_deadline(deadline: float | None, when: str) -> None:
    if deadline is not None and deadline <= time.monotonic():
        raise DeadlineExceeded(f"the deadline passed {when}")


def _check_input(model: LoadedModel, inputs: np.ndarray) -> None:
    spec = model.input
    ok = (
        isinstance(inputs, np.ndarray) and inputs.dtype == spec.dtype and inputs.ndim == len(spec.shape)
        and len(inputs) > 0 and all(d < 0 or d == s for d, s in zip(spec.shape[1:], inputs.shape[1:]))
    )
    if not ok:
        got = f"{inputs.dtype} {tuple(inputs.shape)}" if isinstance(inputs, np.ndarray) else type(inputs).__name__
        raise InvalidArgument(
            f"input {spec.name} of model {model.name}:{model.version} ({model.variant}) must be "
            f"{spec.dtype} {tuple(spec.shape)} (-1: any size, at least 1), got {got}"
        )
