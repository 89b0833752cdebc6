"""Fine-tuning benchmarks: tlserve's engine (`engine.fine_tune`) against the
textbook PyTorch loops on the same model and the same procedural shape images.

    .venv/bin/python bench/finetune.py --quick          # ~5 min on 2 CPU cores (+4.5 min the first time)
    .venv/bin/python bench/finetune.py --device cuda    # bigger data, more repeats

Stages, in the order they run (each reads the source model of the first):

1. `train_source`: a backbone trained from scratch on SOURCE_SHAPES by the engine;
   its weights are the starting point of everything below ("pretrained"). It is
   kept in `--cache-dir` (var/bench-cache) under a key of its settings, device and
   library versions, and loaded from there by later runs, as pretrained weights
   would be (`--retrain-source` trains it anyway).
2. `bench_full_finetune`: images/s of the training epochs of a FULL fine-tune,
   ours against a plain loop (new final Linear, ImageFolder DataLoader with the
   same transforms, SGD with momentum, cross-entropy, `model.train()`). Ours is
   timed by wrapping the engine's `train_one_epoch`, so both sides count the same
   scope: loading, forward, backward and optimiser steps of the same images; not
   validation, checkpoints or model building (shown apart, as a profile). Each of
   our epochs is paired with a baseline epoch run right next to it (`paired_epochs`),
   the first pair of each fine_tune left out (one-off warm-up on both sides).
3. `bench_feature_cache`: feature extraction, ours with the feature cache (its
   head a logistic regression fitted on the cached views: no epochs) against ten
   epochs of the plain frozen-backbone loop that decodes and forwards every
   image through the whole network every epoch. Wall time of the whole training
   (ours: model build, cache, the fitted head and its evaluation; the baseline:
   model build and ten epochs, no validation at all),
   then test accuracy of both. With the engine's defaults (augmentation off while
   features are cached: 1 view) and again with augmentation on for both sides
   (4 cached views; the loop augments every epoch); the defaults' accuracy is also
   compared with the augmented loop's.
4. `bench_transfer`: few-shot TARGET_SHAPES, feature extraction from the source
   model against training from scratch (random weights), as feature extraction
   and as FULL training; averaged over seeds.
5. `bench_auto`: for target sets of several sizes, every explicit strategy and
   AUTO from the source model: AUTO's choice and its gap to the best strategy.

The two sides of a speed comparison run alternately (epoch by epoch in stage 2,
run by run in stage 3, each side first half of the time) and the figure is the
median of the per-pair ratios: the machine may be shared and noisy. Threads: torch's default (`torch.get_num_threads()`, printed).
The output ends with one `name: value` line per figure (`final_lines`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from bench import common  # noqa: E402
from bench.common import table  # noqa: E402
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb  # noqa: E402
from tlserve.service import backbones  # noqa: E402
from tlserve.service.manifest import Manifest  # noqa: E402
from tlserve.service.training import checkpoint, data, engine  # noqa: E402
from tlserve.service.training.config import STRATEGIES, TrainConfig  # noqa: E402
from tlserve.service.training.selfcheck import synthetic_manifest  # noqa: E402
from tlserve.service.training.synthetic import SOURCE_SHAPES, TARGET_SHAPES  # noqa: E402

S = pb.Strategy
NONE = backbones.WeightsChoice(kind="none")
FIGURES = (
    "full_finetune_speed_ratio",
    "feature_cache_speed_ratio",
    "feature_cache_accuracy_delta",
    "transfer_minus_scratch_accuracy",
    "auto_gap_to_best_points",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    backbone: str
    image_size: int  # pixels; the images are drawn at this size
    # source task (from scratch)
    source_train: int  # images per class
    source_epochs: int
    source_lr: float  # AdamW
    # stage 2: full fine-tune speed
    speed_train: int
    speed_epochs: int
    speed_repeats: int
    # stage 3: feature cache
    cache_train: int
    cache_repeats: int
    # stage 4: few-shot transfer
    fewshot_train: int
    fewshot_seeds: int
    # stage 5: AUTO against the best strategy
    auto_sizes: tuple[int, ...]
    auto_epochs: int  # 0: each strategy's default
    # evaluation split sizes, per class
    val: int = 5
    test: int = 30
    cache_epochs: int = 10  # the ten epochs
    baseline_full_lr: float = 1e-3  # the textbook fine-tuning rate (SGD, momentum 0.9)
    baseline_head_lr: float = 1e-2  # the textbook rate for a new head on frozen features


SETTINGS = {
    "quick": Settings(
        backbone="resnet18", image_size=32, source_train=150, source_epochs=15, source_lr=1e-3,
        speed_train=48, speed_epochs=5, speed_repeats=2, cache_train=48, cache_repeats=3,
        fewshot_train=8, fewshot_seeds=2, auto_sizes=(4, 20), auto_epochs=0, test=25,
    ),
    "full": Settings(
        backbone="resnet18", image_size=32, source_train=150, source_epochs=15, source_lr=1e-3,
        speed_train=128, speed_epochs=6, speed_repeats=3, cache_train=128, cache_repeats=5,
        fewshot_train=8, fewshot_seeds=3, auto_sizes=(4, 10, 20, 40, 60), auto_epochs=0, test=40,
    ),
}


# -- measuring the engine ------------------------------------------------------------


class Recorder:
    """A Reporter that keeps every JobEvent; never cancels."""

    def __init__(self) -> None:
        self.events: list[pb.JobEvent] = []

    def report(self, event: pb.JobEvent) -> None:
        self.events.append(event)

    def cancelled(self) -> bool:
        return False

    def reported_images_per_second(self) -> list[float]:
        # Progress.step's rate: images since the last report over the time since it,
        # a window that can span the previous epoch's validation and checkpoint.
        return [e.images_per_second for e in self.events if e.images_per_second > 0]


# The engine looks these up in its modules at call time, so wrapping the module
# attributes times every call fine_tune makes, without touching the engine.
PROFILED = {
    "prepare (build model, loaders)": (engine, "_prepare"),
    "decide strategy (AUTO probe)": (engine, "decide_strategy"),
    "feature cache": (engine, "build_feature_cache"),
    "train epochs (images)": (engine, "train_one_epoch"),
    "train epochs (cached features)": (engine, "train_head_one_epoch"),
    "fit the head (cached features)": (engine, "fit_feature_head"),
    "evaluate (whole model)": (engine, "evaluate"),
    "evaluate (head on cache)": (engine, "evaluate_head"),
    "checkpoint save": (checkpoint, "save"),
}


@contextlib.contextmanager
def profiled_engine(device: torch.device):
    """Yields a dict stage -> seconds, filled while the block runs fine_tune."""
    seconds: dict[str, float] = defaultdict(float)
    originals = {}

    def wrap(stage, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                _sync(device)
                seconds[stage] += time.perf_counter() - started

        return timed

    for stage, (module, name) in PROFILED.items():
        originals[stage] = getattr(module, name)
        setattr(module, name, wrap(stage, originals[stage]))
    try:
        yield seconds
    finally:
        for stage, (module, name) in PROFILED.items():
            setattr(module, name, originals[stage])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class EngineRun:
    result: engine.TrainResult
    seconds: dict[str, float]  # PROFILED stage -> seconds
    wall: float  # the whole fine_tune call
    reported_rates: list[float]

    @property
    def test_accuracy(self) -> float:
        return self.result.test.top1_accuracy


def engine_config(
    manifest: Manifest, settings: Settings, strategy: int, device: torch.device, *, seed: int,
    augment: bool | None = None, patience: int | None = None, **training,
) -> TrainConfig:
    """A TrainConfig as the service builds one from a request; unset fields keep
    the strategy's defaults (service/training/config.py)."""
    request = pb.FineTuneRequest(backbone=settings.backbone, strategy=strategy, image_size=settings.image_size, seed=seed)
    for name, value in training.items():
        setattr(request.training, name, value)
    if patience is not None:
        request.training.early_stopping.SetInParent()
        request.training.early_stopping.patience = patience
    if augment is not None:
        request.augmentation.enabled = augment
    counts = manifest.class_counts("train")
    return TrainConfig.from_request(
        request, num_classes=len(counts), train_images_per_class=sum(counts) / len(counts), device_type=device.type
    )


def run_engine(config: TrainConfig, manifest: Manifest, weights: backbones.WeightsChoice, device: torch.device, workdir: Path) -> EngineRun:
    """One fine_tune from a fresh checkpoint directory (an old one would resume)."""
    checkpoints = Path(tempfile.mkdtemp(prefix="ckpt-", dir=workdir))
    recorder = Recorder()
    try:
        with profiled_engine(device) as seconds:
            started = time.perf_counter()
            result = engine.fine_tune(
                config, manifest, weights=weights, weights_dir=workdir, checkpoint_dir=checkpoints, reporter=recorder, device=device
            )
            wall = time.perf_counter() - started
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return EngineRun(result, dict(seconds), wall, recorder.reported_images_per_second())


def source_weights(source: Pretrained) -> backbones.WeightsChoice:
    return backbones.WeightsChoice(kind="tlserve", state_dict=source.state_dict, preprocessing=source.preprocessing)


# -- the textbook loop -------------------------------------------------------------------


def baseline_model(backbone: str, num_classes: int, source: Pretrained | None) -> nn.Module:
    """torchvision's model, the source model's trunk weights (or random ones), and
    a new final Linear for `num_classes`."""
    model = torchvision.models.get_model(backbone, weights=None)
    if source is not None:
        trunk = {k.removeprefix("trunk."): v for k, v in source.state_dict.items() if k.startswith("trunk.")}
        missing, unexpected = model.load_state_dict(trunk, strict=False)
        if unexpected or any(not k.startswith(_final_linear_name(model)) for k in missing):
            raise RuntimeError(f"source weights do not fit {backbone}: missing {missing}, unexpected {unexpected}")
    name = _final_linear_name(model)
    final = model.get_submodule(name)
    model.set_submodule(name, nn.Linear(final.in_features, num_classes))
    return model


def _final_linear_name(model: nn.Module) -> str:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def baseline_loader(root: Path, transform, batch_size: int, device: torch.device, *, shuffle: bool, seed: int) -> DataLoader:
    """ImageFolder over one split of a write_image_folder tree. Same number of
    loader workers as the engine picks for that many images on `device` (none on
    the CPU or below 512 images), so the comparison is of the loops, not of
    decoding parallelism."""
    dataset = ImageFolder(str(root), transform=transform)
    generator = torch.Generator().manual_seed(seed)
    workers = data.worker_count(len(dataset), device.type)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator)


def baseline_train_one_epoch(model: nn.Module, loader: DataLoader, optimizer, criterion, device: torch.device) -> int:
    """The textbook epoch. -> images seen."""
    model.train()
    seen = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)  # (B, 3, H, W), (B,)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(labels)
    _sync(device)
    return seen


@torch.no_grad()
def baseline_evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images.to(device)).argmax(dim=1).cpu() == labels).sum().item()
        total += len(labels)
    return correct / max(1, total)


@dataclasses.dataclass
class BaselineRun:
    train_seconds: float  # the epochs alone
    wall: float  # model build + epochs
    images: int
    test_accuracy: float


class BaselineLoop:
    """The plain loop on `root`/{train,test} with the engine's transforms for
    `config` (same preprocessing, same augmentation): model, loader, SGD with
    momentum and cross-entropy, built once; `epoch()` runs one textbook epoch.
    `frozen`: every backbone parameter has requires_grad off and only the new
    Linear trains."""

    def __init__(self, root: Path, config: TrainConfig, source: Pretrained, device: torch.device, *, frozen: bool, lr: float) -> None:
        torch.manual_seed(config.seed)
        self.root, self.config, self.device = root, config, device
        classes = len(sorted(p.name for p in (root / "train").iterdir()))
        self.model = baseline_model(config.backbone, classes, source).to(device)
        if frozen:
            final = _final_linear_name(self.model)
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name.startswith(final + "."))
        self.preprocessing = data.resolve_preprocessing(source.preprocessing, config.image_size)
        self.train = baseline_loader(root / "train", data.train_transform(self.preprocessing, config), config.batch_size, device, shuffle=True, seed=config.seed)
        self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
        self.criterion = nn.CrossEntropyLoss()

    def epoch(self) -> int:
        """-> images seen."""
        return baseline_train_one_epoch(self.model, self.train, self.optimizer, self.criterion, self.device)

    def test_accuracy(self) -> float:
        test = baseline_loader(self.root / "test", data.eval_transform(self.preprocessing), self.config.batch_size, self.device, shuffle=False, seed=0)
        return baseline_evaluate(self.model, test, self.device)


def run_baseline(
    root: Path, config: TrainConfig, source: Pretrained, device: torch.device, *,
    frozen: bool, lr: float, epochs: int,
) -> BaselineRun:
    """`epochs` of the BaselineLoop, timed, then its test accuracy."""
    started = time.perf_counter()
    loop = BaselineLoop(root, config, source, device, frozen=frozen, lr=lr)
    train_seconds, images = 0.0, 0
    for _ in range(epochs):
        epoch_started = time.perf_counter()
        images += loop.epoch()
        train_seconds += time.perf_counter() - epoch_started
    wall = time.perf_counter() - started
    return BaselineRun(train_seconds, wall, images, loop.test_accuracy())


# -- datasets ---------------------------------------------------------------------------


def shapes(root: Path, classes, settings: Settings, *, train: int, seed: int, test: int | None = None) -> Manifest:
    """root/{train,val,test}/<class>/*.png, drawn once, and its manifest."""
    per_split = {"train": train, "val": settings.val, "test": settings.test if test is None else test}
    return synthetic_manifest(root, classes, per_split=per_split, size=settings.image_size, seed=seed)


# -- stages ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """The "pretrained" model every later stage starts from: what they read of it
    (`state_dict`, `preprocessing`, as on an engine.TrainResult) and how it was made."""

    state_dict: dict[str, torch.Tensor]
    preprocessing: backbones.Preprocessing
    test_accuracy: float
    epochs_run: int
    seconds: float  # training wall time when it was made
    from_cache: bool = False


def train_source(settings: Settings, device: torch.device, workdir: Path) -> Source:
    """The "pretrained" model: FULL from random weights on SOURCE_SHAPES, AdamW at
    one rate for every layer (a from-scratch recipe, not the fine-tuning defaults),
    no augmentation (the fastest to learn on a CPU budget)."""
    manifest = shapes(workdir / "source", SOURCE_SHAPES, settings, train=settings.source_train, seed=11, test=20)
    config = engine_config(
        manifest, settings, S.STRATEGY_FULL, device, seed=0, augment=False, patience=0,
        epochs=settings.source_epochs, optimizer=pb.OPTIMIZER_ADAMW, learning_rate=settings.source_lr,
        layer_lr_decay=1.0, label_smoothing=0.0, head_dropout=0.0, batch_size=16,  # twice the steps of 32
    )
    run = run_engine(config, manifest, NONE, device, workdir)
    return Source(run.result.state_dict, run.result.preprocessing, run.test_accuracy, run.result.epochs_run, run.wall)


# What the stages read of the source model: an engine result or a Source.
Pretrained = Source | engine.TrainResult

SOURCE_CACHE_FORMAT = 1


def source_cache_key(settings: Settings, device: torch.device) -> str:
    """Everything the source model depends on but the engine's code: settings of
    the source task, the shapes, the device type and the library versions."""
    fields = {
        "format": SOURCE_CACHE_FORMAT, "backbone": settings.backbone, "image_size": settings.image_size,
        "train": settings.source_train, "epochs": settings.source_epochs, "lr": settings.source_lr, "val": settings.val,
        "shapes": list(SOURCE_SHAPES), "device": device.type, "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def load_or_train_source(settings: Settings, device: torch.device, workdir: Path, cache_dir: Path | None) -> Source:
    """The source model from `cache_dir` when an earlier run with the same
    `source_cache_key` left it there, else trained now (and saved there). Training
    it is the costliest stage on a CPU (minutes) and it is an input of every
    comparison, not one of them, like downloaded pretrained weights."""
    path = cache_dir / f"source-{source_cache_key(settings, device)}.pt" if cache_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return Source(saved["state_dict"], backbones.Preprocessing(**saved["preprocessing"]), saved["test_accuracy"],
                      saved["epochs_run"], saved["seconds"], from_cache=True)
    source = train_source(settings, device, workdir)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        torch.save({"state_dict": source.state_dict, "preprocessing": dataclasses.asdict(source.preprocessing),
                    "test_accuracy": source.test_accuracy, "epochs_run": source.epochs_run, "seconds": source.seconds}, temp)
        temp.replace(path)
    return source


@contextlib.contextmanager
def paired_epochs(baseline: BaselineLoop, device: torch.device):
    """While the block runs fine_tune, every training epoch of the engine is paired
    with one epoch of `baseline`, run right before or after it (alternately, so
    neither side always follows the other): yields the list of pairs, each
    (ours images/s, baseline images/s). The two epochs of a pair are seconds apart,
    so a machine whose speed drifts (shared cores, clocks) slows both alike."""
    original = engine.train_one_epoch
    pairs: list[tuple[float, float]] = []

    def baseline_rate() -> float:
        started = time.perf_counter()
        images = baseline.epoch()
        return images / (time.perf_counter() - started)

    def paired(job, model, epoch):
        base = baseline_rate() if len(pairs) % 2 == 1 else None
        started = time.perf_counter()
        result = original(job, model, epoch)
        _sync(device)
        ours = len(job.train_loader.dataset) / (time.perf_counter() - started)
        if base is None:
            base = baseline_rate()
        pairs.append((ours, base))
        return result

    engine.train_one_epoch = paired
    try:
        yield pairs
    finally:
        engine.train_one_epoch = original


def bench_full_finetune(settings: Settings, source: Pretrained, device: torch.device, workdir: Path) -> dict:
    manifest = shapes(workdir / "speed", TARGET_SHAPES, settings, train=settings.speed_train, seed=21, test=4)
    config = engine_config(manifest, settings, S.STRATEGY_FULL, device, seed=0, patience=0, epochs=settings.speed_epochs)
    pairs, profiles, reported = [], [], []
    for repeat in range(settings.speed_repeats):
        baseline = BaselineLoop(manifest.root, config, source, device, frozen=False, lr=settings.baseline_full_lr)
        with paired_epochs(baseline, device) as repeat_pairs:
            run = run_engine(config, manifest, source_weights(source), device, workdir)
        # The first epoch of each side pays one-off costs (allocator growth, kernel
        # selection): counted for neither.
        pairs += repeat_pairs[1:]
        profiles.append(run.seconds | {"fine_tune total": run.wall})
        reported += run.reported_rates
    profile = {stage: statistics.median(p.get(stage, 0.0) for p in profiles) for stage in profiles[0]}
    ratios = sorted(o / b for o, b in pairs)
    return {
        "ours": [o for o, _ in pairs], "baseline": [b for _, b in pairs],
        "ratio": statistics.median(ratios),
        # The middle half of the per-pair ratios: how far one pair's figure can be trusted.
        "ratio_iqr": (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]),
        "profile": profile, "reported": reported, "images_per_epoch": len(manifest.samples("train")), "config": config,
    }


def bench_feature_cache(settings: Settings, source: Pretrained, device: torch.device, workdir: Path, *, augment: bool | None) -> dict:
    """`augment`: None keeps the engine's default; the baseline uses the same transforms."""
    manifest = shapes(workdir / "cache", TARGET_SHAPES, settings, train=settings.cache_train, seed=31)
    ours, baseline = [], []
    for repeat in range(settings.cache_repeats):
        config = engine_config(
            manifest, settings, S.STRATEGY_FEATURE_EXTRACTION, device, seed=repeat, augment=augment, patience=0,
            epochs=settings.cache_epochs, cache_features=True,
        )
        for side in ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours"):
            if side == "ours":
                run = run_engine(config, manifest, source_weights(source), device, workdir)
                # Everything but the final val + test evaluation of the best weights
                # (the only whole-model evaluations of a cached run).
                seconds = run.wall - run.seconds.get("evaluate (whole model)", 0.0)
                ours.append({"seconds": seconds, "accuracy": run.test_accuracy, "cache": run.seconds.get("feature cache", 0.0),
                             "views": config.cached_views if config.augment else 1, "profile": run.seconds | {"fine_tune total": run.wall}})
            else:
                run = run_baseline(manifest.root, config, source, device, frozen=True, lr=settings.baseline_head_lr, epochs=settings.cache_epochs)
                baseline.append({"seconds": run.wall, "accuracy": run.test_accuracy})
    ours_s = statistics.median(r["seconds"] for r in ours)
    base_s = statistics.median(r["seconds"] for r in baseline)
    ours_acc = statistics.mean(r["accuracy"] for r in ours)
    base_acc = statistics.mean(r["accuracy"] for r in baseline)
    ratio = statistics.median(b["seconds"] / o["seconds"] for o, b in zip(ours, baseline))  # per pair, as above
    return {"ours": ours, "baseline": baseline, "ratio": ratio, "median_seconds": (ours_s, base_s), "ours_accuracy": ours_acc,
            "baseline_accuracy": base_acc, "delta_points": 100 * (ours_acc - base_acc), "augment": config.augment,
            "defaults": augment is None,
            "train_images": len(manifest.samples("train"))}


def bench_transfer(settings: Settings, source: Pretrained, device: torch.device, workdir: Path) -> dict:
    """Few-shot target: feature extraction from the source model against random
    weights, both as feature extraction (the same config) and as FULL training of
    the whole network (what "from scratch" usually means); the better of the two
    scratch variants is the one compared."""
    rows = []
    for seed in range(settings.fewshot_seeds):
        manifest = shapes(workdir / f"fewshot-{seed}", TARGET_SHAPES, settings, train=settings.fewshot_train, seed=41 + seed)
        fe = engine_config(manifest, settings, S.STRATEGY_FEATURE_EXTRACTION, device, seed=seed)
        scratch_full = engine_config(
            manifest, settings, S.STRATEGY_FULL, device, seed=seed, optimizer=pb.OPTIMIZER_ADAMW,
            learning_rate=settings.source_lr, layer_lr_decay=1.0,
        )
        rows.append({
            "seed": seed,
            "transfer (feature extraction)": run_engine(fe, manifest, source_weights(source), device, workdir).test_accuracy,
            "scratch (feature extraction)": run_engine(fe, manifest, NONE, device, workdir).test_accuracy,
            "scratch (full)": run_engine(scratch_full, manifest, NONE, device, workdir).test_accuracy,
        })
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k != "seed"}
    best_scratch = max(mean["scratch (feature extraction)"], mean["scratch (full)"])
    return {"rows": rows, "mean": mean, "delta_points": 100 * (mean["transfer (feature extraction)"] - best_scratch)}


EXPLICIT = (S.STRATEGY_FEATURE_EXTRACTION, S.STRATEGY_PARTIAL, S.STRATEGY_FULL, S.STRATEGY_PROGRESSIVE_UNFREEZING, S.STRATEGY_PROTOTYPE)


def bench_auto(settings: Settings, source: Pretrained, device: torch.device, workdir: Path) -> dict:
    rows = []
    for size in settings.auto_sizes:
        manifest = shapes(workdir / f"auto-{size}", TARGET_SHAPES, settings, train=size, seed=51 + size)
        epochs = {"epochs": settings.auto_epochs} if settings.auto_epochs else {}
        accuracy = {}
        for strategy in EXPLICIT:
            extra = {} if strategy == S.STRATEGY_PROTOTYPE else epochs
            config = engine_config(manifest, settings, strategy, device, seed=0, **extra)
            accuracy[STRATEGIES[strategy]] = run_engine(config, manifest, source_weights(source), device, workdir).test_accuracy
        auto = run_engine(engine_config(manifest, settings, S.STRATEGY_AUTO, device, seed=0, **epochs), manifest, source_weights(source), device, workdir)
        best = max(accuracy, key=accuracy.get)
        d = auto.result.decision
        rows.append({
            "size": size, "accuracy": accuracy, "auto": auto.test_accuracy, "choice": STRATEGIES[d.strategy],
            "groups": d.trainable_groups, "probe": d.probe_accuracy, "chance": d.chance_accuracy,
            "best": best, "gap_points": 100 * (accuracy[best] - auto.test_accuracy),
        })
    return {"rows": rows, "worst_gap": max(r["gap_points"] for r in rows)}


# -- report ------------------------------------------------------------------------------


def final_lines(figures: dict[str, float]) -> list[str]:
    """`name: value`, any other figures first, then the required ones in FIGURES order."""
    return common.final_lines(figures, FIGURES)


def machine() -> dict[str, str]:
    return {
        "cpu": common.cpu_name(),
        "cores (usable)": str(data.available_cpus()),
        "torch threads": f"{torch.get_num_threads()} (torch default, not changed)",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def report_full_finetune(r: dict) -> str:
    n = len(r["ours"])
    rows = [[f"pair {i + 1}", r["ours"][i], r["baseline"][i], r["ours"][i] / r["baseline"][i]] for i in range(n)]
    rows.append(["median (ratio: of the pairs)", statistics.median(r["ours"]), statistics.median(r["baseline"]), r["ratio"]])
    low, high = r["ratio_iqr"]
    rows.append(["middle half of the pair ratios", "", "", f"{low:.3f} to {high:.3f}"])
    text = table(["FULL fine-tune, train images/s per epoch", "ours", "baseline", "ours / baseline"], rows)
    profile = table(["ours, per fine_tune call (median)", "seconds"], [[k, v] for k, v in r["profile"].items()])
    rates = r["reported"]
    note = (
        f"engine-reported images_per_second (JobEvent step windows; they can include validation "
        f"and checkpoint time of the previous epoch, so not comparable): median "
        f"{statistics.median(rates):.1f} over {len(rates)} events" if rates else "engine reported no images_per_second events"
    )
    return f"{text}\n\n{profile}\n{note}"


def report_feature_cache(r: dict) -> str:
    rows = []
    for i, (o, b) in enumerate(zip(r["ours"], r["baseline"])):
        rows.append([f"seed {i}", o["seconds"], o["cache"], b["seconds"], b["seconds"] / o["seconds"], o["accuracy"], b["accuracy"]])
    rows.append(["median / mean", statistics.median(o["seconds"] for o in r["ours"]), statistics.median(o["cache"] for o in r["ours"]),
                 statistics.median(b["seconds"] for b in r["baseline"]), r["ratio"], r["ours_accuracy"], r["baseline_accuracy"]])
    profile = {stage: statistics.median(o["profile"].get(stage, 0.0) for o in r["ours"]) for stage in r["ours"][0]["profile"]}
    profile_text = table(["ours, per fine_tune call (median)", "seconds"], [[k, v] for k, v in profile.items()])
    title = (f"10-epoch feature extraction{' (defaults)' if r['defaults'] else ''}, augment {'on' if r['augment'] else 'off'} "
             f"({r['ours'][0]['views']} cached view(s))")
    return table([title, "ours s", "of it cache s", "baseline s", "speed-up", "ours test acc", "baseline test acc"], rows) + "\n\n" + profile_text


def report_transfer(r: dict) -> str:
    keys = [k for k in r["rows"][0] if k != "seed"]
    rows = [[f"seed {row['seed']}"] + [row[k] for k in keys] for row in r["rows"]]
    rows.append(["mean"] + [r["mean"][k] for k in keys])
    return table(["few-shot test accuracy"] + keys, rows)


def report_auto(r: dict) -> str:
    rows = []
    for row in r["rows"]:
        rows.append([f"{row['size']}/class", f"{row['choice']} ({row['groups']} groups)", f"{row['probe']:.3f} vs {row['chance']:.3f}",
                     row["auto"], row["best"], row["accuracy"][row["best"]], f"{row['gap_points']:.1f}"]
                    + [row["accuracy"][STRATEGIES[s]] for s in EXPLICIT])
    headers = ["train set", "AUTO's choice", "probe vs chance", "AUTO acc", "best", "best acc", "gap pts"] + [STRATEGIES[s] for s in EXPLICIT]
    return table(headers, rows)


# -- main ---------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = SETTINGS["quick" if args.quick else "full"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = print
    say(f"# tlserve fine-tuning benchmarks ({'--quick' if args.quick else 'full'}), {datetime.datetime.now().isoformat(timespec='seconds')}")
    say(table(["machine", ""], [[k, v] for k, v in machine().items()] + [["device", str(device)]]))
    say("\nsettings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()))
    say("speed comparisons alternate ours/baseline; a ratio is the median of the per-pair ratios; accuracies are means over seeds.\n")
    workdir = Path(tempfile.mkdtemp(prefix="tlserve-bench-", dir=args.tmp))
    figures: dict[str, float] = {}
    try:
        source = load_or_train_source(settings, device, workdir, None if args.retrain_source else args.cache_dir)
        say(f"source model: {settings.backbone} from scratch on {len(SOURCE_SHAPES)} SOURCE_SHAPES, "
            f"{settings.source_train}/class, {source.epochs_run} epochs in {source.seconds:.0f} s"
            f"{' (an earlier run, loaded from ' + str(args.cache_dir) + ')' if source.from_cache else ''}: "
            f"test accuracy {source.test_accuracy:.3f} (chance {1 / len(SOURCE_SHAPES):.3f})\n")

        full = bench_full_finetune(settings, source, device, workdir)
        say(f"## 1. full fine-tune throughput: {full['images_per_epoch']} images × {settings.speed_epochs} epochs, "
            f"batch {full['config'].batch_size}, training epochs only")
        say(report_full_finetune(full) + "\n")
        figures["full_finetune_speed_ratio"] = full["ratio"]

        say("## 2. feature extraction with the feature cache against the frozen-backbone loop (wall time of training)")
        cache = {}
        for augment in (None, True):
            cache[augment] = bench_feature_cache(settings, source, device, workdir, augment=augment)
            say(report_feature_cache(cache[augment]) + "\n")
        vs_augmented = 100 * (cache[None]["ours_accuracy"] - cache[True]["baseline_accuracy"])
        say(f"defaults ({'augmentation on' if cache[None]['augment'] else 'no augmentation'}, cached) against the augmented "
            f"frozen-backbone loop: {vs_augmented:+.2f} points of test accuracy\n")
        figures["feature_cache_speed_ratio"] = cache[None]["ratio"]
        figures["feature_cache_accuracy_delta"] = cache[None]["delta_points"]

        say(f"## 3. transfer against scratch, {settings.fewshot_train} training images per class, {settings.test}/class test")
        transfer = bench_transfer(settings, source, device, workdir)
        say(report_transfer(transfer) + "\n(compared with the better scratch variant)\n")
        figures["transfer_minus_scratch_accuracy"] = transfer["delta_points"]

        say("## 4. AUTO against the best explicit strategy (test accuracy, from the source model)")
        auto = bench_auto(settings, source, device, workdir)
        say(report_auto(auto) + "\n")
        figures["auto_gap_to_best_points"] = auto["worst_gap"]

        figures["feature_cache_speed_ratio_augmented"] = cache[True]["ratio"]
        figures["feature_cache_accuracy_delta_augmented"] = cache[True]["delta_points"]
        figures["feature_cache_defaults_minus_augmented_loop_accuracy"] = vs_augmented
        figures["source_test_accuracy"] = source.test_accuracy
        figures["runtime_seconds"] = time.perf_counter() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say("\n".join(final_lines(figures)))
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few repeats: a few minutes on 2 CPU cores")
    parser.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temporary datasets go (default: the system's)")
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent.parent / "var" / "bench-cache",
                        help="where the trained source model is kept between runs (default: var/bench-cache)")
    parser.add_argument("--retrain-source", action="store_true", help="train the source model even when one is cached (and don't keep it)")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
