"""Pure pieces of the training engine: metrics, config, schedules, strategies'
arithmetic, the checkpoint's RNG round trip. No model is trained here."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones
from tlserve.service.errors import InvalidArgument
from tlserve.service.training import checkpoint, optim, strategies
from tlserve.service.training.config import TrainConfig
from tlserve.service.training.evaluation import report_from_predictions


def _logits_for(predictions: list[int], num_classes: int) -> torch.Tensor:
    logits = torch.zeros(len(predictions), num_classes)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = 1.0
    return logits


# -- report_from_predictions ----------------------------------------------------------


def test_report_counts_precision_recall_f1_and_confusion_by_hand():
    # true:      a a a b b c
    # predicted: a a b b c c
    labels = [0, 0, 0, 1, 1, 2]
    report = report_from_predictions(labels, _logits_for([0, 0, 1, 1, 2, 2], 3), ["a", "b", "c"], loss=0.5)
    assert report.top1_accuracy == pytest.approx(4 / 6)
    assert report.top5_accuracy == 1.0  # k = min(5, 3) = 3 covers every class
    assert report.loss == 0.5 and report.image_count == 6
    assert list(report.confusion_matrix) == [2, 1, 0, 0, 1, 1, 0, 0, 1]
    a, b, c = report.per_class
    assert (a.label, a.precision, a.recall, a.support) == ("a", 1.0, pytest.approx(2 / 3), 3)
    assert a.f1 == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert (b.precision, b.recall, b.f1) == (0.5, 0.5, 0.5)
    assert (c.precision, c.recall) == (0.5, 1.0) and c.f1 == pytest.approx(2 / 3)


def test_report_top_k_uses_the_k_best_logits():
    # 6 classes: k = 5. Image 0's class ranks 2nd, image 1's ranks last (6th).
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [5.0, 4, 3, 2, 1, 0]])
    report = report_from_predictions([1, 5], logits, list("abcdef"), loss=1.0)
    assert report.top1_accuracy == 0.0
    assert report.top5_accuracy == 0.5


def test_report_class_never_predicted_or_absent_has_zero_precision_recall_f1():
    report = report_from_predictions([0, 0], _logits_for([0, 0], 2), ["a", "b"], loss=0.1)
    b = report.per_class[1]
    assert (b.precision, b.recall, b.f1, b.support) == (0.0, 0.0, 0.0, 0)


def test_report_of_an_empty_split_is_zeros():
    report = report_from_predictions([], torch.zeros(0, 3), ["a", "b", "c"], loss=0.0)
    assert report.image_count == 0 and report.top1_accuracy == 0.0
    assert list(report.confusion_matrix) == [0] * 9 and len(report.per_class) == 3


# -- TrainConfig ---------------------------------------------------------------------------


def _config(request: pb.FineTuneRequest | None = None, **kwargs) -> TrainConfig:
    request = request or pb.FineTuneRequest(backbone="resnet18")
    args = {"num_classes": 4, "train_images_per_class": 100, "device_type": "cpu"} | kwargs
    return TrainConfig.from_request(request, **args)


def test_defaults_follow_the_strategy():
    fe = _config(pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_FEATURE_EXTRACTION))
    # Cached: the head is fitted on the eval view and 8 augmented views of every image.
    assert (fe.optimizer, fe.learning_rate, fe.epochs, fe.cache_features, fe.augment) == ("adamw", 1e-2, 15, True, True)
    assert fe.cached_views == 8
    uncached = pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_FEATURE_EXTRACTION)
    uncached.training.cache_features = False
    assert _config(uncached).augment  # each epoch sees new augmented images
    off = pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_FEATURE_EXTRACTION)
    off.augmentation.enabled = False
    assert not _config(off).augment
    full = _config(pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_FULL))
    assert (full.optimizer, full.learning_rate, full.layer_lr_decay, full.nesterov) == ("adamw", 3e-4, 1.0, False)
    assert full.warmup_epochs == 1.0 and full.epochs == 20
    # Label-safe augmentation and no regularisers that cost few-shot accuracy (measured on real images).
    assert (full.augment, full.crop_min_scale, full.horizontal_flip, full.rotation_degrees, full.color_jitter) == (
        True, 0.8, False, 0.0, 0.0)
    assert (full.label_smoothing, full.head_dropout) == (0.0, 0.0)
    partial = _config(pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_PARTIAL))
    assert partial.trainable_groups == 0 and partial.learning_rate == 3e-4  # 0: the engine trains the top half
    assert [strategies.default_partial_groups(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 2, 3, 4]
    proto = _config(pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_PROTOTYPE))
    assert proto.augment and proto.head_dropout == 0.0
    auto = _config()
    assert auto.strategy == pb.STRATEGY_AUTO
    assert (auto.schedule, auto.stop_metric, auto.patience, auto.cached_views, auto.mixed_precision) == (
        "cosine", "val_accuracy", 5, 8, "off")  # fp32 on the CPU


def test_caller_values_win_over_defaults_and_survive_auto_resolution():
    request = pb.FineTuneRequest(backbone="resnet18", seed=7)
    request.training.learning_rate = 0.05
    request.training.early_stopping.patience = 0  # set: early stopping off
    resolved = _config(request).resolved(pb.STRATEGY_FULL, 5)
    assert resolved.strategy == pb.STRATEGY_FULL and resolved.learning_rate == 0.05
    assert resolved.optimizer == "adamw" and resolved.epochs == 20  # FULL's defaults for the rest
    assert resolved.patience == 0 and resolved.seed == 7


def test_default_batch_gives_a_few_steps_on_a_tiny_dataset():
    assert _config(num_classes=3, train_images_per_class=8).batch_size == 8
    assert _config(num_classes=10, train_images_per_class=500).batch_size == 32


def test_a_tiny_set_is_read_over_until_an_epoch_takes_the_minimum_steps():
    from tlserve.service.training.config import MIN_STEPS_PER_EPOCH, epoch_repeats

    assert epoch_repeats(10, 8) == 4 and epoch_repeats(5, 8) == 7  # 40 and 35 reads: 5 steps of 8
    assert epoch_repeats(6, 6) * 6 >= MIN_STEPS_PER_EPOCH * 6
    assert epoch_repeats(32, 8) == 1 and epoch_repeats(5000, 32) == 1  # enough steps already
    assert epoch_repeats(127, 32) == 2  # a caller's batch of 32: 3 steps would be too few
    assert epoch_repeats(0, 8) == 1
    assert epoch_repeats(10, 8, min_steps=1) == 1 and epoch_repeats(10, 8, min_steps=10) == 8


def test_min_steps_per_epoch_defaults_to_4_and_a_caller_can_turn_repeats_off():
    assert _config().min_steps_per_epoch == 4
    request = pb.FineTuneRequest(backbone="resnet18")
    request.training.min_steps_per_epoch = 1
    config = _config(request)
    assert config.min_steps_per_epoch == 1 and config.to_request().training.min_steps_per_epoch == 1


def test_a_batch_holds_a_set_of_six_or_more_images_at_most_once():
    assert _config(num_classes=2, train_images_per_class=3).batch_size == 6  # default 8 -> the 6 images
    assert _config(num_classes=2, train_images_per_class=2).batch_size == 8  # 4 images: too few for BatchNorm
    assert _config(num_classes=10, train_images_per_class=3).batch_size == 8  # 30 images
    request = pb.FineTuneRequest(backbone="resnet18")
    request.training.batch_size = 32
    assert _config(request, num_classes=3, train_images_per_class=5).batch_size == 15  # a caller's too


def test_a_repeated_set_reads_every_image_the_same_number_of_times():
    import torch
    from torch.utils.data import TensorDataset

    from tlserve.service.training.data import Repeated, make_loader

    five = TensorDataset(torch.arange(5))
    repeated = Repeated(five, 7)
    assert len(repeated) == 35 and repeated[12][0].item() == 2
    batches = [b[0] for b in make_loader(repeated, 8, shuffle=True, device=torch.device("cpu"))]
    assert len(batches) == 5  # 35 reads: 8, 8, 8, 8, 3
    assert torch.bincount(torch.cat(batches), minlength=5).tolist() == [7] * 5
    assert len(Repeated(five, 1)) == 5


def test_batchnorm_statistics_are_frozen_only_for_tiny_steps_from_trained_weights():
    def resolved(per_class: float, *, classes: int = 3, scratch: bool = False, devices: int = 0, batch: int = 0,
                 strategy: int = pb.STRATEGY_FULL):
        request = pb.FineTuneRequest(backbone="resnet18", strategy=strategy, devices=devices)
        if scratch:
            request.weights.scratch.SetInParent()
        if batch:
            request.training.batch_size = batch
        return _config(request, num_classes=classes, train_images_per_class=per_class).batchnorm_statistics

    # A step sees the whole training set when it is smaller than the batch: 3, 5 or 6 images.
    assert resolved(1) == "frozen" and resolved(1, classes=5) == "frozen"
    assert resolved(2) == "update"  # 6 images: as many as a step needs to update
    assert resolved(3) == "update"  # 9 images: batch 8
    assert resolved(3, scratch=True) == "update" and resolved(1, scratch=True) == "update"  # nothing to keep
    assert resolved(100, batch=4) == "frozen"
    # Partial and progressive keep their lower groups frozen, statistics and all, and update the rest.
    assert resolved(1, strategy=pb.STRATEGY_PARTIAL) == "update"
    assert resolved(1, strategy=pb.STRATEGY_PROGRESSIVE_UNFREEZING) == "update"
    assert resolved(100, batch=16, devices=2) == "update"  # 8 per process
    assert resolved(100, batch=10, devices=2) == "frozen" and resolved(100, batch=32, devices=2) == "update"
    # The caller's choice wins either way and survives the round trip.
    request = pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_FULL)
    request.training.batchnorm_statistics = pb.BATCHNORM_STATISTICS_UPDATE
    config = _config(request, num_classes=3, train_images_per_class=1)
    assert config.batchnorm_statistics == "update"
    assert config.to_request().training.batchnorm_statistics == pb.BATCHNORM_STATISTICS_UPDATE
    # AUTO's choice gets that strategy's default.
    auto = _config(pb.FineTuneRequest(backbone="resnet18"), num_classes=5, train_images_per_class=1)
    assert auto.resolved(pb.STRATEGY_FULL, 5).to_request().training.batchnorm_statistics == pb.BATCHNORM_STATISTICS_FROZEN
    assert auto.resolved(pb.STRATEGY_PARTIAL, 3).batchnorm_statistics == "update"


def test_to_request_round_trips_with_defaults_filled():
    config = _config(pb.FineTuneRequest(backbone="resnet18", dataset="ds", model_name="m", strategy=pb.STRATEGY_PARTIAL))
    request = config.to_request()
    assert request.dataset == "ds" and request.model_name == "m"
    assert request.training.HasField("epochs") and request.training.epochs == 15
    again = _config(request)
    assert dataclasses_equal_except_request(again, config)


def dataclasses_equal_except_request(a: TrainConfig, b: TrainConfig) -> bool:
    import dataclasses

    return dataclasses.replace(a, request=b"") == dataclasses.replace(b, request=b"")


@pytest.mark.parametrize(
    "field, set_value",
    [
        ("training.epochs", lambda r: setattr(r.training, "epochs", 0)),
        ("training.epochs", lambda r: setattr(r.training, "epochs", 1001)),
        ("training.batch_size", lambda r: setattr(r.training, "batch_size", 5000)),
        ("training.min_steps_per_epoch", lambda r: setattr(r.training, "min_steps_per_epoch", 0)),
        ("training.learning_rate", lambda r: setattr(r.training, "learning_rate", 0.0)),
        ("training.layer_lr_decay", lambda r: setattr(r.training, "layer_lr_decay", 1.5)),
        ("training.momentum", lambda r: setattr(r.training, "momentum", 1.0)),
        ("training.head_dropout", lambda r: setattr(r.training, "head_dropout", 1.0)),
        ("training.label_smoothing", lambda r: setattr(r.training, "label_smoothing", -0.1)),
        ("training.warmup_epochs", lambda r: (setattr(r.training, "epochs", 3), setattr(r.training, "warmup_epochs", 4.0))),
        ("training.cached_views", lambda r: setattr(r.training, "cached_views", 0)),
        ("training.batchnorm_statistics", lambda r: setattr(r.training, "batchnorm_statistics", 7)),
        ("training.grad_clip_norm", lambda r: setattr(r.training, "grad_clip_norm", -1.0)),
        ("training.early_stopping.min_delta", lambda r: setattr(r.training.early_stopping, "min_delta", -0.1)),
        ("augmentation.random_crop_min_scale", lambda r: setattr(r.augmentation, "random_crop_min_scale", 0.0)),
        ("augmentation.rotation_degrees", lambda r: setattr(r.augmentation, "rotation_degrees", 270.0)),
        ("image_size", lambda r: setattr(r, "image_size", 8)),
        ("strategy", lambda r: setattr(r, "strategy", 42)),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_field(field, set_value):
    request = pb.FineTuneRequest(backbone="resnet18")
    set_value(request)
    with pytest.raises(InvalidArgument, match=f"^{field.replace('.', '[.]')} is"):
        _config(request)


# -- schedules -----------------------------------------------------------------------


def test_cosine_warms_up_linearly_then_decays_to_zero():
    factor = optim.SCHEDULES["cosine"](100, 10)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)


def test_one_cycle_peaks_at_30_percent_and_constant_stays():
    factor = optim.SCHEDULES["one_cycle"](100, 0)
    assert factor(0) == pytest.approx(1 / 25) and factor(30) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(1 / 25 / 1e4)
    assert optim.SCHEDULES["constant"](100, 0)(77) == 1.0


# -- strategies ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return backbones.build("resnet18", 3, weights=backbones.WeightsChoice(kind="none"), weights_dir="/nonexistent")


def test_discriminative_rates_decay_per_group_below_the_head(resnet):
    groups = strategies.param_groups(resnet, learning_rate=0.1, layer_lr_decay=0.5, weight_decay=1e-4)
    rates = {g["name"]: g["lr"] for g in groups}
    assert rates["head"] == 0.1 and rates["layer4"] == 0.05 and rates["layer3"] == 0.025
    assert rates["stem"] == pytest.approx(0.1 * 0.5**5)
    # Biases and BatchNorm parameters are not decayed; conv and linear weights are.
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith(".no_decay"))
    assert all(p.ndim > 1 for g in groups if not g["name"].endswith(".no_decay") for p in g["params"])
    listed = sum(p.numel() for g in groups for p in g["params"])
    assert listed == sum(p.numel() for p in resnet.model.parameters())


def test_trainable_groups_per_strategy_and_phase(resnet):
    def names(strategy, epoch=0, groups=1):
        chosen = strategies.trainable_at(strategy, resnet, epoch=epoch, trainable_groups=groups, epochs_per_phase=2)
        return [g.name for g in chosen]

    assert names(pb.STRATEGY_FEATURE_EXTRACTION) == ["head"]
    assert names(pb.STRATEGY_PARTIAL, groups=2) == ["layer3", "layer4", "head"]
    assert names(pb.STRATEGY_PARTIAL, groups=99) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert names(pb.STRATEGY_FULL)[0] == "stem"
    assert names(pb.STRATEGY_PROGRESSIVE_UNFREEZING, epoch=1) == ["head"]
    assert names(pb.STRATEGY_PROGRESSIVE_UNFREEZING, epoch=2) == ["layer4", "head"]
    assert names(pb.STRATEGY_PROGRESSIVE_UNFREEZING, epoch=5) == ["layer3", "layer4", "head"]


def test_ledoit_wolf_shrinkage_matches_scikit_learn():
    from sklearn.covariance import ledoit_wolf_shrinkage

    generator = torch.Generator().manual_seed(3)
    for n, d in ((12, 40), (200, 16), (30, 30)):
        z = torch.randn(n, d, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 3, d, dtype=torch.float64)
        z = z - z.mean(dim=0)
        assert strategies.ledoit_wolf_shrinkage(z) == pytest.approx(ledoit_wolf_shrinkage(z.numpy(), assume_centered=True), rel=1e-6)


def test_gaussian_prototype_is_the_mahalanobis_nearest_class_mean():
    generator = torch.Generator().manual_seed(0)
    # Three classes whose features share a stretched covariance: one direction has 10×
    # the spread, so plain Euclidean class means mislead where the Mahalanobis ones don't.
    stretch = torch.ones(6, dtype=torch.float64)
    stretch[0] = 10.0
    centres = torch.randn(3, 6, generator=generator, dtype=torch.float64) * 2
    labels = torch.arange(300) % 3
    features = centres[labels] + torch.randn(300, 6, generator=generator, dtype=torch.float64) * stretch
    weight, bias = strategies.gaussian_prototype_weights(features, labels, 3)
    queries_labels = torch.arange(600) % 3
    queries = centres[queries_labels] + torch.randn(600, 6, generator=generator, dtype=torch.float64) * stretch
    logits = queries.float() @ weight.T + bias  # (600, 3)
    # With 300 images the shrinkage is small: the head is LDA's discriminant, which
    # ranks classes as the Mahalanobis distance under the pooled covariance does.
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    centred = features - means[labels]
    covariance = centred.T @ centred / (300 - 3)
    inverse = torch.linalg.inv(covariance)
    mahalanobis = torch.stack([((queries - m) @ inverse * (queries - m)).sum(1) for m in means], dim=1)
    agreement = (logits.argmax(1) == mahalanobis.argmin(1)).double().mean().item()
    assert agreement > 0.98
    euclidean = (torch.cdist(queries, means).argmin(1) == queries_labels).double().mean()
    assert (logits.argmax(1) == queries_labels).double().mean() > euclidean + 0.05


def test_gaussian_prototype_stays_finite_with_fewer_images_than_dimensions():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(6, 512, generator=generator).abs()  # ReLU features: 2 images per class, D = 512
    features[:, :100] = 0.0  # dead units: zero variance
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    weight, bias = strategies.gaussian_prototype_weights(features, labels, 3)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert torch.equal((features @ weight.T + bias).argmax(1), labels)  # its own images are nearest their means


def test_one_image_per_class_blends_the_views_metric_with_the_isotropic_one():
    # One image per class, 8 views each that vary along the first 3 dimensions only.
    # Whether the class spreads that way too is unknown: the head must hold up both
    # for test images that differ from the class image as its views do (where plain
    # nearest class mean stumbles) and for ones that differ elsewhere.
    generator = torch.Generator().manual_seed(4)
    centres = torch.randn(4, 10, generator=generator) * 2.1
    images = torch.arange(4).repeat(8)  # (32,): view v of image i is row v·4 + i
    jitter = torch.zeros(32, 10)
    jitter[:, :3] = torch.randn(32, 3, generator=generator) * 5
    features = centres[images] + jitter
    weight, bias = strategies.gaussian_prototype_weights(features, images, 4, images)
    means = torch.stack([features[images == c].mean(0) for c in range(4)])
    labels = torch.arange(400) % 4
    like_views = centres[labels].clone()
    like_views[:, :3] += torch.randn(400, 3, generator=generator) * 6
    elsewhere = centres[labels] + torch.cat([torch.zeros(400, 3), torch.randn(400, 7, generator=generator)], dim=1)

    def accuracy(predicted):
        return (predicted == labels).double().mean().item()

    nearest_mean = accuracy(torch.cdist(like_views, means).argmin(1))
    assert accuracy((like_views @ weight.T + bias).argmax(1)) >= nearest_mean + 0.05
    assert accuracy((elsewhere @ weight.T + bias).argmax(1)) >= 0.98
    # With one view per image there is no spread at all: plain nearest class mean.
    single, single_bias = strategies.gaussian_prototype_weights(centres, torch.arange(4), 4, torch.arange(4))
    assert torch.equal((like_views @ single.T + single_bias).argmax(1), torch.cdist(like_views, centres).argmin(1))


def test_images_per_class_counts_images_not_views():
    labels = torch.tensor([0, 0, 1, 2])  # images 0, 1 of class 0; 2 of class 1; 3 of class 2
    images = torch.arange(4).repeat(3)
    assert strategies.images_per_class(labels.repeat(3), images, 4).tolist() == [2, 1, 1, 0]


def test_linear_probe_folds_keep_every_view_of_an_image_together():
    labels = torch.arange(12) % 2  # 12 images, 2 classes
    groups = torch.arange(12).repeat(4)  # 4 views each
    folds = strategies.stratified_folds(labels, 3, seed=0)[groups]
    for image in range(12):
        assert len(set(folds[groups == image].tolist())) == 1
    features = torch.randn(48, 5, generator=torch.Generator().manual_seed(2))
    probe = strategies.fit_linear_probe(features, labels.repeat(4), 2, groups=groups)
    assert probe.weight_decay in strategies.LINEAR_PROBE_WEIGHT_DECAYS


def test_prototype_weights_make_a_linear_layer_the_nearest_class_mean():
    torch.manual_seed(0)
    features = torch.randn(30, 8)
    labels = torch.arange(30) % 3
    weight, bias = strategies.prototype_weights(features, labels, 3)
    linear = nn.Linear(8, 3)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    queries = torch.randn(50, 8)
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    nearest = torch.cdist(queries, means).argmin(dim=1)
    assert torch.equal(linear(queries).argmax(dim=1), nearest)
    # logits = ‖x‖² − ‖x − μ_c‖² exactly.
    expected = (queries**2).sum(1, keepdim=True) - torch.cdist(queries, means) ** 2
    assert torch.allclose(linear(queries), expected, atol=1e-4)


def test_probe_is_leave_one_out_nearest_mean():
    # Two tight, far-apart clusters: LOO NCM gets all; one image alone in its class is skipped.
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.0], [0.0, 1.0], [0.1, 0.9], [0.0, 0.95]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert strategies.probe_accuracy(features, labels, 2) == 1.0
    assert math.isnan(strategies.probe_accuracy(features[:2], torch.tensor([0, 1]), 2))
    # Pure noise features score around chance.
    torch.manual_seed(1)
    noise = strategies.probe_accuracy(torch.randn(400, 16), torch.arange(400) % 4, 4)
    assert abs(noise - 0.25) < 0.1


@pytest.mark.parametrize(
    "per_class, probe, expected, groups",
    [
        (1, math.nan, pb.STRATEGY_PARTIAL, 3),  # 4 images in all: the top half alone
        (1.5, 0.9, pb.STRATEGY_FULL, 5),  # under 2 per class, 5 images or more in all: full
        (1.9, 0.9, pb.STRATEGY_FULL, 5),
        (2, 0.1, pb.STRATEGY_PROGRESSIVE_UNFREEZING, 5),  # 2 to 14 per class, whatever the probe says
        (2.5, 0.9, pb.STRATEGY_PROGRESSIVE_UNFREEZING, 5),  # 10 images: too few for full in the low band
        (3, 0.9, pb.STRATEGY_FULL, 5),  # 12 images, under 5.5 per class: full
        (5.4, 0.1, pb.STRATEGY_FULL, 5),
        (5.5, 0.9, pb.STRATEGY_PROGRESSIVE_UNFREEZING, 5),
        (14.9, 0.9, pb.STRATEGY_PROGRESSIVE_UNFREEZING, 5),
        (15, 0.9, pb.STRATEGY_FULL, 5),
        (50, 0.9, pb.STRATEGY_FULL, 5),  # small: the probe does not decide
        (50, 0.1, pb.STRATEGY_FULL, 5),
        (500, 0.9, pb.STRATEGY_PARTIAL, 3),  # ceil(5 / 2)
        (500, 0.4, pb.STRATEGY_FULL, 5),
    ],
)
def test_auto_table(per_class, probe, expected, groups):
    decision = strategies.decide(per_class, probe, num_classes=4, groups_below=5)
    assert decision.strategy == expected and decision.trainable_groups == groups
    assert decision.chance_accuracy == 0.25 and decision.images_per_class == per_class
    assert f"{per_class:.1f} training images per class" in decision.reason


def test_auto_in_the_low_band_weighs_the_whole_set():
    few = strategies.decide(3, 0.9, num_classes=2, groups_below=5)  # 6 images
    assert few.strategy == pb.STRATEGY_PROGRESSIVE_UNFREEZING
    enough = strategies.decide(3, 0.9, num_classes=5, groups_below=5)  # 15 images
    assert enough.strategy == pb.STRATEGY_FULL and "15 images in all (from 12)" in enough.reason


def test_auto_reason_states_the_probe_numbers():
    decision = strategies.decide(20, 0.8, num_classes=2, groups_below=4)
    assert decision.probe_accuracy == 0.8
    assert "0.800 against chance 0.500" in decision.reason and "full fine-tuning" in decision.reason


# -- checkpoint ------------------------------------------------------------------------------


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "last.pt"
    checkpoint.save({"rng": checkpoint.rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])  # torch.load(weights_only=True)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_training_from_scratch_uses_one_rate_for_every_layer():
    from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
    from tlserve.service.training.config import TrainConfig

    scratch = pb.WeightsSource(scratch=pb.WeightsSource.Scratch())
    kw = dict(num_classes=3, train_images_per_class=10, device_type="cpu")
    cfg = TrainConfig.from_request(pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_FULL, weights=scratch), **kw)
    assert cfg.from_scratch and (cfg.optimizer, cfg.layer_lr_decay, cfg.epochs) == ("adamw", 1.0, 30)
    pretrained = TrainConfig.from_request(pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_FULL), **kw)
    assert not pretrained.from_scratch and (pretrained.optimizer, pretrained.learning_rate) == ("adamw", 3e-4)
    assert cfg.learning_rate == 1e-3  # nothing pretrained to protect: a larger rate
    # Feature extraction keeps its own defaults: only the head trains anyway.
    fe = TrainConfig.from_request(
        pb.FineTuneRequest(backbone="resnet18", strategy=pb.STRATEGY_FEATURE_EXTRACTION, weights=scratch), **kw
    )
    assert fe.epochs == 15


def test_auto_from_scratch_trains_everything_without_probing():
    from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
    from tlserve.service.training import strategies

    decision = strategies.from_scratch(12.0, 4, 5)
    assert decision.strategy == pb.STRATEGY_FULL and decision.trainable_groups == 5
    assert "scratch" in decision.reason and decision.chance_accuracy == 0.25


def test_a_last_batch_of_one_image_is_dropped_only_when_it_would_occur():
    import torch
    from torch.utils.data import TensorDataset

    from tlserve.service.training.data import make_loader

    cpu = torch.device("cpu")
    nine = TensorDataset(torch.arange(9))
    assert [len(b[0]) for b in make_loader(nine, 4, shuffle=True, device=cpu)] == [4, 4]
    assert [len(b[0]) for b in make_loader(nine, 4, shuffle=False, device=cpu)] == [4, 4, 1]  # evaluation sees all
    ten = TensorDataset(torch.arange(10))
    assert [len(b[0]) for b in make_loader(ten, 4, shuffle=True, device=cpu)] == [4, 4, 2]
    # Two processes, 9 images: shards of 5 with batch 4 would end in a batch of 1.
    shard = make_loader(nine, 4, shuffle=True, device=cpu, rank=1, world_size=2)
    assert [len(b[0]) for b in shard] == [4]


def test_loader_workers_decode_only_for_a_gpu_and_only_for_large_splits():
    from tlserve.service.training.data import MAX_WORKERS, PARALLEL_DECODE_MIN_IMAGES, worker_count

    big = PARALLEL_DECODE_MIN_IMAGES
    assert worker_count(10_000, "cpu", cpus=16) == 0  # the CPU's cores are the model's
    assert worker_count(big - 1, "cuda", cpus=16) == 0
    assert worker_count(big, "cuda", cpus=16) == MAX_WORKERS
    assert worker_count(big, "cuda", cpus=4) == 3  # one core left for the training loop
    assert worker_count(big, "cuda", cpus=8, local_processes=2) == 3  # shared by two ranks
    assert worker_count(big, "cuda", cpus=1) == 0


# -- augmentation ------------------------------------------------------------------------------


def test_training_crops_show_the_scale_and_field_the_eval_view_shows():
    from PIL import Image

    from tlserve.service.training import data

    # 256 px resized, 224 px kept by eval: paint the band eval crops away red, the rest green.
    pre = backbones.Preprocessing(resize_size=256, crop_size=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                  interpolation="bilinear")
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    image[..., 0] = 255
    image[16:240, 16:240] = (0, 255, 0)
    picture = Image.fromarray(image)
    eval_view = data.eval_transform(pre)(picture)  # (3, 224, 224)
    assert eval_view[1].mean() > 0.97  # all green
    request = pb.FineTuneRequest(backbone="resnet18")
    config = TrainConfig.from_request(request, num_classes=2, train_images_per_class=10, device_type="cpu")
    train = data.train_transform(pre, config)
    torch.manual_seed(0)
    green = [train(picture)[1].mean().item() for _ in range(50)]
    # Crops of 80-100 % of the eval crop's area, around it: mostly what eval shows. A crop
    # of 80-100 % of the raw image would be a quarter red on average.
    assert min(green) > 0.8 and sum(green) / len(green) > 0.93


def test_training_opens_only_the_formats_ingestion_allows(tmp_path):
    """A file that changed after ingestion, now a GIF (or an EPS, whose decoder runs
    Ghostscript), is not parsed by training: the same four decoders as ingestion."""
    from PIL import Image, UnidentifiedImageError

    from tlserve.service.training.data import ImageDataset

    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path, "GIF")
    with pytest.raises(UnidentifiedImageError):
        ImageDataset([(path, 0)], transform=lambda image: image)[0]
    Image.new("RGB", (8, 8)).save(path, "PNG")
    assert ImageDataset([(path, 0)], transform=lambda image: image.size)[0] == ((8, 8), 0)
