"""Starting weights: the pretrained-weights cache (files under the names torchvision
would download them to, read only from there), and the sources a build loads its
trunk from by `WeightsChoice.kind` (torchvision, none, a file, an earlier model)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.hub
from torch import nn
from torchvision.models import WeightsEnum

from tlserve.service.backbones.registry import (
    Preprocessing,
    WeightsHashMismatch,
    WeightsNotCached,
    WeightsSpec,
    weights_file_name,
)
from tlserve.service.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from tlserve.service.backbones.family_rules import _FamilyRule


# Old DenseNet checkpoints name layers 'norm.1', 'conv.2', ...; torchvision's densenet
# builder renames them to 'norm1', 'conv2' before loading, and so do we.
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


# -- the weights cache --------------------------------------------------------


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
