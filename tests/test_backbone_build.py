"""Building models from the backbone registry: every family gets a new head, layer groups
that cover it, and weights from the torchvision cache, a file or an earlier tlserve model,
with mistakes reported as InvalidArgument naming the keys.

Models are built with random weights at their smallest input size and run in eval mode;
pretrained files are made here (saved state dicts), never downloaded."""

from __future__ import annotations

import collections

import pytest
import torch
import torchvision
from torchvision.models.regnet import BlockParams
from torchvision.models.vision_transformer import interpolate_embeddings

from tlserve.service import backbones
from tlserve.service.backbones import WeightsChoice, WeightsHashMismatch, WeightsNotCached, build
from tlserve.service.errors import FailedPrecondition, InvalidArgument, NotFound

NONE = WeightsChoice("none")

# The cheapest member of every family (fewest GFLOPs, checked below) and the smallest square input it
# accepts: its weights' `min_size`, or the size ViT / MaxViT are built for; CNNs whose
# minimum is 1 px run at 32.
FAMILY_REPRESENTATIVES = {
    "resnet": ("resnet18", 32),
    "resnext": ("resnext50_32x4d", 32),
    "wide_resnet": ("wide_resnet50_2", 32),
    "vgg": ("vgg11", 32),
    "alexnet": ("alexnet", 63),
    "densenet": ("densenet121", 29),
    "squeezenet": ("squeezenet1_1", 17),
    "mobilenet_v2": ("mobilenet_v2", 32),
    "mobilenet_v3": ("mobilenet_v3_small", 32),
    "mnasnet": ("mnasnet0_5", 32),
    "shufflenet_v2": ("shufflenet_v2_x0_5", 32),
    "efficientnet": ("efficientnet_b0", 32),
    "efficientnet_v2": ("efficientnet_v2_s", 33),
    "regnet": ("regnet_y_400mf", 32),
    "convnext": ("convnext_tiny", 32),
    "googlenet": ("googlenet", 15),
    "inception_v3": ("inception_v3", 75),
    "vit": ("vit_b_32", 32),  # one 32-px patch
    "swin": ("swin_t", 224),
    "maxvit": ("maxvit_t", 224),
}


def gflops(name: str) -> float:
    return backbones.get_spec(name).default.gflops


def assert_groups_partition(built: backbones.BuiltModel) -> None:
    owners = collections.Counter(id(p) for group in built.groups for p in group.parameters())
    assert set(owners.values()) == {1}, "a parameter is in two groups"
    assert set(owners) == {id(p) for p in built.model.parameters()}
    assert built.groups[-1].name == "head" and built.groups[-1].modules == [built.head]
    assert [g.name for g in built.groups] == list(backbones.layer_groups(built.backbone))
    assert all(any(True for _ in group.parameters()) for group in built.groups), "an empty group"


def trunk_equals(trunk: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state_dict[k]) for k, v in trunk.state_dict().items())


# -- every family -------------------------------------------------------------


def test_the_representatives_are_the_cheapest_member_of_every_family():
    assert set(FAMILY_REPRESENTATIVES) == set(backbones.families())
    for family, (name, _) in FAMILY_REPRESENTATIVES.items():
        members = [spec.name for spec in backbones.list_specs(family)]
        assert gflops(name) == min(gflops(m) for m in members), family


@pytest.mark.parametrize(("name", "size"), FAMILY_REPRESENTATIVES.values(), ids=list(FAMILY_REPRESENTATIVES))
def test_every_family_builds_a_classifier_with_a_new_head_and_groups_that_cover_it(name, size):
    torch.manual_seed(0)
    built = build(name, 3, weights=NONE, weights_dir="unused", head_dropout=0.2, image_size=size)
    built.model.eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = built.model(images)
        features = built.trunk(images)

    assert logits.shape == (2, 3)
    assert features.shape == (2, built.feature_dim)
    assert built.model.trunk is built.trunk and built.model.head is built.head
    dropout, linear = built.head
    assert dropout.p == 0.2 and (linear.in_features, linear.out_features) == (built.feature_dim, 3)
    assert {key.split(".")[0] for key in built.model.state_dict()} == {"trunk", "head"}
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in built.trunk.modules())
    assert built.preprocessing.crop_size == size
    assert built.backbone == name
    assert_groups_partition(built)


@pytest.fixture
def regnet_on_meta(monkeypatch):
    # RegNet's builder computes its stage widths with tensors and reads them back with
    # .tolist(), which the meta device can't: compute them on the CPU.
    compute = BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return compute(cls, *args, **kwargs)

    monkeypatch.setattr(BlockParams, "from_init_params", classmethod(on_cpu))


@pytest.mark.parametrize("name", backbones.backbone_names())
def test_every_backbone_builds_with_the_group_names_its_metadata_gives(name, regnet_on_meta):
    # On the meta device (shapes, no memory): even vit_h_14 and regnet_y_128gf build in a second.
    with torch.device("meta"):
        built = build(name, 3, weights=NONE, weights_dir="unused")
    assert_groups_partition(built)  # also: names == layer_groups(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", backbones.backbone_names())
def test_every_backbone_maps_images_to_features_and_logits_at_its_input_size(name, regnet_on_meta):
    with torch.device("meta"):
        built = build(name, 3, weights=NONE, weights_dir="unused")
        size = built.preprocessing.crop_size
        images = torch.empty(2, 3, size, size)
        assert built.trunk.eval()(images).shape == (2, built.feature_dim)
        assert built.model.eval()(images).shape == (2, 3)


def test_layer_groups_are_known_without_building():
    assert backbones.layer_groups("resnet50") == ("stem", "layer1", "layer2", "layer3", "layer4", "head")
    assert backbones.layer_groups("vgg16_bn") == ("stem", "stage1", "stage2", "stage3", "stage4", "fc", "head")
    with pytest.raises(backbones.UnknownBackbone):
        backbones.layer_groups("resnet51")


def test_trainable_groups_are_the_top_n_below_the_head_and_the_head():
    built = build("resnet18", 2, weights=NONE, weights_dir="unused")
    names = lambda n: [g.name for g in backbones.trainable_groups(built, n)]  # noqa: E731
    assert names(0) == ["head"]
    assert names(2) == ["layer3", "layer4", "head"]
    assert names(99) == [g.name for g in built.groups]
    with pytest.raises(InvalidArgument):
        backbones.trainable_groups(built, -1)


# -- preprocessing and arguments ----------------------------------------------


def test_preprocessing_is_the_weights_own_and_image_size_keeps_the_resize_ratio():
    spec = backbones.get_spec("mobilenet_v3_small")
    built = build("mobilenet_v3_small", 2, weights=NONE, weights_dir="unused")
    assert built.preprocessing == spec.default.preprocessing  # 256 → 224
    built = build("mobilenet_v3_small", 2, weights=NONE, weights_dir="unused", image_size=112)
    assert (built.preprocessing.resize_size, built.preprocessing.crop_size) == (128, 112)
    assert built.preprocessing.mean == spec.default.preprocessing.mean


def test_preprocessing_given_with_the_weights_is_kept(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    kept = backbones.Preprocessing(160, 144, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")
    built = build("mobilenet_v3_small", 2, weights=WeightsChoice("file", path=path, preprocessing=kept), weights_dir="unused")
    assert built.preprocessing == kept


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weights": WeightsChoice("imagenet")}, "weights kind"),
        ({"num_classes": 0}, "num_classes"),
        ({"head_dropout": 1.0}, "head_dropout"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": 8}, "too small"),
        ({"weights": WeightsChoice("torchvision", "IMAGENET1K_V9")}, "IMAGENET1K_V9"),
        ({"weights": WeightsChoice("file")}, "path"),
        ({"weights": WeightsChoice("tlserve")}, "state dict"),
    ],
)
def test_bad_arguments_are_invalid_and_name_the_field(kwargs, field):
    arguments = {"num_classes": 2, "weights": NONE, "weights_dir": "unused"} | kwargs
    with pytest.raises(InvalidArgument, match=field):
        build("squeezenet1_1", **arguments)  # min_size 17


def test_swin_refuses_sizes_below_its_weights_minimum():
    with pytest.raises(InvalidArgument, match="minimum is 224"):
        build("swin_t", 2, weights=NONE, weights_dir="unused", image_size=64)


# -- weights: the torchvision cache -------------------------------------------


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()  # the ImageNet architecture, fc included


def cache_resnet18(weights_dir, state) -> None:
    torch.save(state, backbones.weights_path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, weights_dir))


def test_torchvision_weights_load_from_the_cache_and_the_head_is_new(tmp_path, resnet18_state):
    cache_resnet18(tmp_path, resnet18_state)
    built = build(
        "resnet18", 3, weights=WeightsChoice("torchvision", "IMAGENET1K_V1"), weights_dir=tmp_path, check_hash=False
    )
    assert trunk_equals(built.trunk, resnet18_state)
    assert built.head[1].weight.shape == (3, 512)
    assert built.preprocessing == backbones.resolve_weights("resnet18").preprocessing


def test_torchvision_weights_are_hash_checked_by_default(tmp_path, resnet18_state):
    cache_resnet18(tmp_path, resnet18_state)
    with pytest.raises(WeightsHashMismatch):
        build("resnet18", 3, weights=WeightsChoice("torchvision"), weights_dir=tmp_path)


def test_weights_not_in_the_cache_fail_the_precondition_with_the_fix(tmp_path):
    with pytest.raises(WeightsNotCached) as raised:
        build("resnet18", 3, weights=WeightsChoice("torchvision"), weights_dir=tmp_path)
    assert isinstance(raised.value, FailedPrecondition)
    assert str(tmp_path / "resnet18-f37072fd.pth") in str(raised.value)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_inception_weights_load_without_aux_heads_and_keep_transform_input(tmp_path, name):
    # torchvision's checkpoints hold the auxiliary classifiers: built with aux_logits=True.
    state = torchvision.models.get_model(name, aux_logits=True, init_weights=False).state_dict()
    weights = backbones.resolve_weights(name)
    torch.save(state, backbones.weights_path(weights.enum, tmp_path))
    pretrained = build(name, 3, weights=WeightsChoice("torchvision"), weights_dir=tmp_path, check_hash=False)
    scratch = build(name, 3, weights=NONE, weights_dir=tmp_path)

    assert trunk_equals(pretrained.trunk, state)
    assert pretrained.trunk.transform_input and not scratch.trunk.transform_input  # as torchvision
    for built in (pretrained, scratch):
        assert not built.trunk.aux_logits
        assert not any("aux" in key.lower() for key in built.model.state_dict())
        size = built.preprocessing.crop_size
        assert isinstance(built.model.train()(torch.randn(2, 3, size, size)), torch.Tensor)  # no aux outputs


# -- weights: a file ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["full torchvision model", "trunk only", "reference checkpoint", "tlserve model"])
def test_a_weights_file_loads_in_any_layout(tmp_path, resnet18_state, layout):
    trunk_only = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}
    saved = {
        "full torchvision model": resnet18_state,
        "trunk only": trunk_only,
        "reference checkpoint": {"model": resnet18_state, "epoch": 3},  # torchvision references/
        "tlserve model": {**{f"trunk.{k}": v for k, v in trunk_only.items()}, "head.1.bias": torch.zeros(7)},
    }[layout]
    torch.save(saved, tmp_path / "w.pth")
    built = build("resnet18", 2, weights=WeightsChoice("file", path=tmp_path / "w.pth"), weights_dir="unused")
    assert trunk_equals(built.trunk, resnet18_state)
    assert built.preprocessing == backbones.get_spec("resnet18").default.preprocessing


def test_a_file_of_another_architecture_is_invalid_and_names_the_keys(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "w.pth")
    with pytest.raises(InvalidArgument, match=r"unexpected keys: layer1\.2\.conv1\.weight"):
        build("resnet18", 2, weights=WeightsChoice("file", path=tmp_path / "w.pth"), weights_dir="unused")


def test_a_file_with_a_mismatched_shape_names_the_key_and_both_shapes(tmp_path, resnet18_state):
    state = dict(resnet18_state, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(InvalidArgument, match=r"conv1\.weight \(64, 3, 3, 3\) \(model: \(64, 3, 7, 7\)\)"):
        build("resnet18", 2, weights=WeightsChoice("file", path=tmp_path / "w.pth"), weights_dir="unused")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda path: torch.save(torch.zeros(3), path), "holds a Tensor, not a state dict"),
        (lambda path: torch.save({}, path), "not a state dict"),
        (lambda path: path.write_bytes(b"not a zip"), "can't be read as a state dict"),
        # A pickled module would run code when unpickled: weights_only refuses it.
        (lambda path: torch.save(torchvision.models.squeezenet1_1(), path), "can't be read as a state dict"),
    ],
    ids=["tensor", "empty", "garbage", "pickled module"],
)
def test_a_file_that_is_not_a_state_dict_is_invalid(tmp_path, content, message):
    content(tmp_path / "w.pth")
    with pytest.raises(InvalidArgument, match=message):
        build("squeezenet1_1", 2, weights=WeightsChoice("file", path=tmp_path / "w.pth"), weights_dir="unused")


def test_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="w.pth"):
        build("resnet18", 2, weights=WeightsChoice("file", path=tmp_path / "w.pth"), weights_dir="unused")


# -- weights: an earlier tlserve model (chained transfer) ---------------------


def test_a_tlserve_model_chains_its_trunk_into_a_new_task():
    source = build("resnet18", 4, weights=NONE, weights_dir="unused")
    with torch.no_grad():
        for parameter in source.model.parameters():
            parameter.add_(1.0)  # "trained": differs from any fresh initialisation
    state = source.model.state_dict()

    target = build("resnet18", 2, weights=WeightsChoice("tlserve", state_dict=state), weights_dir="unused")

    assert trunk_equals(target.trunk, source.trunk.state_dict())
    assert target.head[1].weight.shape == (2, 512)


def test_a_tlserve_model_of_another_backbone_is_invalid_and_names_the_keys():
    state = build("resnet34", 4, weights=NONE, weights_dir="unused").model.state_dict()
    with pytest.raises(InvalidArgument, match=r"unexpected keys: layer1\.2\."):
        build("resnet18", 2, weights=WeightsChoice("tlserve", state_dict=state), weights_dir="unused")


def test_a_state_dict_without_trunk_keys_is_not_a_tlserve_model(resnet18_state):
    with pytest.raises(InvalidArgument, match="trunk"):
        build("resnet18", 2, weights=WeightsChoice("tlserve", state_dict=resnet18_state), weights_dir="unused")


def test_versioned_modules_load_chained_and_from_plain_dicts(tmp_path):
    # MNASNet refuses a state dict without its format version (`_metadata`): the version
    # follows the "trunk." prefix, and a plain dict is taken to be in the current format.
    source = build("mnasnet0_5", 4, weights=NONE, weights_dir="unused")
    chained = build(
        "mnasnet0_5", 2, weights=WeightsChoice("tlserve", state_dict=source.model.state_dict()), weights_dir="unused"
    )
    torch.save(dict(source.trunk.state_dict()), tmp_path / "plain.pth")
    from_file = build("mnasnet0_5", 2, weights=WeightsChoice("file", path=tmp_path / "plain.pth"), weights_dir="unused")
    assert trunk_equals(chained.trunk, source.trunk.state_dict())
    assert trunk_equals(from_file.trunk, source.trunk.state_dict())


# -- ViT and MaxViT: built for one input size ---------------------------------


def test_vit_is_built_for_the_image_size_and_refuses_sizes_its_patches_do_not_divide():
    built = build("vit_b_32", 2, weights=NONE, weights_dir="unused", image_size=64)
    assert built.trunk.image_size == 64
    assert built.trunk.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)  # class token + 2×2 patches
    with pytest.raises(InvalidArgument, match="multiple of its patch size 32"):
        build("vit_b_32", 2, weights=NONE, weights_dir="unused", image_size=48)


def test_vit_weights_are_resampled_to_another_image_size(tmp_path):
    # A full-shaped checkpoint in a few kB: an expanded tensor is saved as its one-element
    # storage. Only the position embedding, the tensor that gets resampled, is real.
    model = torchvision.models.vit_b_32()
    state = collections.OrderedDict((k, torch.zeros(()).expand(v.shape)) for k, v in model.state_dict().items())
    state["encoder.pos_embedding"] = torch.randn(1, 1 + 7 * 7, 768)
    weights = backbones.resolve_weights("vit_b_32")
    torch.save(state, backbones.weights_path(weights.enum, tmp_path))
    choice = WeightsChoice("torchvision")

    native = build("vit_b_32", 2, weights=choice, weights_dir=tmp_path, check_hash=False)
    resized = build("vit_b_32", 2, weights=choice, weights_dir=tmp_path, check_hash=False, image_size=96)

    assert native.trunk.image_size == weights.enum.meta["min_size"][0] == native.preprocessing.crop_size == 224
    assert torch.equal(native.trunk.encoder.pos_embedding, state["encoder.pos_embedding"])
    expected = interpolate_embeddings(96, 32, state)["encoder.pos_embedding"]
    assert resized.trunk.encoder.pos_embedding.shape == (1, 1 + 3 * 3, 768)
    assert torch.equal(resized.trunk.encoder.pos_embedding, expected)

    # And chained from that model into one at yet another size.
    chained = build(
        "vit_b_32", 3, weights=WeightsChoice("tlserve", state_dict=resized.model.state_dict()),
        weights_dir="unused", image_size=64,
    )
    assert chained.trunk.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)


def test_vit_groups_hold_the_class_token_and_position_embedding_after_a_move():
    built = build("vit_b_32", 2, weights=NONE, weights_dir="unused", image_size=32)
    built.model.to(torch.float64)
    stem = {id(p) for p in built.groups[0].parameters()}
    assert {id(built.trunk.class_token), id(built.trunk.encoder.pos_embedding)} <= stem
    assert all(p.dtype == torch.float64 for group in built.groups for p in group.parameters())
    assert_groups_partition(built)


def test_vit_groups_split_the_encoder_blocks_in_four_equal_parts():
    with torch.device("meta"):
        built = build("vit_b_16", 2, weights=NONE, weights_dir="unused")
    blocks = [sum(isinstance(m, torchvision.models.vision_transformer.EncoderBlock) for m in g.modules) for g in built.groups]
    assert blocks == [0, 3, 3, 3, 3, 0]
    assert built.trunk.encoder.ln in built.groups[4].modules


def test_maxvit_builds_for_sizes_its_partitions_divide_and_refuses_others():
    built = build("maxvit_t", 2, weights=NONE, weights_dir="unused", image_size=448)
    assert built.trunk.blocks[-1].grid_size == (14, 14)  # 448 / 32: two 7×7 partitions a side
    with pytest.raises(InvalidArgument, match="partition size 7"):
        build("maxvit_t", 2, weights=NONE, weights_dir="unused", image_size=256)
