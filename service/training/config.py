"""A fine-tune's settings with every default resolved: `TrainConfig`.

The job worker turns a `FineTuneRequest` into a `TrainConfig` once
(`TrainConfig.from_request`), which validates every field (an out-of-range value
raises `InvalidArgument` naming the field) and fills the defaults of the chosen
strategy; the engine reads nothing else. `to_request` gives the request back as
the job ran it, defaults filled, for the model's lineage. A request with
strategy AUTO keeps AUTO here: the engine measures the data, decides, and calls
`resolved(strategy, trainable_groups)`, which re-applies the same request with
the strategy the decision picked, so the defaults of that strategy apply to
whatever the caller left unset.

Defaults per strategy (a field the caller set always wins):

| strategy              | how the head/network is fitted                  | lr    | epochs | warmup | augment |
| --------------------- | ----------------------------------------------- | ----- | ------ | ------ | ------- |
| FEATURE_EXTRACTION    | logistic regression on cached views (L-BFGS) ** | -     | -      | -      | 8 views |
|                       | (one image per class: the prototype's head)     |       |        |        |         |
| PARTIAL (top half)    | AdamW, one rate for every trained layer          | 3e-4  | 15     | 1 ep.* | on      |
| FULL                  | AdamW, one rate for every layer                  | 3e-4  | 20     | 1 ep.* | on      |
| PROGRESSIVE (3/phase) | AdamW, one rate                                  | 1e-3  | 15     | 0      | on      |
| PROTOTYPE             | shrunk-covariance class means on cached views   | -     | 1      | 0      | 8 views |
| from scratch          | AdamW, one rate for every layer                  | 1e-3  | 30     | 1 ep.* | on      |

(* one warmup epoch when there are at least 5 epochs, else none. ** with
`cache_features` (the default); uncached, the head trains by epochs of AdamW at
1e-2, with augmentation, like the other strategies.)

These are the recipes that matched or beat a plain PyTorch loop on real few-shot
images (bench/accuracy.py; docs/benchmarks.md, "accuracy"). What they replaced and
why, measured on scanned digits at 3 images per class (resnet18, 32 px): SGD with
a rate halved per layer group below the head (the stem at 1e-3 × 0.5⁵) scored
61 where AdamW at one rate of 3e-4 scored 84, as the plain loop's 84; label
smoothing 0.1 and head dropout 0.2 cost few-shot sets accuracy and are now off;
the random resized crop keeps at least 80 % of the eval crop's area, around it (35 %
of the raw image cut digits apart) and there are no flips or rotations unless asked: a flipped or rotated glyph can
be another class, which no default may assume. Feature extraction fitted by
epochs of AdamW on one cached view scored 71; the convex fit on the eval view and 8
augmented views scores 79 (the plain frozen-backbone loop: 74), and the shrunk-
covariance prototype 82 where plain nearest class mean scored 69.

Everywhere: cosine schedule, weight decay 1e-4, no gradient clipping, momentum
0.9 (SGD), mixed precision bf16/fp16 on CUDA and fp32 on CPU. BatchNorm running
statistics update as the layers train, except in a full fine-tune of trained
weights whose steps see fewer than 6 images: it keeps the weights' own
(`default_batchnorm`; on faces at one image per class 64 → 79). Early stopping
(patience 5 on validation accuracy) and best-epoch selection run only under the
holdout validation protocol, which needs enough validation images per class
(`service.training.protocol`). Batch size: 32, or less for a tiny training set
(the largest power of two that gives at least 4 steps per epoch, at least 8).
A training set smaller than 4 batches is read several times an epoch, each read
a fresh augmented view, so that every epoch takes at least 4 steps
(`epoch_repeats`; from scratch at 1 per class textures 43 -> 64;
`training.min_steps_per_epoch` sets the 4, and 1 turns it off), and a batch is no
larger than the set where the set has at least 6 images (`step_batch`).
"""

from __future__ import annotations

import dataclasses
import math

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.errors import InvalidArgument

S = pb.Strategy
STRATEGIES = {
    S.STRATEGY_FEATURE_EXTRACTION: "feature_extraction",
    S.STRATEGY_PARTIAL: "partial",
    S.STRATEGY_FULL: "full",
    S.STRATEGY_PROGRESSIVE_UNFREEZING: "progressive_unfreezing",
    S.STRATEGY_PROTOTYPE: "prototype",
    S.STRATEGY_AUTO: "auto",
}
OPTIMIZERS = {pb.OPTIMIZER_SGD: "sgd", pb.OPTIMIZER_ADAMW: "adamw"}
SCHEDULES = {
    pb.LR_SCHEDULE_UNSPECIFIED: "cosine",
    pb.LR_SCHEDULE_COSINE: "cosine",
    pb.LR_SCHEDULE_ONE_CYCLE: "one_cycle",
    pb.LR_SCHEDULE_CONSTANT: "constant",
}
PRECISIONS = {
    pb.MIXED_PRECISION_UNSPECIFIED: "auto",
    pb.MIXED_PRECISION_OFF: "off",
    pb.MIXED_PRECISION_FP16: "fp16",
    pb.MIXED_PRECISION_BF16: "bf16",
}
BATCHNORM = {
    pb.BATCHNORM_STATISTICS_UNSPECIFIED: "auto",
    pb.BATCHNORM_STATISTICS_UPDATE: "update",
    pb.BATCHNORM_STATISTICS_FROZEN: "frozen",
}
STOP_METRICS = {
    pb.STOP_METRIC_UNSPECIFIED: "val_accuracy",
    pb.STOP_METRIC_VAL_ACCURACY: "val_accuracy",
    pb.STOP_METRIC_VAL_LOSS: "val_loss",
}


@dataclasses.dataclass(frozen=True)
class StrategyDefaults:
    optimizer: str
    learning_rate: float
    layer_lr_decay: float
    epochs: int
    warmup: bool  # one warmup epoch when epochs >= 5
    augmentation: bool


DEFAULTS: dict[int, StrategyDefaults] = {
    S.STRATEGY_FEATURE_EXTRACTION: StrategyDefaults("adamw", 1e-2, 1.0, 15, False, True),
    S.STRATEGY_PARTIAL: StrategyDefaults("adamw", 3e-4, 1.0, 15, True, True),
    S.STRATEGY_FULL: StrategyDefaults("adamw", 3e-4, 1.0, 20, True, True),
    S.STRATEGY_PROGRESSIVE_UNFREEZING: StrategyDefaults("adamw", 1e-3, 1.0, 15, False, True),
    S.STRATEGY_PROTOTYPE: StrategyDefaults("adamw", 1e-3, 1.0, 1, False, True),
    # AUTO until the engine resolves it; these only make the config complete.
    S.STRATEGY_AUTO: StrategyDefaults("adamw", 3e-4, 1.0, 15, False, True),
}
SCRATCH = StrategyDefaults("adamw", 1e-3, 1.0, 30, True, True)
# Augmentation, label-safe by default: a mild crop and nothing that turns one class
# into another (a flipped "b" is a "d", a rotated "6" a "9"); callers turn more on.
CROP_MIN_SCALE = 0.8
HORIZONTAL_FLIP = False
ROTATION_DEGREES = 0.0
COLOR_JITTER = 0.0
LABEL_SMOOTHING = 0.0
HEAD_DROPOUT = 0.0
TRAINS_BACKBONE = frozenset({S.STRATEGY_PARTIAL, S.STRATEGY_FULL, S.STRATEGY_PROGRESSIVE_UNFREEZING})
EPOCHS_PER_PHASE = 3
CACHED_VIEWS = 8
PATIENCE = 5
MAX_BATCH = 32
# An epoch takes at least this many optimiser steps: a training set smaller than
# this many batches is read several times per epoch (`epoch_repeats`).
MIN_STEPS_PER_EPOCH = 4
# Below this many images per training step (per process), a job that starts from
# trained weights keeps their BatchNorm running statistics instead of re-estimating
# them from each tiny batch (measured: docs/benchmarks.md, "accuracy").
BATCHNORM_FROZEN_BELOW = 6


def _check(ok: bool, field: str, value, rule: str) -> None:
    if not ok:
        raise InvalidArgument(f"{field} is {value!r}; it must be {rule}")


def _default_batch_size(num_classes: int, images_per_class: float) -> int:
    # At least 4 optimiser steps per epoch on a tiny training set: 8 × 3 classes ->
    # 24 images -> batch 8 (3 steps rounded down to a power of two), never below 8.
    total = max(1, int(num_classes * images_per_class))
    batch = MAX_BATCH
    while batch > 8 and total // batch < 4:
        batch //= 2
    return batch


def epoch_repeats(train_images: int, batch_size: int, min_steps: int = MIN_STEPS_PER_EPOCH) -> int:
    """How many times one epoch reads the training set, each read drawing fresh
    augmented views: enough reads for `min_steps` steps of `batch_size`
    (`training.min_steps_per_epoch`, MIN_STEPS_PER_EPOCH unless set).

    The batch-size default stops at 8, so below 32 images an epoch was one to
    three steps and 30 epochs were 30 to 90 updates. Reading the set again within
    the epoch (repeated augmentation: timm's RepeatAugSampler; Hoffer et al. 2020)
    gives every epoch at least 4. Measured on real sets at 1 and 3 images per
    class, 3 seeds, 30 epochs (docs/benchmarks.md, "accuracy"), mean test top-1
    once -> repeated: from scratch digits 65.6 -> 67.3 and 80.8 -> 81.3, faces
    70.0 -> 69.6 and 71.2 -> 91.7, textures 43.2 -> 64.2 and 54.8 -> 66.0; FULL
    from trained weights digits 67.9 -> 75.7 and 82.3 -> 86.9, faces 78.3 -> 76.7
    and 88.3 -> 87.1, textures 56.6 -> 61.4 and 66.9 -> 66.1. Images per epoch
    grow, not epochs: an explicit `epochs` keeps its meaning."""
    if train_images <= 0 or batch_size <= 0:
        return 1
    return max(1, math.ceil(min_steps * batch_size / train_images))


def step_batch(train_images: int, batch_size: int) -> int:
    """The batch size a job trains with: `batch_size`, or the training set's size
    when the set is smaller and has at least BATCHNORM_FROZEN_BELOW images.

    Read once an epoch, a set smaller than the batch was one step of every image;
    read several times (`epoch_repeats`), a batch larger than the set holds images
    twice, and BatchNorm's batch statistics lean on them: one faces split at 3 per
    class (6 images) fell from 88 to 56 with FULL at batch 8 and scored 85 at
    batch 6 (the reads of an epoch are shuffled together, so a batch of the set's
    size can still hold an image twice, but holds each once on average). Below
    BATCHNORM_FROZEN_BELOW images a step keeps the larger batch (statistics from 2
    to 5 images are too few either way, and at 1 per class batches of 8 scored
    higher: from scratch textures 64.2 against 56.3)."""
    if BATCHNORM_FROZEN_BELOW <= train_images < batch_size:
        return train_images
    return batch_size


def default_batchnorm(strategy: int, *, from_scratch: bool, batch_size: int, train_images: float, processes: int) -> str:
    """"frozen" when a full fine-tune of trained weights takes training steps of
    fewer than BATCHNORM_FROZEN_BELOW images in a process, else "update".

    A step's batch is the batch size or the whole training set if smaller, split
    across the processes. Statistics estimated from 2 to 5 images swing with every
    step and end far from those of the images the model is evaluated on; the loaded
    weights' statistics are the better estimate then (Keras's transfer-learning
    guide keeps BatchNorm in inference mode when fine-tuning for the same reason).
    Measured on real sets (3 seeds each, in two families of splits), kept minus
    updated statistics for FULL: at steps of 2, 3 and 5 images (one per class)
    +10.9 and +15.0, +1.0 and +1.2, +3.4 and +0.9 points; at 6 images +2.1 and
    -2.9, at 8 from -2.7 to +5.0, so those update. PARTIAL (+5.4, -2.4, -2.2, +2.9)
    and progressive unfreezing (+2.1, -2.8, -5.1, +0.9) keep their lower groups
    frozen with their statistics anyway and update the rest. Random weights have
    no statistics worth keeping."""
    step_images = min(batch_size, max(1, int(train_images))) // max(1, processes)
    tiny = step_images < BATCHNORM_FROZEN_BELOW
    return "frozen" if strategy == S.STRATEGY_FULL and not from_scratch and tiny else "update"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # What and how.
    backbone: str
    strategy: int  # pb.Strategy value; AUTO until the engine resolves it
    trainable_groups: int  # PARTIAL: groups trained below the head
    image_size: int  # 0: the weights' own crop size
    seed: int
    devices: int
    # Optimisation.
    epochs: int
    batch_size: int  # global: split across processes under DDP
    optimizer: str  # key of optim.OPTIMIZERS
    learning_rate: float  # the head's
    layer_lr_decay: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str  # key of optim.SCHEDULES
    warmup_epochs: float
    label_smoothing: float
    head_dropout: float
    grad_clip_norm: float  # 0: off
    stop_metric: str  # "val_accuracy" or "val_loss"
    patience: int  # 0: no early stopping
    min_delta: float
    cache_features: bool
    cached_views: int
    mixed_precision: str  # "auto", "off", "fp16", "bf16"; always "off" on CPU
    epochs_per_phase: int
    batchnorm_statistics: str  # "update" or "frozen"
    min_steps_per_epoch: int  # a smaller set is read several times an epoch (epoch_repeats)
    # Augmentation, training images only.
    augment: bool
    crop_min_scale: float
    horizontal_flip: bool
    rotation_degrees: float
    color_jitter: float
    # Where it came from: the request (serialised) and the data figures the
    # defaults were derived from, so that `resolved` can re-derive them.
    request: bytes = dataclasses.field(repr=False, default=b"")
    num_classes: int = 0
    train_images_per_class: float = 0.0
    device_type: str = "cpu"

    @property
    def strategy_name(self) -> str:
        return STRATEGIES[self.strategy]

    @property
    def from_scratch(self) -> bool:
        """Random initial weights: nothing pretrained to keep or to probe."""
        return self.source_request().weights.WhichOneof("source") == "scratch"

    # -- proto -> config ------------------------------------------------------

    @classmethod
    def from_request(
        cls, request: pb.FineTuneRequest, *, num_classes: int, train_images_per_class: float, device_type: str
    ) -> TrainConfig:
        """Validates `request` and fills the defaults of its strategy (table above)."""
        t, a = request.training, request.augmentation
        _check(request.strategy in STRATEGIES or request.strategy == S.STRATEGY_UNSPECIFIED, "strategy", request.strategy, "a Strategy value")
        strategy = request.strategy or S.STRATEGY_AUTO
        from_scratch = request.weights.WhichOneof("source") == "scratch"
        d = SCRATCH if from_scratch and strategy in TRAINS_BACKBONE else DEFAULTS[strategy]

        def opt(message, field: str, default):
            return getattr(message, field) if message.HasField(field) else default

        epochs = opt(t, "epochs", d.epochs)
        _check(1 <= epochs <= 1000, "training.epochs", epochs, "in 1..1000")
        batch_size = opt(t, "batch_size", _default_batch_size(num_classes, train_images_per_class))
        _check(1 <= batch_size <= 4096, "training.batch_size", batch_size, "in 1..4096")
        batch_size = step_batch(round(num_classes * train_images_per_class), batch_size)
        _check(t.optimizer == pb.OPTIMIZER_UNSPECIFIED or t.optimizer in OPTIMIZERS, "training.optimizer", t.optimizer, "an Optimizer value")
        optimizer = OPTIMIZERS.get(t.optimizer, d.optimizer)
        learning_rate = opt(t, "learning_rate", d.learning_rate)
        _check(math.isfinite(learning_rate) and 0 < learning_rate <= 10, "training.learning_rate", learning_rate, "in (0, 10]")
        layer_lr_decay = opt(t, "layer_lr_decay", d.layer_lr_decay)
        _check(0 < layer_lr_decay <= 1, "training.layer_lr_decay", layer_lr_decay, "in (0, 1]")
        momentum = opt(t, "momentum", 0.9)
        _check(0 <= momentum < 1, "training.momentum", momentum, "in [0, 1)")
        nesterov = opt(t, "nesterov", optimizer == "sgd" and momentum > 0)
        _check(not (nesterov and optimizer == "sgd" and momentum == 0), "training.nesterov", nesterov, "false when training.momentum is 0")
        weight_decay = opt(t, "weight_decay", 1e-4)
        _check(0 <= weight_decay <= 1, "training.weight_decay", weight_decay, "in [0, 1]")
        _check(t.schedule in SCHEDULES, "training.schedule", t.schedule, "an LrSchedule value")
        warmup = opt(t, "warmup_epochs", 1.0 if d.warmup and epochs >= 5 else 0.0)
        _check(0 <= warmup <= epochs, "training.warmup_epochs", warmup, f"in [0, epochs={epochs}]")
        label_smoothing = opt(t, "label_smoothing", LABEL_SMOOTHING)
        _check(0 <= label_smoothing < 1, "training.label_smoothing", label_smoothing, "in [0, 1)")
        head_dropout = opt(t, "head_dropout", HEAD_DROPOUT)
        _check(0 <= head_dropout < 1, "training.head_dropout", head_dropout, "in [0, 1)")
        grad_clip = opt(t, "grad_clip_norm", 0.0)
        _check(math.isfinite(grad_clip) and grad_clip >= 0, "training.grad_clip_norm", grad_clip, ">= 0")
        es = t.early_stopping
        _check(es.metric in STOP_METRICS, "training.early_stopping.metric", es.metric, "a StopMetric value")
        patience = es.patience if t.HasField("early_stopping") else PATIENCE
        _check(0 <= patience <= 1000, "training.early_stopping.patience", patience, "in 0..1000")
        _check(math.isfinite(es.min_delta) and es.min_delta >= 0, "training.early_stopping.min_delta", es.min_delta, ">= 0")
        cache_features = opt(t, "cache_features", True)
        cached_views = opt(t, "cached_views", CACHED_VIEWS)
        _check(1 <= cached_views <= 64, "training.cached_views", cached_views, "in 1..64")
        _check(t.mixed_precision in PRECISIONS, "training.mixed_precision", t.mixed_precision, "a MixedPrecision value")
        epochs_per_phase = opt(t, "epochs_per_phase", EPOCHS_PER_PHASE)
        _check(1 <= epochs_per_phase <= 1000, "training.epochs_per_phase", epochs_per_phase, "in 1..1000")
        min_steps = opt(t, "min_steps_per_epoch", MIN_STEPS_PER_EPOCH)
        _check(1 <= min_steps <= 1000, "training.min_steps_per_epoch", min_steps, "in 1..1000")
        _check(t.batchnorm_statistics in BATCHNORM, "training.batchnorm_statistics", t.batchnorm_statistics, "a BatchNormStatistics value")
        batchnorm = BATCHNORM[t.batchnorm_statistics]
        if batchnorm == "auto":
            batchnorm = default_batchnorm(
                strategy, from_scratch=from_scratch, batch_size=batch_size,
                train_images=num_classes * train_images_per_class, processes=request.devices or 1,
            )

        min_scale = opt(a, "random_crop_min_scale", CROP_MIN_SCALE)
        _check(0 < min_scale <= 1, "augmentation.random_crop_min_scale", min_scale, "in (0, 1]")
        rotation = opt(a, "rotation_degrees", ROTATION_DEGREES)
        _check(0 <= rotation <= 180, "augmentation.rotation_degrees", rotation, "in [0, 180]")
        jitter = opt(a, "color_jitter", COLOR_JITTER)
        _check(0 <= jitter <= 1, "augmentation.color_jitter", jitter, "in [0, 1]")

        _check(request.trainable_groups >= 0, "trainable_groups", request.trainable_groups, ">= 0")
        _check(0 <= request.devices <= 1024, "devices", request.devices, "in 0..1024")
        _check(request.image_size == 0 or 16 <= request.image_size <= 4096, "image_size", request.image_size, "0 or in 16..4096")
        _check(device_type in ("cpu", "cuda"), "device_type", device_type, "'cpu' or 'cuda'")
        _check(num_classes >= 2, "dataset", f"{num_classes} classes", "at least 2 classes")

        return cls(
            backbone=request.backbone,
            strategy=strategy,
            trainable_groups=request.trainable_groups,  # 0: the top half, resolved by the engine
            image_size=request.image_size,
            seed=request.seed,
            devices=request.devices or 1,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            learning_rate=learning_rate,
            layer_lr_decay=layer_lr_decay,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            schedule=SCHEDULES[t.schedule],
            warmup_epochs=warmup,
            label_smoothing=label_smoothing,
            head_dropout=head_dropout,
            grad_clip_norm=grad_clip,
            stop_metric=STOP_METRICS[es.metric],
            patience=patience,
            min_delta=es.min_delta,
            cache_features=cache_features,
            cached_views=cached_views,
            mixed_precision="off" if device_type == "cpu" else PRECISIONS[t.mixed_precision],
            epochs_per_phase=epochs_per_phase,
            batchnorm_statistics=batchnorm,
            min_steps_per_epoch=min_steps,
            augment=opt(a, "enabled", d.augmentation),
            crop_min_scale=min_scale,
            horizontal_flip=opt(a, "horizontal_flip", HORIZONTAL_FLIP),
            rotation_degrees=rotation,
            color_jitter=jitter,
            request=request.SerializeToString(deterministic=True),
            num_classes=num_classes,
            train_images_per_class=train_images_per_class,
            device_type=device_type,
        )

    def resolved(self, strategy: int, trainable_groups: int) -> TrainConfig:
        """This config's request run with `strategy` (AUTO's choice): that strategy's
        defaults fill whatever the caller left unset."""
        request = self.source_request()
        request.strategy = strategy
        request.trainable_groups = trainable_groups
        return TrainConfig.from_request(
            request,
            num_classes=self.num_classes,
            train_images_per_class=self.train_images_per_class,
            device_type=self.device_type,
        )

    def source_request(self) -> pb.FineTuneRequest:
        return pb.FineTuneRequest.FromString(self.request)

    # -- config -> proto ------------------------------------------------------

    def to_request(self) -> pb.FineTuneRequest:
        """The request as the job ran it: the caller's identity fields (dataset,
        model name, weights, labels, key) and every option with its value filled."""
        request = self.source_request()
        request.backbone = self.backbone
        request.strategy = self.strategy
        request.trainable_groups = self.trainable_groups
        request.image_size = self.image_size
        request.seed = self.seed
        request.devices = self.devices
        t = request.training
        t.epochs = self.epochs
        t.batch_size = self.batch_size
        t.optimizer = {v: k for k, v in OPTIMIZERS.items()}[self.optimizer]
        t.learning_rate = self.learning_rate
        t.layer_lr_decay = self.layer_lr_decay
        t.momentum = self.momentum
        t.nesterov = self.nesterov
        t.weight_decay = self.weight_decay
        t.schedule = {v: k for k, v in SCHEDULES.items() if k}[self.schedule]
        t.warmup_epochs = self.warmup_epochs
        t.label_smoothing = self.label_smoothing
        t.head_dropout = self.head_dropout
        t.grad_clip_norm = self.grad_clip_norm
        t.early_stopping.metric = {v: k for k, v in STOP_METRICS.items() if k}[self.stop_metric]
        t.early_stopping.patience = self.patience
        t.early_stopping.min_delta = self.min_delta
        t.cache_features = self.cache_features
        t.cached_views = self.cached_views
        # "auto" stays UNSPECIFIED: the engine picks bf16 or fp16 by the device.
        t.mixed_precision = {v: k for k, v in PRECISIONS.items()}[self.mixed_precision]
        t.epochs_per_phase = self.epochs_per_phase
        t.batchnorm_statistics = {v: k for k, v in BATCHNORM.items() if k}[self.batchnorm_statistics]
        t.min_steps_per_epoch = self.min_steps_per_epoch
        a = request.augmentation
        a.enabled = self.augment
        a.random_crop_min_scale = self.crop_min_scale
        a.horizontal_flip = self.horizontal_flip
        a.rotation_degrees = self.rotation_degrees
        a.color_jitter = self.color_jitter
        return request
