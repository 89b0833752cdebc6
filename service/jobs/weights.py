"""Where a fine-tune's starting weights come from: `tlserve.v1.WeightsSource` →
`backbones.WeightsChoice`.

Checked twice with the same code: when the job is submitted (so a missing
weights file or an unknown parent model is a clear error at once, not a failed
job minutes later) and in the worker, which then also loads the tensors.
"""

from __future__ import annotations

import pathlib

import torch

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones
from tlserve.service.config import Settings
from tlserve.service.errors import FailedPrecondition, InvalidArgument, NotFound
from tlserve.service.store.artifacts import ArtifactStore
from tlserve.service.store.models import ModelStore
from tlserve.service.variant import Variant


def resolve_data_file(settings: Settings, relative: str, field: str) -> pathlib.Path:
    """A file named relative to the data root; refuses anything that leaves it."""
    root = settings.resolved_data_root.resolve()
    candidate = pathlib.PurePosixPath(relative)
    if not relative or candidate.is_absolute() or ".." in candidate.parts:
        raise InvalidArgument(f"{field} must be a path relative to the data root {root}, got {relative!r}")
    path = (root / candidate).resolve()
    if not path.is_relative_to(root):
        raise InvalidArgument(f"{field} {relative!r} leads outside the data root {root} (through a link)")
    if not path.is_file():
        raise NotFound(f"{field} {relative!r} does not exist under the data root {root}")
    return path


def weights_choice(
    source: pb.WeightsSource,
    backbone: str,
    *,
    settings: Settings,
    models: ModelStore,
    artifacts: ArtifactStore,
    load: bool,
) -> tuple[backbones.WeightsChoice, pb.ModelRef | None]:
    """The weights to start from and, for chained transfer, the parent model.

    With `load` False only checks (submission); with `load` True also reads the
    parent model's tensors (the worker)."""
    kind = source.WhichOneof("source")
    if kind is None or kind == "torchvision":
        spec = backbones.resolve_weights(backbone, source.torchvision or "DEFAULT")
        backbones.ensure_cached(spec.enum, settings.weights_dir)  # the loader's own check, at submission
        return backbones.WeightsChoice(kind="torchvision", name=spec.name), None
    if kind == "scratch":
        return backbones.WeightsChoice(kind="none"), None
    if kind == "file":
        return backbones.WeightsChoice(kind="file", path=resolve_data_file(settings, source.file, "weights.file")), None
    # Chained transfer: an earlier tlserve model of the same backbone.
    name, version = models.resolve(source.model)
    parent = models.get(name, version)
    if parent.backbone != backbone:
        raise InvalidArgument(
            f"weights.model {name}:{version} is a {parent.backbone}; chained transfer needs the same backbone, "
            f"not {backbone}"
        )
    ref = pb.ModelRef(name=name, version=version)
    if not load:
        return backbones.WeightsChoice(kind="tlserve"), ref
    try:
        path = artifacts.path(models.artifact_path(name, version, Variant.PYTORCH))
        state_dict = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, NotFound) as e:
        raise FailedPrecondition(f"the weights of model {name}:{version} can't be read: {e}") from None
    preprocessing = backbones.Preprocessing.from_proto(parent.preprocessing)
    return backbones.WeightsChoice(kind="tlserve", state_dict=state_dict, preprocessing=preprocessing), ref
