"""The training loop: `fine_tune(config, manifest, ...)` turns a dataset manifest
and a backbone into trained weights with their validation and test reports.

It reads top to bottom as the stages of a job:

1. set up: the process group under torchrun, seeds, the device's precision;
2. build the model (`backbones.build`) and the datasets from the manifest;
3. decide the strategy (AUTO measures the data, `strategies.decide`);
4. the validation protocol (`protocol.choose`): which images train, and whether
   val chooses the published epoch (enough val images per class) or every asked
   epoch runs and the last is published;
5. PROTOTYPE and FEATURE_EXTRACTION (cached): the head is computed in closed form
   or fitted to its optimum on cached frozen features of several views, done;
6. otherwise train epoch by epoch, `train_one_epoch` on images, or
   `train_head_one_epoch` on cached features while the backbone is frozen;
   evaluate on val, keep the best weights and stop early (holdout protocol only),
   checkpoint;
7. load the published weights and evaluate them on val and test.

A job killed at any point is resumed by calling `fine_tune` again with the same
arguments: it continues after the last checkpointed epoch and, on the CPU with
the same seed, ends with the same weights and metrics as an unbroken run.

Progress goes to a `Reporter` (phase changes, about once a second while
stepping, every epoch end); its `cancelled()` is polled every step.

Distributed (`WORLD_SIZE` > 1, launched by torchrun): each process trains on its
shard (DistributedSampler) with batch_size // world_size images per step, so the
global batch is the one-process batch; DDP averages the gradients. Rank 0 alone
evaluates, reports and checkpoints, and broadcasts its validation metrics so that
every rank takes the same early-stopping decision; the result is returned on
rank 0 (None elsewhere). Feature-cached epochs run identically on every rank
(same cache, same seeded order), and rank 0's head is broadcast after each so the
ranks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones
from tlserve.service.errors import InvalidArgument
from tlserve.service.manifest import Manifest
from tlserve.service.training import checkpoint, data, protocol, strategies
from tlserve.service.training.config import TrainConfig, epoch_repeats
from tlserve.service.training.devices import (
    Processes,
    autocast,
    autocast_dtype,
    broadcast,
    seed_everything,
    setup_processes,
    to_device,
    wrap_ddp,
)
from tlserve.service.training.features import FeatureCache, build_feature_cache, frozen_features
from tlserve.service.training.evaluation import report_from_predictions
from tlserve.service.training.optim import OPTIMIZERS, SCHEDULES
from tlserve.service.training.progress import Progress

log = logging.getLogger("tlserve.training")

S = pb.Strategy


class Reporter(Protocol):
    def report(self, event: pb.JobEvent) -> None: ...

    def cancelled(self) -> bool: ...


@dataclasses.dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]  # the best epoch's BuiltModel.model, on the CPU
    class_names: list[str]
    preprocessing: backbones.Preprocessing  # at the trained resolution
    val: pb.EvaluationReport  # of the best weights
    test: pb.EvaluationReport
    decision: pb.StrategyDecision
    config: TrainConfig  # AUTO resolved
    best_epoch: int  # 1-based
    epochs_run: int
    parameter_count: int


# -- one epoch ---------------------------------------------------------------------------


@dataclasses.dataclass
class EpochStats:
    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> EpochStats:
        return cls(torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.detach().double() * len(labels)
        self.correct += (logits.detach().argmax(dim=1) == labels).sum()
        self.seen += len(labels)

    def totals(self, procs: Processes, device: torch.device) -> tuple[float, float]:
        """(mean loss, accuracy) over every rank's images."""
        values = [self.loss_sum.item(), float(self.correct.item()), float(self.seen)]
        if procs.distributed:
            tensor = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(tensor)
            values = tensor.tolist()
        return values[0] / max(1, values[2]), values[1] / max(1, values[2])

    def running(self) -> dict:
        return {"train_loss": self.loss_sum.item() / max(1, self.seen), "train_accuracy": self.correct.item() / max(1, self.seen)}


def _optimiser_step(job: _Job, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    job.scaler.scale(loss).backward()
    if job.config.grad_clip_norm > 0:
        job.scaler.unscale_(job.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(params, job.config.grad_clip_norm)
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.optimizer.zero_grad(set_to_none=True)
    job.scheduler.step()


def _learn(job: _Job, stats: EpochStats, params: list[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
           *, epoch: int, step_in_epoch: int, steps_in_epoch: int) -> None:
    """One optimiser step on a batch's logits (B, C) and labels (B,), counted in
    `stats` and reported: what both epoch loops do with every batch."""
    loss = job.criterion(logits.float(), labels)
    _optimiser_step(job, loss, params)
    stats.add(loss, logits, labels)
    job.step += 1
    job.progress.step(
        epoch=epoch + 1, step=job.step, steps_in_epoch=steps_in_epoch, step_in_epoch=step_in_epoch,
        images=len(labels), stats=lambda: {**stats.running(), "learning_rate": job.head_lr()},
    )


def train_one_epoch(job: _Job, model: nn.Module, epoch: int) -> tuple[float, float]:
    """One pass over the training images through `model` (DDP-wrapped or not).
    -> (mean loss, accuracy) of the epoch's augmented batches."""
    loader = job.train_loader
    data.set_loader_epoch(loader, job.config.seed, epoch)
    stats = EpochStats.zeros(job.device)
    params = [p for p in job.built.model.parameters() if p.requires_grad]
    for i, (images, labels) in enumerate(loader):
        job.check()
        images = to_device(images, job.device)  # (B, 3, H, W)
        labels = labels.to(job.device, non_blocking=True)  # (B,)
        with autocast(job.device, job.amp):
            logits = model(images)  # (B, C)
        _learn(job, stats, params, logits, labels, epoch=epoch, step_in_epoch=i + 1, steps_in_epoch=len(loader))
    return stats.totals(job.procs, job.device)


def train_head_one_epoch(job: _Job, cache: FeatureCache, epoch: int) -> tuple[float, float]:
    """One epoch over the cached features through the head alone: each image is
    read `job.repeats` times, each read one of its cached views drawn at random.
    Same batch size and step count as `train_one_epoch` in one process.
    -> (mean loss, accuracy)."""
    head = job.built.head
    views, count, _ = cache.train.shape
    generator = torch.Generator().manual_seed(job.config.seed * 1_000_003 + epoch)
    # `job.repeats` shuffled passes, as the image loader reads a Repeated set.
    order = torch.cat([torch.randperm(count, generator=generator) for _ in range(job.repeats)])  # (R·N,)
    view = torch.randint(views, (len(order),), generator=generator)  # (R·N,): a view per read
    batch = job.config.batch_size
    steps = math.ceil(len(order) / batch)
    stats = EpochStats.zeros(job.device)
    params = [p for p in head.parameters() if p.requires_grad]
    for i in range(steps):
        job.check()
        reads = slice(i * batch, (i + 1) * batch)
        index = order[reads]  # (B,)
        features = cache.train[view[reads], index].to(job.device, non_blocking=True)  # (B, D)
        labels = cache.train_labels[index].to(job.device, non_blocking=True)  # (B,)
        logits = head(features)  # (B, C)
        _learn(job, stats, params, logits, labels, epoch=epoch, step_in_epoch=i + 1, steps_in_epoch=steps)
    if job.procs.distributed:
        # Every rank ran the same steps on the same data; rank 0's head is the
        # reference, so floating-point drift between ranks can't accumulate.
        for tensor in head.state_dict().values():
            dist.broadcast(tensor, src=0)
    return stats.totals(Processes(), job.device)  # identical on every rank: no reduction


# -- evaluation --------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    class_names: list[str],
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
    check: Callable[[], None] | None = None,
) -> pb.EvaluationReport:
    """`model` in eval mode over every image of `loader`: its report, with the
    loss as plain cross-entropy (no label smoothing)."""
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        if check is not None:
            check()
        with autocast(device, autocast_dtype):
            logits.append(model(to_device(images, device)).float().cpu())  # (B, C)
        labels.append(targets)
    return _report(logits, labels, class_names)


@torch.no_grad()
def evaluate_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, class_names: list[str], device: torch.device) -> pb.EvaluationReport:
    """The head alone on cached features (N, D): the same numbers as `evaluate`
    on the whole model while the trunk is frozen."""
    head.eval()
    logits = [head(chunk.to(device)).float().cpu() for chunk in features.split(1024)] if len(features) else []
    return _report(logits, [labels] if logits else [], class_names)


def _report(logits: list[torch.Tensor], labels: list[torch.Tensor], class_names: list[str]) -> pb.EvaluationReport:
    all_logits = torch.cat(logits) if logits else torch.zeros(0, len(class_names))  # (N, C)
    all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)  # (N,)
    loss = nn.functional.cross_entropy(all_logits, all_labels).item() if len(all_labels) else 0.0
    return report_from_predictions(all_labels, all_logits, class_names, loss)


# -- the job -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """Everything a stage of `fine_tune` needs: built once, passed along."""

    config: TrainConfig
    manifest: Manifest
    plan: protocol.Protocol  # which images train; whether val chooses the weights
    built: object  # backbones.BuiltModel
    preprocessing: backbones.Preprocessing
    device: torch.device
    procs: Processes
    amp: torch.dtype | None
    progress: Progress
    train_set: data.ImageDataset  # augmented
    repeats: int  # reads of train_set per epoch (config.epoch_repeats)
    train_eval_set: data.ImageDataset  # the eval transform on training images
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    class_names: list[str]
    criterion: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LRScheduler = None
    scaler: torch.amp.GradScaler = None
    step: int = 0

    def check(self) -> None:
        self.progress.check_cancelled()

    def head_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def fine_tune(
    config: TrainConfig,
    manifest: Manifest,
    *,
    weights: backbones.WeightsChoice,
    weights_dir: Path,
    checkpoint_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
) -> TrainResult | None:
    """Trains per `config` on `manifest`'s splits, resuming from
    `checkpoint_dir/last.pt` when there is one. None on ranks other than 0."""
    device = device or _default_device()
    procs = setup_processes(device)
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _fine_tune(config, manifest, weights, Path(weights_dir), Path(checkpoint_dir), reporter, device, procs)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if procs.owns_group:
            dist.destroy_process_group()


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _fine_tune(config, manifest, weights, weights_dir, checkpoint_dir, reporter, device, procs) -> TrainResult | None:
    progress = Progress(reporter, procs, device, config.epochs)
    progress.phase(pb.JOB_PHASE_PREPARING, f"building {config.backbone} for {len(manifest.class_names)} classes")
    _check_manifest(manifest)
    seed_everything(config.seed)
    plan = protocol.choose(manifest, config.source_request())
    job = _prepare(config, manifest, plan, weights, weights_dir, device, procs, progress)
    ckpt_path = checkpoint.path_in(checkpoint_dir)
    state = checkpoint.load(ckpt_path)
    fingerprint = _fingerprint(config, manifest)
    if state is not None and state.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: it was written for other settings or data", ckpt_path)
        state = None

    if state is not None:
        decision = pb.StrategyDecision.FromString(state["decision"])
    else:
        decision = decide_strategy(job)
        decision.validation_protocol, decision.validation_reason = plan.kind, plan.reason
        progress.phase(pb.JOB_PHASE_PREPARING, f"validation: {plan.reason}")
    if config.strategy == S.STRATEGY_AUTO:
        job.config = config = config.resolved(decision.strategy, decision.trainable_groups)
        progress.total_epochs = config.epochs
    elif config.strategy == S.STRATEGY_PARTIAL and not config.trainable_groups:
        job.config = config = dataclasses.replace(config, trainable_groups=decision.trainable_groups)
    if config.strategy == S.STRATEGY_PROTOTYPE:
        return fit_prototype(job, decision)
    if config.strategy == S.STRATEGY_FEATURE_EXTRACTION and config.cache_features:
        return fit_feature_head(job, decision)
    return train(job, decision, state, ckpt_path, fingerprint)


def _check_manifest(manifest: Manifest) -> None:
    counts = manifest.class_counts("train")
    empty = [name for name, count in zip(manifest.class_names, counts) if count == 0]
    if empty:
        raise InvalidArgument(f"dataset {manifest.id}: classes {', '.join(empty)} have no training images")


def _fingerprint(config: TrainConfig, manifest: Manifest) -> str:
    digest = hashlib.sha256(config.to_request().SerializeToString(deterministic=True))
    digest.update(manifest.to_json().encode())
    return digest.hexdigest()


def _prepare(config, manifest, plan, weights, weights_dir, device, procs, progress) -> _Job:
    """The model on its device and the datasets and loaders of the three splits,
    train and val as the validation protocol `plan` assigns them."""
    built = backbones.build(
        config.backbone,
        len(manifest.class_names),
        weights=weights,
        weights_dir=weights_dir,
        head_dropout=config.head_dropout,
        image_size=config.image_size or None,
    )
    built.model.to(device)
    if device.type == "cuda":
        built.model.to(memory_format=torch.channels_last)
    preprocessing = data.resolve_preprocessing(built.preprocessing, config.image_size)
    eval_tf = data.eval_transform(preprocessing)
    train_set = data.ImageDataset(plan.train, data.train_transform(preprocessing, config))
    train_eval_set = data.ImageDataset(plan.train, eval_tf)
    val_set = data.ImageDataset(plan.val, eval_tf)
    test_set = data.ImageDataset(manifest.samples("test"), eval_tf)
    per_process_batch = max(1, config.batch_size // procs.world_size)
    repeats = epoch_repeats(len(train_set), config.batch_size, config.min_steps_per_epoch)
    if repeats > 1:
        progress.phase(pb.JOB_PHASE_PREPARING, f"each epoch reads the {len(train_set)} training images {repeats} times, "
                       f"with fresh augmentation each time: at least {config.min_steps_per_epoch} steps of {config.batch_size}")
    return _Job(
        config=config,
        manifest=manifest,
        plan=plan,
        built=built,
        preprocessing=preprocessing,
        device=device,
        procs=procs,
        amp=autocast_dtype(config, device),
        progress=progress,
        train_set=train_set,
        repeats=repeats,
        train_eval_set=train_eval_set,
        train_loader=data.make_loader(
            data.Repeated(train_set, repeats), per_process_batch, shuffle=True, device=device, seed=config.seed, rank=procs.rank, world_size=procs.world_size
        ),
        # Evaluation runs on rank 0 alone, over the whole split: no sampler padding
        # duplicates images, and the numbers equal a one-process run's.
        val_loader=data.make_loader(val_set, config.batch_size, shuffle=False, device=device),
        test_loader=data.make_loader(test_set, config.batch_size, shuffle=False, device=device),
        class_names=list(manifest.class_names),
    )


# -- stage: decide ----------------------------------------------------------------------


def decide_strategy(job: _Job) -> pb.StrategyDecision:
    """AUTO: measure the data and apply the table (strategies.decide); otherwise
    record the caller's choice."""
    config, built = job.config, job.built
    num_classes = len(job.class_names)
    images_per_class = len(job.train_set) / num_classes
    below = len(strategies.groups_below_head(built))
    if config.strategy != S.STRATEGY_AUTO:
        groups = {
            S.STRATEGY_PARTIAL: min(config.trainable_groups, below) if config.trainable_groups
            else strategies.default_partial_groups(below),
            S.STRATEGY_FULL: below,
            S.STRATEGY_PROGRESSIVE_UNFREEZING: _progressive_reach(config, below),
        }.get(config.strategy, 0)
        return strategies.requested(config.strategy, images_per_class, num_classes, groups)
    if config.from_scratch:
        return strategies.from_scratch(images_per_class, num_classes, below)
    job.progress.phase(pb.JOB_PHASE_CACHING_FEATURES, "probing frozen features to choose a strategy")
    labels = [label for _, label in job.train_eval_set.samples]
    subset = strategies.probe_subset(labels, num_classes, config.seed)
    features, probe_labels = frozen_features(
        built.trunk, torch.utils.data.Subset(job.train_eval_set, subset), batch_size=config.batch_size,
        device=job.device, dtype=job.amp, check=job.check, seed=config.seed,
    )
    probe = strategies.probe_accuracy(features, probe_labels, num_classes)
    decision = strategies.decide(images_per_class, probe, num_classes, below)
    if decision.strategy == S.STRATEGY_PROGRESSIVE_UNFREEZING:
        decision.trainable_groups = _progressive_reach(config.resolved(decision.strategy, 0), below)
    job.progress.phase(pb.JOB_PHASE_PREPARING, f"AUTO: {decision.reason}")
    return decision


def _progressive_reach(config: TrainConfig, below: int) -> int:
    """Groups below the head that progressive unfreezing has unfrozen by its last
    epoch (phase 0 trains the head alone)."""
    return min((config.epochs - 1) // config.epochs_per_phase, below)


# -- stage: prototype -----------------------------------------------------------------


def _cached_views(job: _Job) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every cached view of every training image as rows: features (V·N, D), labels
    (V·N,), and the image each row is a view of (V·N,)."""
    job.progress.total_epochs = 1
    cache = build_feature_cache(job)
    views, count, dim = cache.train.shape
    strategies.freeze(job.built, [])
    return cache.train.reshape(views * count, dim), cache.train_labels.repeat(views), torch.arange(count).repeat(views)


def fit_prototype(job: _Job, decision: pb.StrategyDecision) -> TrainResult | None:
    """Nearest class mean in the metric of the classes' shared covariance (shrunk
    towards the identity) as a Linear head; no gradient steps. With augmentation on
    (the default) the means and the covariance take every cached view of every image."""
    features, labels, images = _cached_views(job)
    strategies.set_prototype_head(job.built, features, labels, len(job.class_names), images)
    return finish(job, decision, best_state=None, best_epoch=1, epochs_run=1)


def fit_feature_head(job: _Job, decision: pb.StrategyDecision) -> TrainResult | None:
    """FEATURE_EXTRACTION on cached features: the new head is a multinomial logistic
    regression fitted to its optimum (L-BFGS) on every cached view of the training
    images, its L2 strength chosen by cross-validation over images
    (`strategies.fit_linear_probe`). A convex fit has no epochs to choose and no
    learning rate to get wrong: on real digits at 3 per class it scored 79 where
    epochs of AdamW at 1e-2 on one cached view scored 72 (docs/benchmarks.md).

    With no class holding two images the head is the prototype's instead, class means
    imprinted as weights (Qi et al. 2018; `gaussian_prototype_weights`): on real
    one-shot faces the fit scored 4.2 points below the plain frozen loop."""
    features, labels, images = _cached_views(job)
    classes = len(job.class_names)
    per_class = strategies.images_per_class(labels, images, classes)
    if int(per_class.max()) < 2:
        job.progress.phase(pb.JOB_PHASE_TRAINING, f"one image per class: the head is imprinted with the class means of "
                           f"{len(features)} cached views (a fit to one image's views learns its crops, not its class)")
        strategies.set_prototype_head(job.built, features, labels, classes, images)
        return finish(job, decision, best_state=None, best_epoch=1, epochs_run=1)
    job.progress.phase(pb.JOB_PHASE_TRAINING, f"fitting the head on {len(features)} cached views (logistic regression, L-BFGS)")
    probe = strategies.fit_linear_probe(features.to(job.device), labels, classes, seed=job.config.seed, groups=images)
    strategies.set_head(job.built, probe.weight, probe.bias)
    chosen = "cross-validated" if probe.cross_validated else "the default: too few images per class for folds"
    job.progress.phase(pb.JOB_PHASE_TRAINING, f"head fitted with L2 strength {probe.weight_decay:g} ({chosen})")
    return finish(job, decision, best_state=None, best_epoch=1, epochs_run=1)


# -- stage: train -----------------------------------------------------------------------


def train(job: _Job, decision, state: dict | None, ckpt_path: Path, fingerprint: str) -> TrainResult | None:
    config, built, procs = job.config, job.built, job.procs
    steps_per_epoch = len(job.train_loader)
    total_steps = config.epochs * steps_per_epoch
    job.progress.total_steps = total_steps
    job.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    groups = strategies.param_groups(
        built, learning_rate=config.learning_rate, layer_lr_decay=config.layer_lr_decay, weight_decay=config.weight_decay
    )
    job.optimizer = OPTIMIZERS[config.optimizer](groups, config)
    factor = SCHEDULES[config.schedule](total_steps, round(config.warmup_epochs * steps_per_epoch))
    job.scheduler = torch.optim.lr_scheduler.LambdaLR(job.optimizer, factor)
    job.scaler = torch.amp.GradScaler(job.device.type, enabled=job.amp == torch.float16)

    # The loop's memory: what a checkpoint saves and a resume restores.
    start_epoch, best_metric, best_epoch, bad_epochs = 0, None, 0, 0
    best_state, history = None, []
    changing = _changing_keys(job)
    if state is not None:
        _load_changing(built.model, state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
        job.scheduler.load_state_dict(state["scheduler"])
        job.scaler.load_state_dict(state["scaler"])
        start_epoch, best_metric, best_epoch = state["epoch"], state["best_metric"], state["best_epoch"]
        bad_epochs, best_state, history = state["bad_epochs"], state["best_state"], state["history"]
        job.step = state["step"]
        checkpoint.set_rng_state(state["rng"])
        job.progress.epochs_before = start_epoch
        job.progress.phase(pb.JOB_PHASE_PREPARING, f"resumed after epoch {start_epoch} from {ckpt_path.name}", epoch=start_epoch)

    cache: FeatureCache | None = None
    ddp: nn.Module | None = None
    frozen_batchnorm = config.batchnorm_statistics == "frozen"
    trainable_names: list[str] | None = None
    stop = bool(state and state.get("stopped"))
    for epoch in range(start_epoch, 0 if stop else config.epochs):
        trainable = strategies.trainable_at(
            config.strategy, built, epoch=epoch, trainable_groups=config.trainable_groups, epochs_per_phase=config.epochs_per_phase
        )
        names = [g.name for g in trainable]
        if names != trainable_names:
            if trainable_names is not None:
                bad_epochs = 0  # a new phase gets its full patience
            strategies.freeze(built, trainable)
            trainable_names, ddp = names, None
            job.progress.unfrozen = names
        strategies.set_train_mode(built, trainable, frozen_batchnorm=frozen_batchnorm)
        use_cache = config.cache_features and strategies.backbone_frozen(built, trainable)
        job.progress.start_epoch()

        if use_cache:
            if cache is None:
                cache = build_feature_cache(job)
            strategies.set_train_mode(built, trainable, frozen_batchnorm=frozen_batchnorm)
            train_loss, train_acc = train_head_one_epoch(job, cache, epoch)
        else:
            if procs.distributed and ddp is None:
                ddp = wrap_ddp(built.model, job.train_eval_set[0][0], job.device)
            train_loss, train_acc = train_one_epoch(job, ddp or built.model, epoch)

        job.progress.phase(pb.JOB_PHASE_EVALUATING, f"epoch {epoch + 1}: evaluating on val", epoch=epoch + 1)
        val_loss, val_acc = 0.0, 0.0
        if procs.main:
            val = (
                evaluate_head(built.head, cache.val, cache.val_labels, job.class_names, job.device)
                if use_cache
                else evaluate(built.model, job.val_loader, job.class_names, job.device, autocast_dtype=job.amp,
                              check=None if procs.distributed else job.check)
            )
            val_loss, val_acc = val.loss, val.top1_accuracy
        val_loss, val_acc = broadcast([val_loss, val_acc], procs, job.device)

        # Best weights and early stopping, under the holdout protocol only: otherwise
        # (too few val images to choose with) every epoch counts as the best, so the
        # last is published and nothing stops early.
        metric = val_acc if config.stop_metric == "val_accuracy" else val_loss
        sign = 1.0 if config.stop_metric == "val_accuracy" else -1.0
        selects = job.plan.selects_weights and len(job.val_loader.dataset) > 0
        if not selects or best_metric is None or sign * (metric - best_metric) > config.min_delta:
            best_metric, best_epoch, bad_epochs = metric, epoch + 1, 0
            best_state = _changing_state(built.model, changing) if selects else None
        else:
            bad_epochs += 1
        stop = selects and job.plan.patience > 0 and bad_epochs >= job.plan.patience
        history.append(
            {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
             "val_accuracy": val_acc, "learning_rate": job.head_lr(), "unfrozen_groups": names}
        )

        if procs.main:
            checkpoint.save(
                {
                    "format": 1,
                    "fingerprint": fingerprint,
                    "decision": decision.SerializeToString(),
                    "epoch": epoch + 1,
                    "step": job.step,
                    "model": _changing_state(built.model, changing),
                    "optimizer": job.optimizer.state_dict(),
                    "scheduler": job.scheduler.state_dict(),
                    "scaler": job.scaler.state_dict(),
                    "best_metric": best_metric,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "bad_epochs": bad_epochs,
                    "stopped": stop,
                    "history": history,
                    "rng": checkpoint.rng_state(),
                },
                ckpt_path,
            )
        job.progress.end_epoch(
            epoch=epoch + 1, step=job.step, train_loss=train_loss, train_accuracy=train_acc, val_loss=val_loss,
            val_accuracy=val_acc, learning_rate=job.head_lr(),
            message=f"epoch {epoch + 1}/{config.epochs}: val accuracy {val_acc:.3f}, loss {val_loss:.4f}"
            + (f"; early stop, best epoch {best_epoch}" if stop else ""),
        )
        if stop:
            break
    epochs_run = len(history)
    return finish(job, decision, best_state=best_state, best_epoch=best_epoch, epochs_run=epochs_run)


def _cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _changing_keys(job: _Job) -> frozenset[str]:
    """State-dict keys this run's training can change: the parameters of every group
    trainable at the last epoch (unfreezing only ever adds groups) and the buffers of
    the modules that own them (BatchNorm statistics). Everything else keeps its
    starting value, which a resumed run rebuilds from the same weights and seed, so
    checkpoints and the best-epoch copy hold only these keys: with a frozen backbone
    that is the head alone, and saving it costs microseconds, not a whole model."""
    config = job.config
    last = strategies.trainable_at(
        config.strategy, job.built, epoch=config.epochs - 1, trainable_groups=config.trainable_groups,
        epochs_per_phase=config.epochs_per_phase,
    )
    params = {id(p) for group in last for p in group.parameters()}
    keys: set[str] = set()
    for name, module in job.built.model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if any(id(p) in params for _, p in own):
            prefix = f"{name}." if name else ""
            keys.update(prefix + n for n, _ in own)
            keys.update(prefix + n for n, _ in module.named_buffers(recurse=False))
    return frozenset(keys)


def _changing_state(model: nn.Module, keys: frozenset[str]) -> dict[str, torch.Tensor]:
    return _cpu_copy({k: v for k, v in model.state_dict().items() if k in keys})


def _load_changing(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a `_changing_state` over the starting weights; any key it has must exist."""
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"checkpoint keys the model does not have: {unexpected[:5]}")


# -- stage: finish -----------------------------------------------------------------------


def finish(job: _Job, decision, *, best_state, best_epoch: int, epochs_run: int) -> TrainResult | None:
    """The best weights, evaluated on val and test (rank 0 only)."""
    built = job.built
    if best_state is not None:
        _load_changing(built.model, best_state)
    if not job.procs.main:
        return None
    job.progress.phase(pb.JOB_PHASE_EVALUATING, f"evaluating the best epoch ({best_epoch}) on val and test", epoch=epochs_run)
    check = None if job.procs.distributed else job.check
    val = evaluate(built.model, job.val_loader, job.class_names, job.device, autocast_dtype=job.amp, check=check)
    test = evaluate(built.model, job.test_loader, job.class_names, job.device, autocast_dtype=job.amp, check=check)
    job.progress.phase(
        pb.JOB_PHASE_EVALUATING,
        f"best epoch {best_epoch}: val accuracy {val.top1_accuracy:.3f}, test accuracy {test.top1_accuracy:.3f}",
        epoch=epochs_run, val_loss=val.loss, val_accuracy=val.top1_accuracy,
    )
    return TrainResult(
        state_dict=_cpu_copy(built.model.state_dict()),
        class_names=list(job.class_names),
        preprocessing=job.preprocessing,
        val=val,
        test=test,
        decision=decision,
        config=job.config,
        best_epoch=best_epoch,
        epochs_run=epochs_run,
        parameter_count=sum(p.numel() for p in built.model.parameters()),
    )
