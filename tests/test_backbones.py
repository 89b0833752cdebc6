"""The backbone registry: complete, with metadata that is torchvision's own and true,
a weights cache that loads only what is there, and errors that list the valid names."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones
from tlserve.service.backbones import (
    UnknownBackbone,
    UnknownFamily,
    UnknownWeights,
    WeightsHashMismatch,
    WeightsNotCached,
)

ALL_NAMES = backbones.backbone_names()
SMALL_MODELS = ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "regnet_y_400mf", "shufflenet_v2_x0_5"]


def test_registry_is_every_torchvision_classification_model_and_nothing_else():
    assert set(ALL_NAMES) == set(torchvision.models.list_models(module=torchvision.models))
    assert len(ALL_NAMES) >= 80
    for not_classification in ["fasterrcnn_resnet50_fpn", "deeplabv3_resnet50", "r3d_18", "raft_small"]:
        assert not_classification not in ALL_NAMES
    assert not any(name.startswith("quantized_") for name in ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_backbone_has_a_family_and_a_plausible_spec_sheet(name):
    spec = backbones.get_spec(name)
    assert spec.family in backbones.families()
    assert spec.default.is_default and sum(w.is_default for w in spec.weights) == 1
    assert spec.input_size == spec.default.preprocessing.crop_size > 0
    for weights in spec.weights:
        assert weights.parameter_count > 0
        assert weights.gflops > 0
        assert weights.file_size_bytes > 0
        assert 0 < weights.top1_accuracy <= weights.top5_accuracy <= 1
        pre = weights.preprocessing
        assert pre.resize_size >= pre.crop_size > 0
        assert len(pre.mean) == len(pre.std) == 3
        assert all(0 < s < 1 for s in pre.std)
        assert pre.interpolation in {"bilinear", "bicubic"}
        assert weights.file_name.endswith(".pth")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_metadata_is_torchvisions_own(name):
    spec = backbones.get_spec(name)
    enum = torchvision.models.get_model_weights(name)
    # Every member with a trained ImageNet head, DEFAULT first, then torchvision's order.
    members = [enum.DEFAULT, *(m for m in enum if m is not enum.DEFAULT)]
    assert [w.enum for w in spec.weights] == [m for m in members if backbones.has_imagenet_classifier(m)]
    for weights in spec.weights:
        member = weights.enum
        meta = member.meta
        transform = member.transforms()
        assert weights.name == str(member)
        imagenet = meta["_metrics"]["ImageNet-1K"]  # percent
        assert weights.top1_accuracy == pytest.approx(imagenet["acc@1"] / 100, abs=1e-9)
        assert weights.top5_accuracy == pytest.approx(imagenet["acc@5"] / 100, abs=1e-9)
        assert weights.parameter_count == meta["num_params"]
        assert weights.gflops == meta["_ops"]
        # torchvision's "MB" is MiB rounded to 3 decimals.
        assert abs(weights.file_size_bytes - meta["_file_size"] * 2**20) <= 0.5
        assert [weights.preprocessing.crop_size] == transform.crop_size
        assert [weights.preprocessing.resize_size] == transform.resize_size
        assert list(weights.preprocessing.mean) == transform.mean
        assert list(weights.preprocessing.std) == transform.std
        assert weights.preprocessing.interpolation == transform.interpolation.value
        assert weights.file_name == member.url.rsplit("/", 1)[-1]


def test_only_weights_without_a_trained_imagenet_head_are_left_out():
    left_out = [
        str(member)
        for name in ALL_NAMES
        for member in torchvision.models.get_model_weights(name)
        if member not in {w.enum for w in backbones.get_spec(name).weights}
    ]
    assert left_out == ["VGG16_Weights.IMAGENET1K_FEATURES"]
    features_only = torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES.meta
    assert math.isnan(features_only["_metrics"]["ImageNet-1K"]["acc@1"])
    assert features_only["categories"] is None


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_parameter_count_matches_the_real_model(name):
    model = torchvision.models.get_model(name, weights=None)
    assert sum(p.numel() for p in model.parameters()) == backbones.get_spec(name).default.parameter_count


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("resnet50", "resnet"),
        ("wide_resnet50_2", "wide_resnet"),
        ("resnext101_64x4d", "resnext"),
        ("efficientnet_b0", "efficientnet"),
        ("efficientnet_v2_s", "efficientnet_v2"),
        ("mobilenet_v3_large", "mobilenet_v3"),
        ("swin_v2_t", "swin"),
        ("maxvit_t", "maxvit"),
        ("vit_b_16", "vit"),
        ("vgg16_bn", "vgg"),
    ],
)
def test_family_rule_picks_the_most_specific_prefix(name, family):
    assert backbones.family_of(name) == family


def test_every_family_has_at_least_one_backbone():
    assert {backbones.get_spec(name).family for name in ALL_NAMES} == set(backbones.families())


def test_unknown_backbone_lists_the_valid_names_sorted():
    with pytest.raises(UnknownBackbone) as raised:
        backbones.get_spec("resnet51")
    message = str(raised.value)
    assert "'resnet51'" in message
    assert ", ".join(sorted(ALL_NAMES)) in message
    assert isinstance(raised.value, KeyError)


def test_unknown_family_lists_the_families():
    with pytest.raises(UnknownFamily, match="resnet, resnext, shufflenet_v2"):
        backbones.list_specs("resent")


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ("DEFAULT", "ResNet50_Weights.IMAGENET1K_V2"),
        ("IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V1"),
        ("ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V1"),
    ],
)
def test_resolve_weights_by_default_member_or_full_name(weights, expected):
    resolved = backbones.resolve_weights("resnet50", weights)
    assert resolved.name == expected
    assert resolved.enum is torchvision.models.get_weight(expected)


@pytest.mark.parametrize("weights", ["IMAGENET1K_V3", "ResNet18_Weights.IMAGENET1K_V1", "imagenet1k_v1"])
def test_unknown_weights_list_the_models_weights(weights):
    with pytest.raises(UnknownWeights) as raised:
        backbones.resolve_weights("resnet50", weights)
    message = str(raised.value)
    assert "DEFAULT, ResNet50_Weights.IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1" in message
    assert isinstance(raised.value, ValueError)


def test_list_specs_filters_by_family():
    names = [spec.name for spec in backbones.list_specs("resnet")]
    assert names == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert len(backbones.list_specs()) == len(ALL_NAMES)


def test_nothing_is_cached_in_an_empty_dir(tmp_path):
    assert backbones.list_specs(cached_only=True, weights_dir=tmp_path) == []
    response = backbones.list_backbones_response("", False, tmp_path)
    assert len(response.backbones) == len(ALL_NAMES)
    assert response.weights_cache_dir == str(tmp_path)
    assert not any(b.cached or any(w.cached for w in b.weights) for b in response.backbones)


def test_a_file_with_the_expected_name_makes_weights_cached(tmp_path):
    default = torchvision.models.ResNet50_Weights.DEFAULT
    path = backbones.weights_path(default, tmp_path)
    assert path == tmp_path / "resnet50-11ad3fa6.pth"
    path.write_bytes(b"")

    response = backbones.list_backbones_response("", True, tmp_path)
    [resnet50] = response.backbones
    assert resnet50.name == "resnet50" and resnet50.cached
    assert [(w.name, w.cached) for w in resnet50.weights] == [
        ("ResNet50_Weights.IMAGENET1K_V2", True),
        ("ResNet50_Weights.IMAGENET1K_V1", False),
    ]


def test_backbone_proto_carries_the_default_weights_figures(tmp_path):
    spec = backbones.get_spec("efficientnet_b1")  # two weights, DEFAULT is V2 at 240 px
    message = spec.to_proto(tmp_path)
    assert isinstance(message, pb.Backbone)
    default = message.weights[0]
    assert default.name == "EfficientNet_B1_Weights.IMAGENET1K_V2" and default.is_default
    assert message.input_size == default.preprocessing.crop_size == 240
    assert message.parameter_count == default.parameter_count
    assert message.gflops == default.gflops
    assert message.imagenet_top1_accuracy == default.imagenet_top1_accuracy
    assert message.imagenet_top5_accuracy == default.imagenet_top5_accuracy
    assert message.file_size_bytes == default.file_size_bytes
    assert not message.weights[1].is_default


def test_loading_missing_weights_names_the_url_and_the_target_path(tmp_path):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(WeightsNotCached) as raised:
        backbones.load_pretrained_state_dict(weights, tmp_path)
    assert weights.url in str(raised.value)
    assert str(tmp_path / "resnet18-f37072fd.pth") in str(raised.value)
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing created


def test_a_locally_saved_state_dict_loads_from_the_cache_without_hash_check(tmp_path):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    saved = torchvision.models.resnet18().state_dict()
    torch.save(saved, backbones.weights_path(weights, tmp_path))

    loaded = backbones.load_pretrained_state_dict(weights, tmp_path, check_hash=False)

    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    torchvision.models.resnet18().load_state_dict(loaded)


def test_a_file_whose_hash_does_not_match_its_name_is_refused(tmp_path):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = backbones.weights_path(weights, tmp_path)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsHashMismatch, match="resnet18-f37072fd.pth"):
        backbones.load_pretrained_state_dict(weights, tmp_path)


def test_legacy_densenet_keys_are_renamed_on_load(tmp_path):
    weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    legacy = {
        "features.denseblock1.denselayer1.norm.1.weight": torch.ones(3),
        "classifier.bias": torch.zeros(2),
    }
    torch.save(legacy, backbones.weights_path(weights, tmp_path))
    loaded = backbones.load_pretrained_state_dict(weights, tmp_path, check_hash=False)
    assert set(loaded) == {"features.denseblock1.denselayer1.norm1.weight", "classifier.bias"}
