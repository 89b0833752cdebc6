"""Frozen features: of a trunk over a dataset (`frozen_features`), and the cache a
job with a frozen backbone trains its head on (`build_feature_cache`: the eval
view and the augmented views of every training image, val, test)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.training import data
from tlserve.service.training.devices import autocast, side_stream, to_device

if TYPE_CHECKING:
    from tlserve.service.training.engine import _Job


# -- features -----------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    trunk: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype | None, check: Callable[[], None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trunk features of every image in `loader` -> ((N, D) float32 CPU, (N,) labels)."""
    trunk.eval()
    features, labels = [], []
    for images, targets in loader:
        check()
        images = to_device(images, device)  # (B, 3, H, W)
        with autocast(device, dtype):
            features.append(trunk(images).float().cpu())  # (B, D)
        labels.append(targets)
    if not features:  # an empty split (no val images): (0, 0) features, which the head never sees
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def frozen_features(
    trunk: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    check: Callable[[], None],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features` over every image of `dataset` in order, on a side RNG stream
    seeded with `seed`: the features and the global RNG afterwards are the same whatever
    ran before. AUTO's probe and CompareBackbones' probes read their images this way."""
    loader = data.make_loader(dataset, batch_size, shuffle=False, device=device)
    with side_stream(seed, device):
        return extract_features(trunk, loader, device, dtype, check)


@dataclasses.dataclass
class FeatureCache:
    """Frozen-trunk features: the eval view of every training image, then, with
    augmentation on, `cached_views` augmented views of it; and the validation images."""

    train: torch.Tensor  # (V, N, D) float32, CPU; view 0 is the eval view
    train_labels: torch.Tensor  # (N,)
    val: torch.Tensor  # (M, D)
    val_labels: torch.Tensor  # (M,)


def build_feature_cache(job: _Job) -> FeatureCache:
    config = job.config
    views = 1 + config.cached_views if config.augment else 1
    job.progress.phase(pb.JOB_PHASE_CACHING_FEATURES, f"computing frozen features: {views} view(s) of {len(job.train_set)} training images")
    train = []
    labels = None
    for view in range(views):
        # Each view on its own seeded stream: the cache is the same on every
        # attempt and every rank, whatever ran before.
        with side_stream(config.seed * 7919 + view, job.device):
            dataset = job.train_set if view > 0 else job.train_eval_set
            loader = data.make_loader(dataset, config.batch_size, shuffle=False, device=job.device, seed=config.seed + view)
            features, labels = extract_features(job.built.trunk, loader, job.device, job.amp, job.check)
        train.append(features)
    val, val_labels = extract_features(job.built.trunk, job.val_loader, job.device, job.amp, job.check)
    return FeatureCache(train=torch.stack(train), train_labels=labels, val=val, val_labels=val_labels)
