"""`build`: a model to fine-tune, torchvision's architecture with its final classifier
cut, a new head, starting weights loaded into the trunk and its parameters in named
layer groups; `load_published` reads one back; `count_gflops` measures one."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping

import torch
import torch.hub
import torchvision
from torch import nn

from tlserve.service.backbones.family_rules import _FAMILY_RULES, layer_groups
from tlserve.service.backbones.registry import Preprocessing, get_spec
from tlserve.service.backbones.weights import _SOURCES, WEIGHTS_KINDS, WeightsChoice, _as_trunk_state_dict, _first, _load_trunk
from tlserve.service.errors import InvalidArgument

# -- building models ----------------------------------------------------------
#
# A built model is torchvision's own architecture with its final classification layer
# cut off (the trunk: images → penultimate features) and a new head for the target
# classes. Weights of every kind are loaded into the trunk only: the final layer of the
# source (ImageNet's 1000 classes, or an earlier tlserve task's) is discarded whatever
# its shape, so one strict load serves all sources. What differs between families —
# where the final layer is, which builder arguments the weights need, how the trunk
# splits into layer groups — is one `_FamilyRule` each in `_FAMILY_RULES`.


@dataclasses.dataclass
class LayerGroup:
    """A named slice of a model that a strategy freezes or trains as one.

    Freezing is the training engine's work: `requires_grad = False` on `parameters()`
    and, for feature extraction, the BatchNorm layers under `modules` kept in eval mode
    so that their running statistics stay those of the source task."""

    name: str  # "stem", "stage1", ..., "head"
    modules: list[nn.Module]

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules:
            yield from module.parameters()


class Classifier(nn.Module):
    """A trunk (N, 3, H, W) → (N, feature_dim) followed by a head → (N, num_classes)."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


@dataclasses.dataclass
class BuiltModel:
    model: Classifier  # logits; state-dict keys "trunk.*" and "head.*"
    trunk: nn.Module  # torchvision's model with its final classifier cut: (N, feature_dim)
    head: nn.Sequential  # Dropout(head_dropout), Linear(feature_dim, num_classes)
    groups: list[LayerGroup]  # bottom → top, "head" last; disjoint; hold every parameter
    feature_dim: int
    preprocessing: Preprocessing  # crop_size is the input size the model is built for
    backbone: str


def _check_groups(model: nn.Module, groups: list[LayerGroup], names: tuple[str, ...], name: str) -> None:
    # The family rules' promise, checked on every build: a rule that misses or repeats
    # a parameter is a bug here, never a silent gap in what a strategy freezes.
    if [group.name for group in groups] != list(names):
        raise RuntimeError(f"{name}: layer groups {[g.name for g in groups]}, expected {list(names)}")
    owner: dict[int, str] = {}
    for group in groups:
        for parameter in group.parameters():
            if id(parameter) in owner:
                raise RuntimeError(f"{name}: a parameter is in groups {owner[id(parameter)]} and {group.name}")
            owner[id(parameter)] = group.name
    orphans = [key for key, parameter in model.named_parameters() if id(parameter) not in owner]
    if orphans or len(owner) != len(list(model.parameters())):
        raise RuntimeError(f"{name}: parameters in no layer group: {_first(orphans)}")


def _fit_preprocessing(preprocessing: Preprocessing, image_size: int | None) -> Preprocessing:
    if image_size is None:
        return preprocessing
    # Keep the weights' resize/crop ratio (224/256 for most): 112 → resize 128, crop 112.
    ratio = preprocessing.resize_size / preprocessing.crop_size
    return dataclasses.replace(preprocessing, crop_size=image_size, resize_size=round(image_size * ratio))


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_build_arguments(
    weights: WeightsChoice, num_classes: int, head_dropout: float, image_size: int | None
) -> None:
    if weights.kind not in _SOURCES:
        raise InvalidArgument(f"unknown weights kind {weights.kind!r}; valid: {', '.join(WEIGHTS_KINDS)}")
    if not _is_positive_int(num_classes):
        raise InvalidArgument(f"num_classes must be a positive integer, not {num_classes!r}")
    if not 0.0 <= head_dropout < 1.0:
        raise InvalidArgument(f"head_dropout must be in [0, 1), not {head_dropout!r}")
    if image_size is not None and not _is_positive_int(image_size):
        raise InvalidArgument(f"image_size must be a positive integer, not {image_size!r}")


def build(
    name: str,
    num_classes: int,
    *,
    weights: WeightsChoice,
    weights_dir: os.PathLike | str,
    head_dropout: float = 0.0,
    image_size: int | None = None,
    check_hash: bool = True,
) -> BuiltModel:
    """Backbone `name` with a new head of `num_classes` logits, its weights from
    `weights`, in training mode on the CPU.

    `image_size` (a square side, pixels) overrides the crop size of the weights'
    preprocessing; ViT and MaxViT are built for that size (ViT position embeddings are
    resampled to it). `check_hash=False` skips the SHA-256 check of torchvision weights,
    for files made locally (tests, demos); production keeps it."""
    spec = get_spec(name)
    rule = _FAMILY_RULES[spec.family]
    _check_build_arguments(weights, num_classes, head_dropout, image_size)
    source_weights = spec.weights_named(weights.name) if weights.kind == "torchvision" else spec.default
    preprocessing = _fit_preprocessing(weights.preprocessing or source_weights.preprocessing, image_size)
    input_size = preprocessing.crop_size
    rule.check_size(name, input_size, source_weights)
    # Read the weights before building, so that a missing or broken file fails fast.
    state_dict, description = _SOURCES[weights.kind](weights, source_weights, weights_dir, check_hash)

    pretrained = state_dict is not None
    try:
        kwargs = rule.builder_kwargs(pretrained, input_size)
        trunk = torchvision.models.get_model(name, weights=None, **kwargs)  # ImageNet's 1000 classes
    except ValueError as error:  # MaxViT: a size its partitions don't divide
        raise InvalidArgument(f"image_size {input_size} does not suit {name}: {error}") from error
    feature_dim = rule.cut(trunk, rule.classifier)
    if state_dict is not None:
        _load_trunk(trunk, _as_trunk_state_dict(state_dict, rule, trunk), name, description)

    head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(feature_dim, num_classes))
    model = Classifier(trunk, head)
    groups = [LayerGroup(g, modules) for g, modules in zip(rule.groups, rule.split(trunk))]
    groups.append(LayerGroup("head", [head]))
    _check_groups(model, groups, layer_groups(name), name)
    return BuiltModel(
        model=model,
        trunk=trunk,
        head=head,
        groups=groups,
        feature_dim=feature_dim,
        preprocessing=preprocessing,
        backbone=name,
    )


def rebuild(
    name: str,
    num_classes: int,
    preprocessing: Preprocessing,
    state_dict: Mapping[str, torch.Tensor],
) -> BuiltModel:
    """A published tlserve model back from its state dict, in eval mode on the CPU.

    The architecture is built for the model's own input size with no starting
    weights, then every key of `state_dict` must fit (strict load); the model's
    stored preprocessing is kept as is. Used by export and by the PyTorch runtime."""
    built = build(
        name, num_classes, weights=WeightsChoice(kind="none"), weights_dir=".",
        image_size=preprocessing.crop_size,
    )
    built.model.load_state_dict(state_dict)
    built.model.eval()
    return dataclasses.replace(built, preprocessing=preprocessing)


def load_published(path: os.PathLike | str, name: str, num_classes: int, preprocessing: Preprocessing) -> BuiltModel:
    """`rebuild` from a model.pt file, read with torch.load(weights_only=True)."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return rebuild(name, num_classes, preprocessing, state_dict)


def trainable_groups(built: BuiltModel, n_top: int) -> list[LayerGroup]:
    """The groups a strategy trains when it unfreezes the top `n_top` groups below the
    head: those and the head, bottom → top. 0 is feature extraction (the head alone);
    `n_top` ≥ len(built.groups) - 1 is full fine-tuning."""
    if n_top < 0:
        raise InvalidArgument(f"the number of groups to unfreeze must be ≥ 0, not {n_top}")
    return built.groups[max(0, len(built.groups) - 1 - n_top) :]


def count_gflops(model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> float:
    """Multiply-adds ÷ 1e9 of one image at `image_size`, counted on the real graph: the
    unit of torchvision's metadata in ListBackbones (FlopCounterMode counts 2 FLOPs per
    multiply-add). Published models and CompareBackbones both report this."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    return counter.get_total_flops() / 2 / 1e9
