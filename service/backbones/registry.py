"""The registry: every torchvision classification model as a `BackboneSpec`, with
the metadata of its pretrained weights (`WeightsSpec`, `Preprocessing`) read from
torchvision itself, and the domain errors of asking for one that is not there."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from urllib.parse import urlparse

import torchvision
from torchvision.models import WeightsEnum

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.errors import FailedPrecondition, InvalidArgument

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


def weights_file_name(weights: WeightsEnum) -> str:
    """The file name torchvision's downloader would save `weights` under."""
    return os.path.basename(urlparse(weights.url).path)
