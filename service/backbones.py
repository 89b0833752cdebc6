"""The backbone registry: every torchvision image-classification model, with the
metadata of its pretrained ImageNet-1K weights, read from torchvision itself.

A `BackboneSpec` per model name (`get_spec("resnet50")`, `list_specs(family=...)`)
holds one `WeightsSpec` per weights enum member: accuracy, parameter count, GFLOPs,
file size and preprocessing all come from the member's `meta` and `transforms()`,
never typed here, so they are as true as torchvision's own extended tests make
them. Specs are built lazily and cached; nothing here instantiates a model or
touches the network. Pretrained files live in a weights cache directory
(`Settings.weights_dir`) under the file name torchvision would download them to;
`load_pretrained_state_dict` reads from there only and says which file to
provision when one is missing. Conversion to the API's `Backbone` messages lives
next to the types (`BackboneSpec.to_proto`, `list_backbones_response`).

`build` makes a model to fine-tune: torchvision's architecture with its final
classifier cut (the trunk, images → features) and a new head for the target classes,
its weights from the cache, a file or an earlier tlserve model (chained transfer),
and its parameters split into named layer groups, bottom → top, that strategies
freeze and unfreeze (`layer_groups(name)` gives the names without building).

    spec = get_spec("resnet50")
    spec.default.preprocessing.crop_size        # 224
    weights = resolve_weights("resnet50", "IMAGENET1K_V1")
    state_dict = load_pretrained_state_dict(weights.enum, settings.weights_dir)
    built = build("resnet50", 5, weights=WeightsChoice("torchvision"), weights_dir=settings.weights_dir)
    [group.name for group in built.groups]      # stem, layer1, ..., layer4, head
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.hub
import torchvision
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.vision_transformer import interpolate_embeddings

from client.tlserve.v1 import tlserve_pb2 as pb
from service.errors import FailedPrecondition, InvalidArgument, NotFound

# torchvision rounds `_file_size` to 3 decimals of MiB: its extended tests compute it as
# round(os.path.getsize(file) / 1024 / 1024, 3) (test/common_extended_utils.py), so the
# "MB" there is 2**20 bytes, and bytes recovered from it are exact to about ±524 bytes.
_BYTES_PER_TORCHVISION_MB = 1024 * 1024

# Architecture family by name prefix, first match wins: the more specific prefix of a
# pair that shares a beginning (wide_resnet / resnet, efficientnet_v2 / efficientnet)
# comes first. swin covers swin_v2; vit does not match maxvit (prefix match).
_FAMILY_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("wide_resnet", "wide_resnet"),
    ("resnext", "resnext"),
    ("resnet", "resnet"),
    ("vgg", "vgg"),
    ("alexnet", "alexnet"),
    ("densenet", "densenet"),
    ("squeezenet", "squeezenet"),
    ("mobilenet_v2", "mobilenet_v2"),
    ("mobilenet_v3", "mobilenet_v3"),
    ("mnasnet", "mnasnet"),
    ("shufflenet_v2", "shufflenet_v2"),
    ("efficientnet_v2", "efficientnet_v2"),
    ("efficientnet", "efficientnet"),
    ("regnet", "regnet"),
    ("convnext", "convnext"),
    ("googlenet", "googlenet"),
    ("inception_v3", "inception_v3"),
    ("maxvit", "maxvit"),
    ("vit", "vit"),
    ("swin", "swin"),
)

# Old DenseNet checkpoints name layers 'norm.1', 'conv.2', ...; torchvision's densenet
# builder renames them to 'norm1', 'conv2' before loading, and so do we.
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


# -- errors -------------------------------------------------------------------
# Domain errors (service.errors): the gRPC layer maps their bases to status codes.


class UnknownBackbone(InvalidArgument, KeyError):
    """No torchvision classification model has this name; the message lists them."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class UnknownFamily(InvalidArgument, KeyError):
    """No backbone family has this name; the message lists them."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownWeights(InvalidArgument, ValueError):
    """The model has no pretrained weights of this name; the message lists its weights."""


class WeightsCacheError(FailedPrecondition):
    """A pretrained weights file can't be used from the weights cache."""


class WeightsNotCached(WeightsCacheError):
    """The weights file is not in the cache; the message names the URL and the target path."""


class WeightsHashMismatch(WeightsCacheError):
    """The cached file's SHA-256 does not start with the prefix in its file name."""


# -- domain types -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How inputs must be prepared for a set of weights (torchvision's eval transform):
    resize the shorter side to `resize_size`, centre-crop `crop_size`, scale pixels to
    [0, 1], then normalise per RGB channel."""

    resize_size: int  # pixels
    crop_size: int  # pixels, square
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"

    @classmethod
    def from_weights(cls, weights: WeightsEnum) -> Preprocessing:
        # transforms() is torchvision's ImageClassification preset; its sizes are
        # one-element lists (a square crop, a shorter-side resize).
        transform = weights.transforms()
        (resize_size,) = transform.resize_size
        (crop_size,) = transform.crop_size
        return cls(
            resize_size=int(resize_size),
            crop_size=int(crop_size),
            mean=tuple(float(m) for m in transform.mean),
            std=tuple(float(s) for s in transform.std),
            interpolation=transform.interpolation.value,
        )

    @classmethod
    def from_proto(cls, message: pb.Preprocessing) -> Preprocessing:
        return cls(
            resize_size=message.resize_size,
            crop_size=message.crop_size,
            mean=tuple(message.mean),
            std=tuple(message.std),
            interpolation=message.interpolation,
        )

    def to_proto(self) -> pb.Preprocessing:
        return pb.Preprocessing(
            resize_size=self.resize_size,
            crop_size=self.crop_size,
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
        )


@dataclasses.dataclass(frozen=True)
class WeightsSpec:
    """One pretrained weights enum member and its spec sheet."""

    enum: WeightsEnum = dataclasses.field(repr=False)  # e.g. ResNet50_Weights.IMAGENET1K_V2
    name: str  # "ResNet50_Weights.IMAGENET1K_V2"
    is_default: bool
    top1_accuracy: float  # ImageNet-1K validation, fraction
    top5_accuracy: float
    parameter_count: int
    gflops: float  # torchvision's `_ops`: multiply-adds (GMACs) at `crop_size`, per image
    file_size_bytes: int
    file_name: str  # in the weights cache, as torchvision would download it
    url: str
    preprocessing: Preprocessing

    @classmethod
    def from_weights(cls, weights: WeightsEnum, is_default: bool) -> WeightsSpec:
        meta = weights.meta
        imagenet = meta["_metrics"]["ImageNet-1K"]
        return cls(
            enum=weights,
            name=str(weights),
            is_default=is_default,
            # torchvision gives percent with 3 decimals; 5 decimals of a fraction keep
            # all of them and drop the float noise of the division (0.8855200000000001).
            top1_accuracy=round(imagenet["acc@1"] / 100, 5),
            top5_accuracy=round(imagenet["acc@5"] / 100, 5),
            parameter_count=int(meta["num_params"]),
            gflops=float(meta["_ops"]),
            file_size_bytes=round(meta["_file_size"] * _BYTES_PER_TORCHVISION_MB),
            file_name=weights_file_name(weights),
            url=weights.url,
            preprocessing=Preprocessing.from_weights(weights),
        )

    def path(self, weights_dir: os.PathLike | str) -> Path:
        return Path(weights_dir) / self.file_name

    def is_cached(self, weights_dir: os.PathLike | str) -> bool:
        """The file is present (its hash is checked when it is loaded, not here)."""
        return self.path(weights_dir).is_file()

    def to_proto(self, weights_dir: os.PathLike | str) -> pb.BackboneWeights:
        return pb.BackboneWeights(
            name=self.name,
            is_default=self.is_default,
            imagenet_top1_accuracy=self.top1_accuracy,
            imagenet_top5_accuracy=self.top5_accuracy,
            parameter_count=self.parameter_count,
            gflops=self.gflops,
            file_size_bytes=self.file_size_bytes,
            cached=self.is_cached(weights_dir),
            file_name=self.file_name,
            preprocessing=self.preprocessing.to_proto(),
        )


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A torchvision classification model and its pretrained weights, DEFAULT first."""

    name: str  # torchvision model name, e.g. "resnet50"
    family: str
    weights: tuple[WeightsSpec, ...]

    @property
    def default(self) -> WeightsSpec:
        return self.weights[0]

    @property
    def input_size(self) -> int:
        """Side of the square input the DEFAULT weights were evaluated at (their crop
        size). Other weights of the same model may differ (ViT SWAG: 384 or 518)."""
        return self.default.preprocessing.crop_size

    def weights_named(self, weights: str) -> WeightsSpec:
        """The weights that `weights` names: "DEFAULT", a member ("IMAGENET1K_V2")
        or a full name ("ResNet50_Weights.IMAGENET1K_V2")."""
        if weights == "DEFAULT":
            return self.default
        enum_name = type(self.default.enum).__name__
        member = weights.removeprefix(enum_name + ".")
        for spec in self.weights:
            if spec.enum.name == member:
                return spec
        valid = ", ".join(["DEFAULT", *(spec.name for spec in self.weights)])
        raise UnknownWeights(f"backbone {self.name!r} has no weights {weights!r}; valid: {valid}")

    def to_proto(self, weights_dir: os.PathLike | str) -> pb.Backbone:
        """Top-level figures are the DEFAULT weights'; `cached` is read from disk now."""
        default = self.default
        return pb.Backbone(
            name=self.name,
            family=self.family,
            input_size=self.input_size,
            parameter_count=default.parameter_count,
            gflops=default.gflops,
            imagenet_top1_accuracy=default.top1_accuracy,
            imagenet_top5_accuracy=default.top5_accuracy,
            file_size_bytes=default.file_size_bytes,
            cached=default.is_cached(weights_dir),
            weights=[spec.to_proto(weights_dir) for spec in self.weights],
        )


# -- the registry -------------------------------------------------------------


@functools.cache
def backbone_names() -> tuple[str, ...]:
    """Every classification model torchvision registers, sorted. `module=` keeps
    detection, segmentation, video, optical-flow and quantized models out."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def family_of(name: str) -> str:
    for prefix, family in _FAMILY_BY_PREFIX:
        if name.startswith(prefix):
            return family
    # Only reachable after a torchvision upgrade adds an architecture: add its rule.
    raise LookupError(f"no family rule matches backbone {name!r}; add one to _FAMILY_BY_PREFIX")


def families() -> tuple[str, ...]:
    return tuple(sorted({family for _, family in _FAMILY_BY_PREFIX}))


def has_imagenet_classifier(weights: WeightsEnum) -> bool:
    """The weights include a trained 1000-class ImageNet head with measured accuracy.
    Excludes VGG16_Weights.IMAGENET1K_FEATURES, a features-only checkpoint whose meta
    has NaN accuracy, no categories, and 0-255 pixel normalisation."""
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    accuracies = (metrics.get("acc@1"), metrics.get("acc@5"))
    return all(isinstance(a, (int, float)) and math.isfinite(a) for a in accuracies)


@functools.cache
def _build_spec(name: str) -> BackboneSpec:
    weights_enum = torchvision.models.get_model_weights(name)
    default = weights_enum.DEFAULT
    members = [default, *(w for w in weights_enum if w is not default)]
    return BackboneSpec(
        name=name,
        family=family_of(name),
        weights=tuple(
            WeightsSpec.from_weights(w, is_default=w is default)
            for w in members
            if has_imagenet_classifier(w)
        ),
    )


def get_spec(name: str) -> BackboneSpec:
    if name not in backbone_names():
        # Checked before the cache so that arbitrary request strings never enter it.
        raise UnknownBackbone(f"unknown backbone {name!r}; valid: {', '.join(backbone_names())}")
    return _build_spec(name)


def list_specs(
    family: str = "",
    *,
    cached_only: bool = False,
    weights_dir: os.PathLike | str | None = None,
) -> list[BackboneSpec]:
    """Specs sorted by name; `family` "" means all; `cached_only` keeps the backbones
    whose DEFAULT weights file is in `weights_dir`."""
    if family and family not in families():
        raise UnknownFamily(f"unknown backbone family {family!r}; valid: {', '.join(families())}")
    if cached_only and weights_dir is None:
        raise ValueError("cached_only needs weights_dir")
    specs = [get_spec(name) for name in backbone_names()]
    if family:
        specs = [spec for spec in specs if spec.family == family]
    if cached_only:
        specs = [spec for spec in specs if spec.default.is_cached(weights_dir)]
    return specs


def resolve_weights(name: str, weights: str = "DEFAULT") -> WeightsSpec:
    """The weights of backbone `name` that `weights` names: "DEFAULT", "IMAGENET1K_V1"
    or "ResNet18_Weights.IMAGENET1K_V1"."""
    return get_spec(name).weights_named(weights)


def list_backbones_response(
    request_family: str, cached_only: bool, weights_dir: os.PathLike | str
) -> pb.ListBackbonesResponse:
    specs = list_specs(request_family, cached_only=cached_only, weights_dir=weights_dir)
    return pb.ListBackbonesResponse(
        backbones=[spec.to_proto(weights_dir) for spec in specs],
        weights_cache_dir=str(weights_dir),
    )


# -- the weights cache --------------------------------------------------------


def weights_file_name(weights: WeightsEnum) -> str:
    """The file name torchvision's downloader would save `weights` under."""
    return os.path.basename(urlparse(weights.url).path)


def weights_path(weights: WeightsEnum, weights_dir: os.PathLike | str) -> Path:
    return Path(weights_dir) / weights_file_name(weights)


def _expected_sha256_prefix(file_name: str) -> str | None:
    # Same convention as torch.hub: "name-<first 8+ hex digits of sha256>.pth".
    match = torch.hub.HASH_REGEX.search(file_name)
    return match.group(1) if match and match.group(1) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # 1 MiB reads
            digest.update(block)
    return digest.hexdigest()


def ensure_cached(weights: WeightsEnum, weights_dir: os.PathLike | str) -> Path:
    """The cached file of `weights`, or WeightsNotCached saying how to provision it."""
    path = weights_path(weights, weights_dir)
    if not path.is_file():
        raise WeightsNotCached(
            f"weights {weights} are not in the weights cache: download {weights.url} "
            f"and place it at {path}"
        )
    return path


def load_pretrained_state_dict(
    weights: WeightsEnum, weights_dir: os.PathLike | str, *, check_hash: bool = True
) -> dict[str, torch.Tensor]:
    """The state dict of `weights`, from the weights cache only (never downloads), on
    the CPU, with keys the current torchvision model accepts.

    With `check_hash`, the file's SHA-256 must start with the hex digits in its name, as
    torchvision checks on download; here it is checked on every load, so a truncated or
    substituted file is caught too. Hashing reads the whole file (about 1 s per GB)."""
    path = ensure_cached(weights, weights_dir)
    if check_hash:
        expected = _expected_sha256_prefix(path.name)
        if expected is not None:
            actual = _sha256(path)
            if not actual.startswith(expected):
                raise WeightsHashMismatch(
                    f"weights file {path} is corrupt or not {weights}: its SHA-256 is "
                    f"{actual}, the file name says it starts with {expected}; replace it "
                    f"with a fresh download of {weights.url}"
                )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    _rename_legacy_densenet_keys(state_dict)
    return state_dict


def _rename_legacy_densenet_keys(state_dict: dict[str, torch.Tensor]) -> None:
    for key in list(state_dict):
        legacy = _DENSENET_LEGACY_KEY.match(key)
        if legacy:
            state_dict[legacy.group(1) + legacy.group(2)] = state_dict.pop(key)


# -- building models ----------------------------------------------------------
#
# A built model is torchvision's own architecture with its final classification layer
# cut off (the trunk: images → penultimate features) and a new head for the target
# classes. Weights of every kind are loaded into the trunk only: the final layer of the
# source (ImageNet's 1000 classes, or an earlier tlserve task's) is discarded whatever
# its shape, so one strict load serves all sources. What differs between families —
# where the final layer is, which builder arguments the weights need, how the trunk
# splits into layer groups — is one `_FamilyRule` each in `_FAMILY_RULES`.

WEIGHTS_KINDS = ("torchvision", "none", "file", "tlserve")


@dataclasses.dataclass(frozen=True)
class WeightsChoice:
    """Where a backbone's starting weights come from."""

    kind: str  # "torchvision" | "none" | "file" | "tlserve"
    name: str = "DEFAULT"  # torchvision: "DEFAULT" or a member name (resolve_weights)
    # file: a state-dict file (the caller has already checked it lies under the data root)
    path: Path | None = None
    # tlserve: the state_dict of an earlier tlserve model (BuiltModel.model.state_dict())
    state_dict: Mapping[str, torch.Tensor] | None = None
    # Preprocessing to keep (meant for tlserve/file); None → the weights' own: the chosen
    # member's for torchvision, the backbone's DEFAULT weights' otherwise.
    preprocessing: Preprocessing | None = None


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


# Sources of starting weights, by WeightsChoice.kind: each returns the state dict in
# either layout (torchvision's whole model, or a tlserve Classifier's "trunk.*"/"head.*")
# and words naming it for error messages; None for random initialisation.

_Source = tuple[Mapping[str, torch.Tensor] | None, str]
_WeightsDir = os.PathLike | str


def _torchvision_source(
    choice: WeightsChoice, weights: WeightsSpec, weights_dir: _WeightsDir, check_hash: bool
) -> _Source:
    # WeightsNotCached / WeightsHashMismatch propagate: FAILED_PRECONDITION, with the fix.
    return load_pretrained_state_dict(weights.enum, weights_dir, check_hash=check_hash), weights.name


def _random_init(
    choice: WeightsChoice, weights: WeightsSpec, weights_dir: _WeightsDir, check_hash: bool
) -> _Source:
    return None, "random initialisation"


def _file_source(
    choice: WeightsChoice, weights: WeightsSpec, weights_dir: _WeightsDir, check_hash: bool
) -> _Source:
    if choice.path is None:
        raise InvalidArgument("weights of kind 'file' need a path")
    path = Path(choice.path)
    if not path.is_file():
        raise NotFound(f"weights file {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a user's file: any failure to read it is the file's fault
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidArgument(f"weights file {path} can't be read as a state dict: {reason}") from error
    # torchvision's reference training scripts save {"model": state_dict, "optimizer": ...}.
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    tensors_only = isinstance(loaded, Mapping) and all(isinstance(v, torch.Tensor) for v in loaded.values())
    if not (tensors_only and loaded):
        raise InvalidArgument(
            f"weights file {path} holds a {type(loaded).__name__}, not a state dict "
            f"(a mapping from parameter names to tensors)"
        )
    if isinstance(loaded, dict):
        _rename_legacy_densenet_keys(loaded)
    return loaded, f"weights file {path}"


def _tlserve_source(
    choice: WeightsChoice, weights: WeightsSpec, weights_dir: _WeightsDir, check_hash: bool
) -> _Source:
    if choice.state_dict is None:
        raise InvalidArgument("weights of kind 'tlserve' need the state dict of an earlier model")
    if not any(key.startswith("trunk.") for key in choice.state_dict):
        raise InvalidArgument("the state dict has no 'trunk.*' keys: it is not a tlserve model's")
    return choice.state_dict, "the earlier tlserve model's state dict"


_SOURCES: dict[str, Callable[..., _Source]] = {
    "torchvision": _torchvision_source,
    "none": _random_init,
    "file": _file_source,
    "tlserve": _tlserve_source,
}


def _as_trunk_state_dict(
    source: Mapping[str, torch.Tensor], rule: _FamilyRule, trunk: nn.Module
) -> OrderedDict[str, torch.Tensor]:
    """`source`'s tensors under the trunk's keys, with its `_metadata` (the per-module
    format versions that `load_state_dict` hands to modules; MNASNet refuses to load
    without one). A source without it is taken to be in the current format."""
    metadata = getattr(source, "_metadata", None)
    if any(key.startswith("trunk.") for key in source):  # a tlserve Classifier's
        tensors = OrderedDict(
            (key.removeprefix("trunk."), value) for key, value in source.items() if not key.startswith("head.")
        )
        if metadata is not None:
            metadata = OrderedDict(
                (key.removeprefix("trunk").removeprefix("."), value)
                for key, value in metadata.items()
                if key == "trunk" or key.startswith("trunk.")
            )
    else:  # torchvision's whole model: drop the final classifier and auxiliary heads
        tensors = OrderedDict((k, v) for k, v in source.items() if not k.startswith(rule.discarded_prefixes))
    tensors = OrderedDict(rule.adapt(trunk, tensors))
    tensors._metadata = metadata if metadata is not None else trunk.state_dict()._metadata
    return tensors


def _load_trunk(trunk: nn.Module, state_dict: OrderedDict, name: str, description: str) -> None:
    """A strict load whose failures name the keys: InvalidArgument, never RuntimeError."""
    expected = trunk.state_dict()
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} (model: {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and k not in not_tensors and state_dict[k].shape != expected[k].shape
    ]
    problems = [
        f"{what}: {_first(keys)}"
        for what, keys in [
            ("not tensors", not_tensors),
            ("shapes differ", mismatched),
            ("missing keys", missing),
            ("unexpected keys", unexpected),
        ]
        if keys
    ]
    if problems:
        raise InvalidArgument(
            f"{description} does not fit the trunk of {name} (is it a {name} model?); " + "; ".join(problems)
        )
    trunk.load_state_dict(state_dict, strict=True)


def _first(keys: list[str], shown: int = 5) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


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
