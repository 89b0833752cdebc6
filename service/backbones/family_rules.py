"""What differs between architecture families: where the final classifier is, the
builder arguments their weights need, and how each trunk splits into named layer
groups, bottom → top (one `_FamilyRule` per family in `_FAMILY_RULES`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.hub
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

from tlserve.service.backbones.registry import WeightsSpec, get_spec
from tlserve.service.errors import InvalidArgument


class _Parameters(nn.Module):
    """Parameters that are plain attributes of a bigger module (ViT's class token and
    position embedding), gathered as a module so that a LayerGroup can hold them. It
    shares the tensors and is not part of the model: state-dict keys are unchanged."""

    def __init__(self, **parameters: nn.Parameter) -> None:
        super().__init__()
        for name, parameter in parameters.items():
            self.register_parameter(name, parameter)


# Cutting the final classifier. Whatever precedes it stays in the trunk: VGG's and
# AlexNet's 4096-d fc layers, MobileNetV3's hidden Linear + Hardswish, ConvNeXt's
# LayerNorm2d + Flatten, MaxViT's LayerNorm + Linear + Tanh, and torchvision's own
# dropout before the final layer where a model has one (head_dropout adds to it).


def _cut_final_linear(model: nn.Module, path: str) -> int:
    linear = model.get_submodule(path)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{type(model).__name__}.{path} is a {type(linear).__name__}, not the final Linear")
    model.set_submodule(path, nn.Identity())
    return linear.in_features


def _cut_squeezenet(model: nn.Module, path: str) -> int:
    # SqueezeNet classifies with Dropout, Conv2d(512, classes, 1), ReLU, global average
    # pool, then flattens in forward(). Keeping only the pool gives (N, 512, 1, 1) → (N, 512).
    conv = model.get_submodule(path)[1]
    model.set_submodule(path, nn.AdaptiveAvgPool2d((1, 1)))
    return conv.in_channels


# Splitting a trunk into layer groups: each function returns the modules of each group
# below the head, bottom → top, in the order of the rule's `groups` names.

_STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")


def _resnet_groups(m: nn.Module) -> list[list[nn.Module]]:
    return [[m.conv1, m.bn1], [m.layer1], [m.layer2], [m.layer3], [m.layer4]]


def _regnet_groups(m: nn.Module) -> list[list[nn.Module]]:
    return [[m.stem], *([block] for block in m.trunk_output.children())]  # block1..block4


def _shufflenet_groups(m: nn.Module) -> list[list[nn.Module]]:
    return [[m.conv1], [m.stage2], [m.stage3], [m.stage4, m.conv5]]


def _densenet_groups(m: nn.Module) -> list[list[nn.Module]]:
    f = m.features
    return [
        [f.conv0, f.norm0],
        [f.denseblock1, f.transition1],
        [f.denseblock2, f.transition2],
        [f.denseblock3, f.transition3],
        [f.denseblock4, f.norm5],
    ]


def _googlenet_groups(m: nn.Module) -> list[list[nn.Module]]:
    return [
        [m.conv1, m.conv2, m.conv3],
        [m.inception3a, m.inception3b],
        [m.inception4a, m.inception4b, m.inception4c, m.inception4d, m.inception4e],
        [m.inception5a, m.inception5b],
    ]


def _inception_v3_groups(m: nn.Module) -> list[list[nn.Module]]:
    return [
        [m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.Conv2d_3b_1x1, m.Conv2d_4a_3x3],
        [m.Mixed_5b, m.Mixed_5c, m.Mixed_5d],
        [m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e],
        [m.Mixed_7a, m.Mixed_7b, m.Mixed_7c],
    ]


def _hierarchical_groups(f: nn.Sequential, last: nn.Module) -> list[list[nn.Module]]:
    # Swin's and ConvNeXt's `features`: patch embedding, then four stages, each but the
    # first after its downsampling layer (patch merging / LayerNorm + strided conv).
    return [[f[0]], [f[1]], [f[2], f[3]], [f[4], f[5]], [f[6], f[7], last]]


def _swin_groups(m: nn.Module) -> list[list[nn.Module]]:
    return _hierarchical_groups(m.features, m.norm)


def _convnext_groups(m: nn.Module) -> list[list[nn.Module]]:
    return _hierarchical_groups(m.features, m.classifier)  # LayerNorm2d + Flatten, cut


def _maxvit_groups(m: nn.Module) -> list[list[nn.Module]]:
    return [[m.stem], *([block] for block in m.blocks), [m.classifier]]  # fc: LayerNorm, Linear, Tanh


def _vit_groups(m: nn.Module) -> list[list[nn.Module]]:
    embedding = _Parameters(class_token=m.class_token, pos_embedding=m.encoder.pos_embedding)
    blocks = list(m.encoder.layers)  # 12, 24 or 32: four equal groups
    size, extra = divmod(len(blocks), 4)
    bounds = [0]
    for i in range(4):
        bounds.append(bounds[-1] + size + (i < extra))
    stages = [blocks[start:stop] for start, stop in zip(bounds, bounds[1:])]
    stages[-1].append(m.encoder.ln)
    return [[m.conv_proj, embedding], *stages]


def _ending_at_pools(layers: nn.Sequential) -> list[list[nn.Module]]:
    # VGG, AlexNet, SqueezeNet: conv blocks separated by max pools.
    groups: list[list[nn.Module]] = [[]]
    for layer in layers:
        groups[-1].append(layer)
        if isinstance(layer, nn.MaxPool2d):
            groups.append([])
    return [group for group in groups if group]


def _conv_and_fc_groups(m: nn.Module) -> list[list[nn.Module]]:
    return [*_ending_at_pools(m.features), [m.classifier]]  # fc: the 4096-d layers, cut


def _squeezenet_groups(m: nn.Module) -> list[list[nn.Module]]:
    return _ending_at_pools(m.features)


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(c, nn.Conv2d) and max(c.stride) > 1 for c in module.modules())


def _starting_at_downsampling(layers: nn.Sequential) -> list[list[nn.Module]]:
    # MobileNet, EfficientNet, MNASNet list blocks flat in `features`: a stage begins
    # at each strided block, so the five groups run at strides 2, 4, 8, 16 and 32.
    groups: list[list[nn.Module]] = []
    for layer in layers:
        if not groups or _downsamples(layer):
            groups.append([])
        groups[-1].append(layer)
    return groups


def _mobilenet_v3_groups(m: nn.Module) -> list[list[nn.Module]]:
    return [*_starting_at_downsampling(m.features), [m.classifier]]  # fc: Linear + Hardswish


# Input sizes. Most families accept any size from their weights' `min_size` up; ViT and
# MaxViT are built for one size (their builder's `image_size` / `input_size`).


def _check_min_size(name: str, size: int, weights: WeightsSpec) -> None:
    (minimum, _) = weights.enum.meta["min_size"]
    if size < minimum:
        raise InvalidArgument(f"image_size {size} is too small for {name}: the minimum is {minimum}")


def _check_patch_multiple(name: str, size: int, weights: WeightsSpec) -> None:
    patch = int(name.rsplit("_", 1)[1])  # vit_b_16: 16-pixel patches
    if size % patch:
        raise InvalidArgument(
            f"image_size {size} does not suit {name}: it must be a multiple of its patch size {patch}"
        )


def _fit_position_embedding(trunk: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViT's position embedding has a row per patch plus the class token's. Weights made
    at another image size are resampled (bicubic) to this model's patch grid, as
    torchvision's `interpolate_embeddings` does for fine-tuning at a new resolution."""
    source = state_dict.get("encoder.pos_embedding")
    if not isinstance(source, torch.Tensor) or source.shape == trunk.encoder.pos_embedding.shape:
        return state_dict
    try:
        return interpolate_embeddings(trunk.image_size, trunk.patch_size, state_dict)
    except ValueError as error:  # not (1, 1 + a square number of patches, hidden)
        raise InvalidArgument(
            f"the position embedding of shape {tuple(source.shape)} can't be resampled to image size "
            f"{trunk.image_size}: {error}"
        ) from error


def _same(trunk: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state_dict


def _no_kwargs(pretrained: bool, size: int) -> dict:
    return {}


def _inception_kwargs(pretrained: bool, size: int) -> dict:
    # GoogLeNet's and Inception v3's weights were ported from TensorFlow and expect
    # pixels normalised with mean 0.5 and std 0.5; their weights' preprocessing is
    # ImageNet's mean/std, and `transform_input` converts the one into the other inside
    # the model. torchvision sets it for pretrained weights only, and so do we: weights
    # from a file or an earlier tlserve model are taken to descend from torchvision's (the
    # flag is no tensor, so no state dict records it). Auxiliary classifiers are never
    # built: their tensors are dropped from sources instead, and the model returns plain
    # logits in training mode too. init_weights: torchvision's own init (slow) when it is
    # not overwritten, and explicit to silence its FutureWarning.
    return {"aux_logits": False, "transform_input": pretrained, "init_weights": not pretrained}


@dataclasses.dataclass(frozen=True)
class _FamilyRule:
    classifier: str  # path of torchvision's final classifier, cut from the trunk
    groups: tuple[str, ...]  # names of the trunk's layer groups, bottom → top
    split: Callable[[nn.Module], list[list[nn.Module]]]  # trunk → modules of each group
    cut: Callable[[nn.Module, str], int] = _cut_final_linear  # → feature_dim
    aux: tuple[str, ...] = ()  # auxiliary classifiers of torchvision's checkpoints
    builder_kwargs: Callable[[bool, int], dict] = _no_kwargs  # (pretrained, input size)
    check_size: Callable[[str, int, WeightsSpec], None] = _check_min_size
    adapt: Callable[[nn.Module, dict], dict] = _same  # a source state dict → this trunk's

    @property
    def discarded_prefixes(self) -> tuple[str, ...]:
        """Keys of torchvision's checkpoints that the trunk has no place for."""
        return tuple(f"{module}." for module in (self.classifier, *self.aux))


_RESNET = _FamilyRule("fc", ("stem", "layer1", "layer2", "layer3", "layer4"), _resnet_groups)
_EFFICIENTNET = _FamilyRule("classifier.1", _STAGES, lambda m: _starting_at_downsampling(m.features))
_INCEPTION_GROUPS = ("stem", "stage1", "stage2", "stage3")

# Group names follow torchvision's module names where its stages carry numbers of their
# own (ResNet layer1-4, ShuffleNet stage2-4, GoogLeNet inception3-5, Inception v3
# Mixed_5-7); "fc" is a group of hidden fully connected layers below the head.
_FAMILY_RULES: dict[str, _FamilyRule] = {
    "resnet": _RESNET,
    "resnext": _RESNET,
    "wide_resnet": _RESNET,
    "vgg": _FamilyRule("classifier.6", (*_STAGES, "fc"), _conv_and_fc_groups),
    "alexnet": _FamilyRule("classifier.6", ("stem", "stage1", "stage2", "fc"), _conv_and_fc_groups),
    "densenet": _FamilyRule("classifier", _STAGES, _densenet_groups),
    "squeezenet": _FamilyRule("classifier", _STAGES[:4], _squeezenet_groups, cut=_cut_squeezenet),
    "mobilenet_v2": _EFFICIENTNET,
    "mobilenet_v3": _FamilyRule("classifier.3", (*_STAGES, "fc"), _mobilenet_v3_groups),
    "mnasnet": _FamilyRule("classifier.1", _STAGES, lambda m: _starting_at_downsampling(m.layers)),
    "shufflenet_v2": _FamilyRule("fc", ("stem", "stage2", "stage3", "stage4"), _shufflenet_groups),
    "efficientnet": _EFFICIENTNET,
    "efficientnet_v2": _EFFICIENTNET,
    "regnet": _FamilyRule("fc", _STAGES, _regnet_groups),
    "convnext": _FamilyRule("classifier.2", _STAGES, _convnext_groups),
    "googlenet": _FamilyRule(
        "fc",
        ("stem", "inception3", "inception4", "inception5"),
        _googlenet_groups,
        aux=("aux1", "aux2"),
        builder_kwargs=_inception_kwargs,
    ),
    "inception_v3": _FamilyRule(
        "fc",
        ("stem", "mixed5", "mixed6", "mixed7"),
        _inception_v3_groups,
        aux=("AuxLogits",),
        builder_kwargs=_inception_kwargs,
    ),
    "vit": _FamilyRule(
        "heads.head",
        _STAGES,
        _vit_groups,
        builder_kwargs=lambda pretrained, size: {"image_size": size},
        check_size=_check_patch_multiple,
        adapt=_fit_position_embedding,
    ),
    "swin": _FamilyRule("head", _STAGES, _swin_groups),
    # MaxViT's weights fit any input size whose feature maps its 7×7 partitions divide at
    # every stage (224, 448, ...); its builder refuses other sizes (ValueError, see build).
    "maxvit": _FamilyRule(
        "classifier.5",
        (*_STAGES, "fc"),
        _maxvit_groups,
        builder_kwargs=lambda pretrained, size: {"input_size": (size, size)},
    ),
}


def layer_groups(name: str) -> tuple[str, ...]:
    """Names of the layer groups of `build(name, ...)`, bottom → top, "head" last,
    without building the model."""
    return (*_FAMILY_RULES[get_spec(name).family].groups, "head")
