"""CompareBackbones: which backbone to fine-tune, judged before fine-tuning.

For one dataset and a few candidate torchvision backbones, `BackboneComparer.compare`
trains a linear probe on each backbone's frozen features and measures what the
backbone would cost to serve, so that accuracy and cost go on one chart (the client's
`tlserve report --compare-backbones`). Per backbone:

- probe accuracy: a multinomial logistic regression (`strategies.fit_linear_probe`:
  L-BFGS on standardised features, L2 strength chosen by cross-validation on the
  training features) trained on the frozen trunk's features of the training split,
  at most `max_images_per_class` per class (a seeded choice, `strategies.probe_subset`),
  scored on the validation split. Without a validation split, a seeded stratified
  `HOLDOUT_FRACTION` of each class's training images is held out instead (classes
  with one image keep it for training); the test split is never used, so nothing is
  chosen on the images that will judge the fine-tuned model;
- batch-1 latency (p50 of `LATENCY_ITERATIONS` timed calls after `LATENCY_WARMUP`) of
  the frozen backbone with the probe as its head, on one validation image, on this
  server's device (the GPU where there is one), fp32, like ProfileModel's PyTorch variant;
- parameters, GFLOPs (multiply-adds ÷ 1e9 of one image at its input size, counted on
  the real graph as published models are) and the bytes of its FP32 state dict as
  `torch.save` writes it (the model.pt a fine-tune would publish), all of this
  classifier with a head for the dataset's classes;
- the feature width and the seconds spent computing every probe image's features.

Weights: "DEFAULT" (or empty) loads each backbone's DEFAULT ImageNet weights from the
weights cache (`backbones.build`: FAILED_PRECONDITION naming the file to provision
when one is missing, checked before any work starts); "NONE" compares randomly
initialised backbones (seeded: the same every time), a baseline where no weights can
be provisioned. Input size: each backbone's own (its weights' crop) unless
`image_size` sets one for all.

The work runs in a fresh spawned child process per call: the backbones' memory goes
back to the OS when it ends, an out-of-memory kill there fails the call, not the
server, and a cancelled call stops it at once. One comparison runs at a time: it
uses every core (or the GPU) and its latencies would measure another's; a second
call meanwhile is refused with RESOURCE_EXHAUSTED (retry when the first ends) rather
than queued, so that waiting calls never hold the server's worker threads. The
child uses `inference_threads` torch threads (0: torch's default, one per core).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import threading
import time
from collections.abc import Sequence

import torch

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones, childproc
from tlserve.service.config import Settings
from tlserve.service.datasets import Datasets
from tlserve.service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from tlserve.service.manifest import Manifest
from tlserve.service.training import strategies

log = logging.getLogger("tlserve.compare")

# Four families from 0.06 to 4.5 GFLOPs and 2.5 to 28 M parameters: the usual span of
# the speed/accuracy trade-off for a transfer-learning target, each quick to probe.
DEFAULT_BACKBONES = ("mobilenet_v3_small", "resnet18", "efficientnet_b0", "convnext_tiny")
MAX_BACKBONES = 8
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
WEIGHTS_DEFAULT, WEIGHTS_NONE = "DEFAULT", "NONE"
# Without a val split: this share of each class's training images is held out to score on.
HOLDOUT_FRACTION = 0.2
SEED = 0
FEATURE_BATCH_SIZE = 64
LATENCY_ITERATIONS = 20
LATENCY_WARMUP = 3


# -- the request ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """A CompareBackbonesRequest, checked; `dataset` not yet resolved."""

    dataset: str
    backbones: tuple[str, ...]
    pretrained: bool
    image_size: int  # 0: each backbone's own
    max_images_per_class: int  # 0: all

    @classmethod
    def from_request(cls, request: pb.CompareBackbonesRequest) -> Options:
        if not request.dataset:
            raise InvalidArgument("dataset is required: a dataset id or name (see ListDatasets)")
        names = tuple(request.backbones) or DEFAULT_BACKBONES
        if len(names) > MAX_BACKBONES:
            raise InvalidArgument(
                f"backbones lists {len(names)} models; at most {MAX_BACKBONES} are compared in one call"
            )
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InvalidArgument(f"backbones lists {', '.join(map(repr, repeated))} more than once")
        for name in names:
            backbones.get_spec(name)  # UnknownBackbone: INVALID_ARGUMENT naming it and listing the valid names
        if request.max_images_per_class < 0:
            raise InvalidArgument(
                f"max_images_per_class must be >= 0 (0 means every training image), got {request.max_images_per_class}"
            )
        if request.image_size and not MIN_IMAGE_SIZE <= request.image_size <= MAX_IMAGE_SIZE:
            raise InvalidArgument(
                f"image_size must be within {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels "
                f"(0 means each backbone's own), got {request.image_size}"
            )
        weights = request.weights.strip().upper() or WEIGHTS_DEFAULT
        if weights not in (WEIGHTS_DEFAULT, WEIGHTS_NONE):
            raise InvalidArgument(
                f"weights must be {WEIGHTS_DEFAULT!r} (or empty: each backbone's DEFAULT ImageNet weights from the "
                f"weights cache) or {WEIGHTS_NONE!r} (random initialisation), got {request.weights!r}"
            )
        options = cls(
            dataset=request.dataset, backbones=names, pretrained=weights == WEIGHTS_DEFAULT,
            image_size=request.image_size, max_images_per_class=request.max_images_per_class,
        )
        for name in names:
            _check_buildable(name, options.image_size)
        return options


def _check_buildable(name: str, image_size: int) -> None:
    """The build's own size checks (a minimum size, ViT's patch multiple, MaxViT's
    partitions), run on the meta device: no memory, milliseconds, before any real work."""
    try:
        with torch.device("meta"):
            backbones.build(name, 2, weights=backbones.WeightsChoice(kind="none"), weights_dir=".",
                            image_size=image_size or None)
    except InvalidArgument:
        raise
    except Exception:  # an architecture the meta device can't build: the real build will tell
        log.debug("meta build of %s failed; checked when it is built", name, exc_info=True)


def _check_cached(options: Options, weights_dir) -> None:
    """Every DEFAULT weights file is present (its hash is checked when loaded)."""
    if not options.pretrained:
        return
    missing = []
    for name in options.backbones:
        try:
            backbones.ensure_cached(backbones.get_spec(name).default.enum, weights_dir)
        except backbones.WeightsNotCached as error:
            missing.append(str(error))
    if missing:
        raise backbones.WeightsNotCached(
            "; ".join(missing) + f" (or compare with weights {WEIGHTS_NONE!r}: randomly initialised baselines)"
        )


# -- the images ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeSplits:
    train: list[tuple[str, int]]  # (absolute path, label)
    val: list[tuple[str, int]]
    val_source: str  # "val" or "train holdout"


def hold_out(samples: Sequence[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): of each class of n ≥ 2 images, round(fraction·n) (at least 1,
    at most n − 1) held out, a seeded random choice; order within each part kept."""
    counts: dict[int, int] = {}
    for _, label in samples:
        counts[label] = counts.get(label, 0) + 1
    quota = {label: min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0 for label, n in counts.items()}
    generator = torch.Generator().manual_seed(seed)
    held = set()
    for i in torch.randperm(len(samples), generator=generator).tolist():
        label = samples[i][1]
        if quota[label] > 0:
            quota[label] -= 1
            held.add(i)
    kept = [s for i, s in enumerate(samples) if i not in held]
    return kept, [s for i, s in enumerate(samples) if i in held]


def probe_splits(manifest: Manifest, max_images_per_class: int, seed: int = SEED) -> ProbeSplits:
    """Training and scoring images of the probes (module docstring)."""
    train = [(str(path), label) for path, label in manifest.samples("train")]
    val = [(str(path), label) for path, label in manifest.samples("val")]
    source = "val"
    if not val:
        train, val = hold_out(train, HOLDOUT_FRACTION, seed)
        source = "train holdout"
    if not val:
        raise FailedPrecondition(
            f"dataset {manifest.name} ({manifest.id}) has no validation images and no class with 2 or more "
            "training images to hold one out: a probe can't be scored; upload it with a validation split "
            "(split.val_fraction) or more images"
        )
    if max_images_per_class:
        keep = strategies.probe_subset([label for _, label in train], len(manifest.class_names), seed,
                                       limit=max_images_per_class)
        train = [train[i] for i in keep]
    return ProbeSplits(train=train, val=val, val_source=source)


# -- the domain object ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompareTask:
    """What the child process needs: plain values, picklable."""

    backbones: tuple[str, ...]
    pretrained: bool
    image_size: int
    class_count: int
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]
    weights_dir: str
    threads: int
    # False accepts weights files whose SHA-256 does not match their name: files made
    # locally, for tests of `probe_backbone`. The server always checks.
    check_hash: bool
    seed: int


class BackboneComparer:
    def __init__(self, settings: Settings, datasets: Datasets) -> None:
        self._settings = settings
        self._datasets = datasets
        self._lock = threading.Lock()
        self._running: str = ""  # what the running comparison is, for the busy message

    def compare(
        self, request: pb.CompareBackbonesRequest, cancelled: threading.Event | None = None
    ) -> pb.CompareBackbonesResponse:
        """Validates, then probes every backbone in a child process; blocks (call it off
        the event loop). `cancelled` set stops the child and raises Cancelled."""
        options = Options.from_request(request)
        manifest = self._manifest(options.dataset)
        splits = probe_splits(manifest, options.max_images_per_class)
        _check_cached(options, self._settings.weights_dir)
        task = CompareTask(
            backbones=options.backbones, pretrained=options.pretrained, image_size=options.image_size,
            class_count=len(manifest.class_names), train=tuple(splits.train), val=tuple(splits.val),
            weights_dir=str(self._settings.weights_dir), threads=self._settings.inference_threads,
            check_hash=True, seed=SEED,
        )
        if not self._lock.acquire(blocking=False):
            raise ResourceExhausted(
                f"another CompareBackbones is running ({self._running}); one runs at a time because it uses "
                "every core and would skew the other's latencies: retry when it ends"
            )
        try:
            self._running = f"{', '.join(options.backbones)} on dataset {manifest.id}"
            start = time.monotonic()
            measured = childproc.run_in_child(
                probe_all, task, what="comparing backbones", cancelled=cancelled,
                memory_hint="compare fewer or smaller backbones, or cap max_images_per_class",
            )
        finally:
            self._running = ""
            self._lock.release()

        results = [pb.BackboneComparison.FromString(m["result"]) for m in measured]
        for m, result in zip(measured, results):
            log.info(
                "probed %s on %s: accuracy %.3f (L2 %g), p50 %.2f ms on %s, features %.1f s, %.1f s in all",
                result.backbone, manifest.id, result.probe_accuracy, m["weight_decay"],
                result.latency_p50_seconds * 1e3, result.device, result.feature_seconds, m["seconds"],
            )
        log.info("compared %d backbones on %s in %.1f s (scored on %s)", len(results), manifest.id,
                 time.monotonic() - start, splits.val_source)
        results.sort(key=lambda r: (-r.probe_accuracy, r.latency_p50_seconds))
        class_count = len(manifest.class_names)
        return pb.CompareBackbonesResponse(
            results=results, dataset_id=manifest.id, class_count=class_count, chance_accuracy=1.0 / class_count,
            train_image_count=len(splits.train), val_image_count=len(splits.val),
        )

    def _manifest(self, dataset: str) -> Manifest:
        try:
            return self._datasets.manifest(dataset)  # NotFound for an unknown id or name
        except FileNotFoundError:
            raise FailedPrecondition(
                f"dataset {dataset!r} has no manifest on this server's disk (was HOME/datasets changed?); "
                "upload or register it again"
            ) from None


# -- the child process -----------------------------------------------------------------------


def probe_all(task: CompareTask) -> list[dict]:
    """Every backbone of `task`, one after the other, in this process. -> per backbone
    {"result": serialised BackboneComparison, "weight_decay": the probe's L2, "seconds"}."""
    if task.threads > 0:
        torch.set_num_threads(task.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # as training does: same seed, same numbers
    measured = []
    for name in task.backbones:
        start = time.monotonic()
        result, weight_decay = probe_backbone(name, task, device)
        measured.append({"result": result.SerializeToString(), "weight_decay": weight_decay,
                         "seconds": time.monotonic() - start})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return measured


def probe_backbone(name: str, task: CompareTask, device: torch.device) -> tuple[pb.BackboneComparison, float]:
    from tlserve.service.profiling.measure import Latency, time_calls
    from tlserve.service.training import data
    from tlserve.service.training import features as features_of

    torch.manual_seed(task.seed)  # random initialisation (weights NONE) is the same on every call
    spec = backbones.get_spec(name)
    choice = backbones.WeightsChoice(kind="torchvision") if task.pretrained else backbones.WeightsChoice(kind="none")
    built = backbones.build(
        name, task.class_count, weights=choice, weights_dir=task.weights_dir, image_size=task.image_size or None,
        check_hash=task.check_hash,
    )
    built.model.eval().to(device)
    if device.type == "cuda":
        built.model.to(memory_format=torch.channels_last)
    transform = data.eval_transform(built.preprocessing)
    train_set = data.ImageDataset([(p, label) for p, label in task.train], transform)
    val_set = data.ImageDataset([(p, label) for p, label in task.val], transform)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    features = {}
    for split, dataset in (("train", train_set), ("val", val_set)):
        features[split] = features_of.frozen_features(
            built.trunk, dataset, batch_size=FEATURE_BATCH_SIZE, device=device, dtype=None,
            check=lambda: None, seed=task.seed,
        )
    sync()
    feature_seconds = time.perf_counter() - start

    (train_x, train_y), (val_x, val_y) = features["train"], features["val"]
    probe = strategies.fit_linear_probe(train_x.to(device), train_y, task.class_count, seed=task.seed)
    accuracy = probe.accuracy(val_x.to(device), val_y)
    strategies.set_head(built, probe.weight, probe.bias)  # the classifier measured is the probe itself

    image = val_set[0][0].unsqueeze(0).to(device)  # (1, 3, S, S)
    if device.type == "cuda":
        image = image.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        latency = Latency.of(time_calls(lambda: (built.model(image), sync()), LATENCY_ITERATIONS, LATENCY_WARMUP))

    result = pb.BackboneComparison(
        backbone=name,
        probe_accuracy=accuracy if math.isfinite(accuracy) else 0.0,
        latency_p50_seconds=latency.p50,
        parameter_count=sum(p.numel() for p in built.model.parameters()),
        gflops=backbones.count_gflops(built.model, built.preprocessing.crop_size, device),
        file_size_bytes=saved_size_bytes(built.model),
        weights=spec.default.name if task.pretrained else WEIGHTS_NONE,
        image_size=built.preprocessing.crop_size,
        feature_dim=built.feature_dim,
        feature_seconds=feature_seconds,
        device=f"cuda:{device.index}" if device.type == "cuda" else "cpu",
    )
    return result, probe.weight_decay


class _CountingWriter(io.RawIOBase):
    """A file that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, chunk) -> int:
        self.size += len(chunk)
        return len(chunk)


def saved_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`, counted as written, never held."""
    writer = _CountingWriter()
    torch.save(model.state_dict(), writer)
    return writer.size
