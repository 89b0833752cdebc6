"""What trains, at what rate: freezing, discriminative learning rates, the
prototype head, and AUTO's choice of strategy.

A backbone is a list of layer groups, bottom to top, the last being the head
(`backbones.BuiltModel.groups`). A strategy is a rule for which of them train in
a given epoch (`trainable_at`): FEATURE_EXTRACTION the head, PARTIAL the head and
the top N groups, FULL everything, PROGRESSIVE_UNFREEZING one more group per
phase, top down; PROTOTYPE none (its head is computed, not learned: the class
means in the metric of the classes' shared covariance, shrunk towards the identity
by the Ledoit-Wolf intensity, `gaussian_prototype_weights`; linear discriminant
analysis with equal priors, which on real digits at 3 and 10 per class scored 12 to
13 points above the plain Euclidean class means, `prototype_weights`, that AUTO's
probe still uses). Frozen groups
have `requires_grad` off and run in eval mode even while the model trains, so
BatchNorm neither uses batch statistics nor updates its running ones, and dropout
and stochastic depth are off: a frozen trunk computes exactly the features a
feature cache would hold.

AUTO (`decide`) follows the design's size × similarity table, with the rows that
real images did not bear out replaced by what they measured (bench/accuracy.py:
scanned digits, faces, textures, each from a source model of the same or a
related kind; docs/benchmarks.md, "accuracy").

- size: training images per class. At least `LARGE_IMAGES_PER_CLASS` (200) is
  large: between Oxford-IIIT Pets (~100 per class, where fine-tuning the whole
  network overfits) and Food-101 (750 per class, where it pays).
- small (below 200 per class) → FULL, whatever the probe says. On the real sets
  at 1, 20 and 50 per class, full fine-tuning with the measured recipe (AdamW at
  one rate, crops around the eval view) was the best or near it, while the
  frozen-feature heads that the generated shapes had favoured for "similar" data
  (probe scores 0.17 to 0.9 on the real sets) lost up to 20 points to it (digits at
  one image per class: prototype 50, full 66), and progressive unfreezing swung by
  10 points and more between seeds.
- except from 2 to 14 per class (`PROGRESSIVE_BAND_PER_CLASS`) →
  PROGRESSIVE_UNFREEZING: at 10 per class, over 6 seeds per set (the benchmark's
  own splits and the engine runs' splits, 3 each), it scored digits 91.5, faces
  95.2, textures 76.2, against partial's 91.8, 95.2, 74.4 and full's 90.0, 94.0,
  74.5. At 3 per class, since a tiny set is read several times an epoch
  (`config.epoch_repeats`), it scored digits 85.2, faces 92.1, textures 65.1 (3
  seeds), within 2.0 of the best on each, where full scored 86.9, 87.1, 66.1 (5.0
  below on faces) and partial 84.5, 89.2, 67.1. At 1 per class full (digits, 5
  images) or partial (faces, textures: under 5 images) was best, progressive 2.5
  to 10 points below.
- but in the band's low part (under `FULL_LOW_BAND_PER_CLASS`, 5.5 per class) with
  at least `FULL_MIN_IMAGES_LOW_BAND` (12) images in all → FULL: MNIST (28x28
  handwriting from a source of the same kind, 3 seeds) at 3 per class scored 81.6
  with full fine-tuning and 77.7 with progressive unfreezing, digits 86.9 and 85.2,
  while the sets of 6 and 9 images (faces, textures) did better with progressive
  (92.1 against 87.1) or partial. At 10 per class progressive stayed ahead on MNIST
  too (88.4 against full's 81.1).
- tiny (fewer than `FULL_MIN_TRAINING_IMAGES` (5) training images in all, e.g. one
  image of each of 2 or 3 classes) → PARTIAL with the top half of the groups: a full
  fine-tune moves every layer, BatchNorm statistics included, on two or three
  images, and it collapsed to chance in 2 of 6 such runs (faces 45 %, textures
  37 %), where the top half alone was within 1 point of the best strategy on both.
- similarity: a nearest-class-mean probe on frozen pretrained features of the
  training images, leave-one-out (each image is scored against class means that
  exclude it, so no data is held back from a few-shot set), at most
  `PROBE_MAX_IMAGES_PER_CLASS` images per class. Its accuracy is normalised
  against chance, (acc - 1/C) / (1 - 1/C), so 2 and 200 classes compare; at least
  `SIMILAR_MIN_SCORE` (0.25) is similar. It decides the large rows only: large &
  similar → PARTIAL with the top half of the groups (at least 2); large &
  different → FULL.

CompareBackbones ranks backbones by a trained linear probe on frozen features
(`fit_linear_probe`: logistic regression, L-BFGS, L2 chosen by cross-validation on
the training features), a stronger and costlier judge than AUTO's class means.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

LARGE_IMAGES_PER_CLASS = 200
FULL_MIN_TRAINING_IMAGES = 5
# At 10 images per class progressive unfreezing was within 0.4 points of the best
# strategy on every real set in two families of splits (6 seeds per set), at 3 per
# class within 2.0 (full 5.0 below on faces); at 1 per class it was 2.5 to 10
# below. The band's ends are the geometric midpoints of 1 and 3 (1.7) and of 10
# and 20.
PROGRESSIVE_BAND_PER_CLASS = (2, 15)
# In the band's low part a set of at least FULL_MIN_IMAGES_LOW_BAND images takes a
# full fine-tune: at 3 per class, 15 images of handwriting (digits, MNIST) scored
# 1.7 and 3.9 points more with FULL than with progressive unfreezing, while 6 and 9
# images (faces, textures) scored 5.0 and 1.0 less. 5.5 per class is the geometric
# midpoint of 3 and 10 (at 10 progressive was the best or within 1.6 on all four
# sets, FULL 2 to 7 below it on handwriting); 12 of 9 and 15.
FULL_LOW_BAND_PER_CLASS = 5.5
FULL_MIN_IMAGES_LOW_BAND = 12
SIMILAR_MIN_SCORE = 0.25
PROBE_MAX_IMAGES_PER_CLASS = 64

S = pb.Strategy


# -- which groups train -------------------------------------------------------


def groups_below_head(built) -> list:
    return list(built.groups[:-1])


def default_partial_groups(groups_below: int) -> int:
    """PARTIAL's groups when the caller leaves trainable_groups 0: the top half, at
    least 2. On real few-shot digits the top group alone scored 80 against 86 for the
    top 3 of resnet18's 5 (the plain full fine-tune: 84; docs/benchmarks.md)."""
    return min(groups_below, max(2, math.ceil(groups_below / 2)))


def trainable_at(strategy: int, built, *, epoch: int, trainable_groups: int, epochs_per_phase: int) -> list:
    """The layer groups (head last) that train in 0-based `epoch`."""
    below = groups_below_head(built)
    head = built.groups[-1]
    if strategy == S.STRATEGY_PROTOTYPE:
        return []
    if strategy == S.STRATEGY_FEATURE_EXTRACTION:
        top = 0
    elif strategy == S.STRATEGY_PARTIAL:
        top = trainable_groups
    elif strategy == S.STRATEGY_FULL:
        top = len(below)
    elif strategy == S.STRATEGY_PROGRESSIVE_UNFREEZING:
        top = epoch // epochs_per_phase  # phase 0: the head alone
    else:
        raise ValueError(f"strategy {pb.Strategy.Name(strategy)} has no training schedule")
    top = min(top, len(below))
    return [*below[len(below) - top :], head]


def phase_of(strategy: int, built, *, epoch: int, epochs_per_phase: int) -> int:
    """0-based phase: changes when the set of trainable groups does."""
    if strategy != S.STRATEGY_PROGRESSIVE_UNFREEZING:
        return 0
    return min(epoch // epochs_per_phase, len(groups_below_head(built)))


def freeze(built, trainable: Sequence) -> None:
    """`requires_grad` on for the parameters of `trainable` groups only."""
    train_ids = {id(p) for group in trainable for p in group.parameters()}
    for p in built.model.parameters():
        p.requires_grad_(id(p) in train_ids)


def set_train_mode(built, trainable: Sequence, *, frozen_batchnorm: bool = False) -> None:
    """model.train(), then every module of a frozen group back to eval mode, and
    with `frozen_batchnorm` every BatchNorm too: it normalises with the running
    statistics it was loaded with and keeps them, while its scale and shift
    still train where their group does.

    Layers in no group (pooling, and torchvision's own dropout before the cut
    classifier: MobileNetV2, EfficientNet, GoogLeNet, Inception, MNASNet) sit at
    the top of the trunk and follow the top group below the head: in eval mode
    while it is frozen, so that a frozen trunk's features are deterministic."""
    built.model.train()
    trainable_names = {group.name for group in trainable}
    for group in built.groups:
        if group.name not in trainable_names:
            for module in group.modules:
                module.eval()
    below = groups_below_head(built)
    if below and below[-1].name not in trainable_names:
        grouped = {id(m) for group in built.groups for top in group.modules for m in top.modules()}
        for module in built.trunk.modules():
            if id(module) not in grouped and not any(True for _ in module.children()):
                module.eval()
    if frozen_batchnorm:
        for module in built.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def backbone_frozen(built, trainable: Sequence) -> bool:
    """Only the head trains: features can be computed once and cached."""
    return len(trainable) == 1 and trainable[0] is built.groups[-1]


# -- discriminative learning rates ---------------------------------------------


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    # Biases and normalisation scales/shifts (all 1-D) are not decayed: decaying
    # them pulls BatchNorm/LayerNorm gains towards 0 and regularises nothing useful.
    return p.ndim <= 1


def param_groups(built, *, learning_rate: float, layer_lr_decay: float, weight_decay: float) -> list[dict]:
    """One or two optimiser param groups per layer group: the head at
    `learning_rate`, the group k below it at learning_rate × layer_lr_decay**k;
    each split into decayed weights and undecayed biases/norms. Every group is
    listed, frozen or not: a parameter without a gradient is skipped by SGD and
    AdamW, so progressive unfreezing needs no new optimiser per phase."""
    result = []
    for k, group in enumerate(reversed(built.groups)):  # k = 0 is the head
        lr = learning_rate * layer_lr_decay**k
        named = [(f"{group.name}.{i}", p) for i, p in enumerate(group.parameters())]
        decay = [p for n, p in named if not _no_weight_decay(n, p)]
        no_decay = [p for n, p in named if _no_weight_decay(n, p)]
        if decay:
            result.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": group.name})
        if no_decay:
            result.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{group.name}.no_decay"})
    return result


# -- the prototype head ----------------------------------------------------------


def head_linear(built) -> nn.Linear:
    """The head's Linear layer (the head is Dropout + Linear)."""
    linears = [m for m in built.head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the head has no Linear layer")
    return linears[-1]


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean and count of `features` (N, D) -> ((C, D), (C,))."""
    features = features.double()
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.device)
    return sums / counts.clamp(min=1)[:, None], counts


def prototype_weights(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear weights for nearest class mean: argmin_c ‖x − μ_c‖² = argmax_c
    2μ_c·x − ‖μ_c‖² (‖x‖² is the same for every class). -> ((C, D), (C,))."""
    means, _ = class_means(features, labels, num_classes)  # (C, D)
    return (2 * means).float(), (-(means * means).sum(dim=1)).float()


def set_head(built, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copies (C, D) `weight` and (C,) `bias` into the head's Linear layer."""
    linear = head_linear(built)
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.device, linear.weight.dtype))
        linear.bias.copy_(bias.to(linear.bias.device, linear.bias.dtype))


def ledoit_wolf_shrinkage(z: torch.Tensor) -> float:
    """The Ledoit-Wolf (2004) shrinkage intensity in [0, 1] for the covariance of the
    centred rows `z` (N, D): the weight of (trace/D)·I against the sample covariance
    that minimises the expected squared error (scikit-learn's `ledoit_wolf_shrinkage`)."""
    n, d = z.shape
    z2 = z * z
    trace_per_dim = z2.sum(dim=0) / n  # (D,)
    mu = trace_per_dim.sum() / d
    delta_ = ((z.T @ z) ** 2).sum() / n**2
    beta_ = (z2.T @ z2).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace_per_dim.sum() + d * mu**2) / d
    beta = torch.minimum(beta, delta)
    return 0.0 if delta <= 0 else (beta / delta).item()


def image_labels(labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(I,) the label of each image, from rows (N,) that are views of images: `labels`
    (N,) and `images` (N,), the image each row is a view of, numbered 0..I-1."""
    out = torch.zeros(int(images.max()) + 1 if len(images) else 0, dtype=torch.long, device=images.device)
    out[images] = labels.to(images.device)
    return out


def images_per_class(labels: torch.Tensor, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) the number of distinct images of each class (`image_labels`' rows)."""
    return torch.bincount(image_labels(labels, images), minlength=num_classes)


def overall_spread(centred: torch.Tensor) -> torch.Tensor:
    """The one scale both frozen-feature heads divide every dimension by: the RMS of
    centred features (N, D), 1 where they are all zero. Each dimension scaled by its
    own std would blow quiet units (a few images cannot estimate their std) up to the
    loud ones' size: on real few-shot faces and textures the common scale scored 3 to
    5 points higher (docs/benchmarks.md)."""
    scale = centred.pow(2).mean().sqrt()
    return scale if scale > 0 else torch.ones_like(scale)


def gaussian_prototype_weights(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, images: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear weights for nearest class mean in the metric of the classes' shared
    covariance Σ (linear discriminant analysis with equal priors):
    argmin_c (x − μ_c)ᵀΣ⁻¹(x − μ_c) = argmax_c (Σ⁻¹μ_c)·x − ½ μ_cᵀΣ⁻¹μ_c.

    Σ is the pooled within-class covariance of `features` (N, D), shrunk towards
    (trace/D)·I, the isotropic metric of plain nearest class mean. The shrinkage is the
    Ledoit-Wolf intensity of the spread between *images* of a class: `images` (N,)
    gives the image each row is a view of (None: every row its own image), and each
    image counts once, by the mean of its views, since augmented views of one image are
    not independent samples of its class. Dimensions are scaled by one common factor,
    not each by its own spread, which a few images cannot estimate.

    With no class holding two images there is no spread between images to go by, and
    whether a class spreads like one image's augmented views is the data's to say: on
    real one-shot handwriting it does (the views' metric scored about 8 points above
    plain nearest class mean), on faces it does not (2.5 below the plain frozen loop,
    the isotropic metric 4.6 above). The head then adds the two discriminants, each
    scaled to unit spread of its scores on the training views: 0.4 to 6.3 points
    above the plain loop on all four real sets (docs/benchmarks.md). -> ((C, D), (C,))."""
    x = features.double()
    if images is None:
        images = torch.arange(len(x), device=x.device)
    images = images.to(x.device)
    means, counts = class_means(x, labels, num_classes)  # (C, D), (C,)
    centred = x - means[labels]  # (N, D)
    scale = overall_spread(centred)
    z = centred / scale
    dof = max(1, len(x) - int((counts > 0).sum()))
    covariance = z.T @ z / dof  # (D, D), in units of scale²
    # One row per image: the mean of its views, less its class mean.
    image_count = int(images.max()) + 1 if len(images) else 0
    image_means = torch.zeros(image_count, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, images, z)
    image_means /= torch.bincount(images, minlength=image_count).clamp(min=1)[:, None]
    label_of_image = image_labels(labels, images)  # (I,)
    per_class = torch.bincount(label_of_image, minlength=num_classes)
    spread = image_means[per_class[label_of_image] > 1]  # images of classes with two or more

    def discriminant(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        identity = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        shrunk = (1 - alpha) * covariance + alpha * (torch.trace(covariance) / x.shape[1]) * identity
        if torch.trace(shrunk) <= 0:  # every view identical to its class mean
            shrunk = identity
        weight = torch.linalg.solve(shrunk, means.T / scale).T / scale  # (C, D): Σ⁻¹μ_c
        return weight, -0.5 * (weight * means).sum(dim=1)

    if len(spread):
        weight, bias = discriminant(ledoit_wolf_shrinkage(spread))
    else:
        weight, bias = torch.zeros_like(means), torch.zeros(num_classes, dtype=x.dtype, device=x.device)
        for part_weight, part_bias in (discriminant(1.0), discriminant(ledoit_wolf_shrinkage(z))):
            spread_of_scores = (x @ part_weight.T + part_bias).std().clamp(min=1e-30)
            weight, bias = weight + part_weight / spread_of_scores, bias + part_bias / spread_of_scores
    return weight.float(), bias.float()


def set_prototype_head(
    built, features: torch.Tensor, labels: torch.Tensor, num_classes: int, images: torch.Tensor | None = None
) -> None:
    set_head(built, *gaussian_prototype_weights(features, labels, num_classes, images))


# -- the linear probe ------------------------------------------------------------

# L2 strengths that cross-validation chooses from. Features are centred and scaled to
# unit spread first, so one grid suits every backbone; 10× steps around the usual 1e-2.
LINEAR_PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LINEAR_PROBE_DEFAULT_WEIGHT_DECAY = 1e-2  # where a class has too few images for folds
LINEAR_PROBE_FOLDS = 3
# L-BFGS iterations per fit: a convex problem in C·(D+1) unknowns converges to
# accuracy-stable weights well within this on every backbone's features.
LINEAR_PROBE_MAX_ITERATIONS = 100


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A linear classifier on raw features (N, D) → logits (N, C). The standardisation
    it was trained with is folded into `weight` and `bias`, so it drops into a head
    (`set_head`) as it is."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    weight_decay: float  # the L2 strength it was fitted with
    cross_validated: bool = False  # chosen by folds (else the default: too few images for folds)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight) @ self.weight.T + self.bias  # (N, C)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy on (N, D) features; NaN for no images."""
        if not len(labels):
            return math.nan
        predicted = self.logits(features).argmax(dim=1)
        return (predicted == labels.to(predicted.device)).double().mean().item()


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float | None = None,
    seed: int = 0,
    groups: torch.Tensor | None = None,
) -> LinearProbe:
    """Multinomial logistic regression on frozen features (N, D), each dimension
    centred on the training mean and scaled by their overall std: full-batch L-BFGS (strong Wolfe line
    search) from zero weights on mean cross-entropy + weight_decay/2·‖W‖² (the bias is
    not decayed). The objective is strictly convex, so the fit is its unique optimum:
    the same weights for the same features, whatever ran before. It runs where
    `features` are (a GPU's features are probed on the GPU).

    `weight_decay` None chooses it from LINEAR_PROBE_WEIGHT_DECAYS by stratified
    LINEAR_PROBE_FOLDS-fold cross-validation on these training features alone: the
    lowest held-out cross-entropy (folds drawn with `seed`), so no validation image tunes
    the probe it scores; LINEAR_PROBE_DEFAULT_WEIGHT_DECAY where a class has fewer
    images than folds. `groups` (N,): rows that are views of one image carry its index,
    and a fold takes all of an image's views or none (else a view scores against its
    own twin in training, and the folds favour too little regularisation)."""
    x = features.float()
    y = labels.to(x.device)
    if weight_decay is not None:
        return _fit_probe(x, y, num_classes, weight_decay)
    chosen = _cross_validated_weight_decay(x, y, num_classes, seed, groups)
    probe = _fit_probe(x, y, num_classes, LINEAR_PROBE_DEFAULT_WEIGHT_DECAY if chosen is None else chosen)
    return dataclasses.replace(probe, cross_validated=chosen is not None)


def _fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float) -> LinearProbe:
    mean = x.mean(dim=0)  # (D,)
    std = overall_spread(x - mean)
    z = (x - mean) / std  # (N, D)
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=LINEAR_PROBE_MAX_ITERATIONS, history_size=10,
        tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may sit under no_grad (feature extraction)
        optimiser.step(closure)
    # logits = ((x − μ) / σ)·Wᵀ + b = x·(W/σ)ᵀ + (b − (W/σ)·μ)
    raw_weight = (weight / std).detach()  # (C, D)
    return LinearProbe(weight=raw_weight, bias=(bias - raw_weight @ mean).detach(), weight_decay=weight_decay)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold index (N,) of each image: each class dealt round-robin over the folds in a
    seeded random order, so every fold holds its share of every class."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator).tolist()
    values = labels.tolist()
    dealt: dict[int, int] = {}
    fold = [0] * len(values)
    for i in order:
        fold[i] = dealt.get(values[i], 0) % folds
        dealt[values[i]] = dealt.get(values[i], 0) + 1
    return torch.tensor(fold, dtype=torch.long)


def _cross_validated_weight_decay(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, groups: torch.Tensor | None = None
) -> float | None:
    """The L2 strength of the lowest held-out loss, or None where a class has too few
    images for folds."""
    if groups is None:
        groups = torch.arange(len(y))
    groups = groups.cpu()
    label_of_image = image_labels(y, groups)  # (images,): every view of an image has its label
    counts = torch.bincount(label_of_image, minlength=num_classes)
    present = counts[counts > 0]
    if len(present) < 2 or int(present.min()) < LINEAR_PROBE_FOLDS:
        return None
    fold = stratified_folds(label_of_image, LINEAR_PROBE_FOLDS, seed)[groups].to(x.device)
    best, best_loss = LINEAR_PROBE_DEFAULT_WEIGHT_DECAY, math.inf
    for weight_decay in sorted(LINEAR_PROBE_WEIGHT_DECAYS, reverse=True):  # strongest first: ties keep it
        # Held-out cross-entropy, not accuracy: on a few images per fold accuracy ties
        # across the grid, while the loss still tells a sharp, right fit from a timid one.
        loss = 0.0
        for k in range(LINEAR_PROBE_FOLDS):
            held = fold == k
            probe = _fit_probe(x[~held], y[~held], num_classes, weight_decay)
            loss += nn.functional.cross_entropy(probe.logits(x[held]), y[held], reduction="sum").item()
        if loss < best_loss:
            best, best_loss = weight_decay, loss
    return best


# -- AUTO -----------------------------------------------------------------------


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Leave-one-out nearest-class-mean accuracy on L2-normalised features (N, D).

    Image i is compared with its own class's mean recomputed without it,
    (S_c − x_i) / (n_c − 1); images alone in their class can't be scored and are
    skipped. NaN when none can be scored."""
    x = nn.functional.normalize(features.double(), dim=1)  # (N, D)
    means, counts = class_means(x, labels, num_classes)  # (C, D), (C,)
    sums = means * counts[:, None]
    distances = torch.cdist(x, means) ** 2  # (N, C)
    own_count = counts[labels].double()  # (N,)
    scorable = own_count > 1
    if not scorable.any():
        return math.nan
    loo_mean = (sums[labels] - x) / (own_count - 1).clamp(min=1)[:, None]  # (N, D)
    distances[torch.arange(len(x)), labels] = ((x - loo_mean) ** 2).sum(dim=1)
    # Classes with no images at all must never win.
    distances[:, counts == 0] = math.inf
    correct = distances.argmin(dim=1) == labels
    return correct[scorable].double().mean().item()


def probe_subset(labels: Sequence[int], num_classes: int, seed: int, limit: int = PROBE_MAX_IMAGES_PER_CLASS) -> list[int]:
    """Indices of at most `limit` images per class, a seeded random choice."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator).tolist()
    taken = [0] * num_classes
    chosen = []
    for i in order:
        if taken[labels[i]] < limit:
            taken[labels[i]] += 1
            chosen.append(i)
    return sorted(chosen)


def decide(images_per_class: float, probe: float, num_classes: int, groups_below: int) -> pb.StrategyDecision:
    """AUTO's table (module docstring), with the numbers in the reason."""
    chance = 1.0 / num_classes
    score = (probe - chance) / (1 - chance) if math.isfinite(probe) else math.nan
    size = f"{images_per_class:.1f} training images per class"
    measured = (
        f"a nearest-class-mean probe on frozen features scored {probe:.3f} against chance {chance:.3f} "
        f"(normalised {score:.2f}; similar from {SIMILAR_MIN_SCORE:.2f})"
        if math.isfinite(probe)
        else "the similarity probe could not run (fewer than 2 images in every class)"
    )
    if images_per_class * num_classes < FULL_MIN_TRAINING_IMAGES:
        strategy, groups = S.STRATEGY_PARTIAL, default_partial_groups(groups_below)
        why = (f"{images_per_class * num_classes:.0f} training images in all, fewer than {FULL_MIN_TRAINING_IMAGES}: "
               f"partial fine-tuning of the top {groups} groups (a full fine-tune on so few images collapsed to chance "
               "on real sets)")
    elif (PROGRESSIVE_BAND_PER_CLASS[0] <= images_per_class < FULL_LOW_BAND_PER_CLASS
          and images_per_class * num_classes >= FULL_MIN_IMAGES_LOW_BAND):
        strategy, groups = S.STRATEGY_FULL, groups_below
        why = (f"{PROGRESSIVE_BAND_PER_CLASS[0]} to {FULL_LOW_BAND_PER_CLASS:g} per class with "
               f"{images_per_class * num_classes:.0f} images in all (from {FULL_MIN_IMAGES_LOW_BAND}): full fine-tuning, "
               "which on real handwriting at 3 per class (15 images) beat progressive unfreezing by 1.7 and 3.9 points")
    elif PROGRESSIVE_BAND_PER_CLASS[0] <= images_per_class < PROGRESSIVE_BAND_PER_CLASS[1]:
        strategy, groups = S.STRATEGY_PROGRESSIVE_UNFREEZING, groups_below  # at most; the epochs decide
        low, high = PROGRESSIVE_BAND_PER_CLASS
        why = (f"small, {low} to {high - 1} per class: progressive unfreezing, which on real sets at 10 per class "
               "was within 0.4 points of the best strategy on each and at 3 per class within 2.0 (full fine-tuning "
               "1.2 to 1.8 and up to 5.0 below)")
    elif images_per_class < LARGE_IMAGES_PER_CLASS:
        strategy, groups = S.STRATEGY_FULL, groups_below
        why = (f"small (large from {LARGE_IMAGES_PER_CLASS} per class): full fine-tuning, which on real few-shot "
               "sets was the best strategy or near it whatever the probe scored")
    else:
        similar = math.isfinite(score) and score >= SIMILAR_MIN_SCORE
        if similar:
            strategy, groups = S.STRATEGY_PARTIAL, default_partial_groups(groups_below)
        else:
            strategy, groups = S.STRATEGY_FULL, groups_below
        why = (
            f"large (from {LARGE_IMAGES_PER_CLASS} per class) and {'similar' if similar else 'different'}: "
            f"{STRATEGY_WORDS[strategy]}" + (f" of the top {groups} groups" if strategy == S.STRATEGY_PARTIAL else "")
        )
    return pb.StrategyDecision(
        strategy=strategy,
        reason=f"{size} and {measured}; {why}.",
        images_per_class=images_per_class,
        probe_accuracy=probe if math.isfinite(probe) else 0.0,
        chance_accuracy=chance,
        trainable_groups=groups,
    )


STRATEGY_WORDS = {
    S.STRATEGY_FEATURE_EXTRACTION: "feature extraction",
    S.STRATEGY_PARTIAL: "partial fine-tuning",
    S.STRATEGY_FULL: "full fine-tuning",
    S.STRATEGY_PROGRESSIVE_UNFREEZING: "progressive unfreezing",
    S.STRATEGY_PROTOTYPE: "prototype",
}


def requested(strategy: int, images_per_class: float, num_classes: int, trainable_groups: int) -> pb.StrategyDecision:
    """The decision record of a strategy the caller chose."""
    return pb.StrategyDecision(
        strategy=strategy,
        reason=f"{STRATEGY_WORDS[strategy]} as requested; {images_per_class:.1f} training images per class.",
        images_per_class=images_per_class,
        chance_accuracy=1.0 / num_classes,
        trainable_groups=trainable_groups,
    )


def from_scratch(images_per_class: float, num_classes: int, groups_below: int) -> pb.StrategyDecision:
    """AUTO with random initial weights: there are no features to keep or to probe."""
    return pb.StrategyDecision(
        strategy=S.STRATEGY_FULL,
        reason=(
            f"{images_per_class:.1f} training images per class and random initial weights (weights: scratch): "
            "nothing pretrained to keep or to probe, so every layer trains (full)."
        ),
        images_per_class=images_per_class,
        chance_accuracy=1.0 / num_classes,
        trainable_groups=groups_below,
    )
