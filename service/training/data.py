"""Images in, tensors out: datasets, transforms and loaders for the engine.

The samples come from the dataset manifest (`Manifest.samples(split)`), never a
directory walk. Evaluation inputs are prepared exactly as the weights expect
(`backbones.Preprocessing`: resize the shorter side, centre crop, scale to [0, 1],
normalise); that same record is stored with the model, so the exporter and the
server prepare inputs identically. Training inputs are augmented (random resized
crop, flip, rotation, colour jitter, each configurable) and only while training.

Loader workers: none when the model runs on the CPU (its intra-op threads already
use every core, and decoding is a small share of a CPU step: on 2 cores, resnet18
at 32 px trains at 67 images/s with decoding inline and 62 with one worker, while
decoding and augmenting alone run at 880 images/s); none below
`PARALLEL_DECODE_MIN_IMAGES` images (starting worker processes costs more than
decoding a few hundred small files); else, feeding a GPU, one per CPU this process
may use, minus one for the training loop itself, at most 8 (past that the GPU,
not decoding, is the bottleneck for the models we train), divided among the
processes of a distributed job on the same machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from tlserve.service import backbones
from tlserve.service.images import PIL_FORMATS
from tlserve.service.training.config import TrainConfig

PARALLEL_DECODE_MIN_IMAGES = 512
MAX_WORKERS = 8

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


class ImageDataset(Dataset):
    """(absolute path, label) samples → (transformed image, label)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path, formats=PIL_FORMATS) as image:  # the decoders ingestion checked with, no other
            # convert() decodes and detaches from the file: palette, greyscale, RGBA,
            # CMYK all become three 8-bit channels.
            rgb = image.convert("RGB")
        return self.transform(rgb), label  # (3, H, W) float32

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)  # (N,)


class Repeated(Dataset):
    """`dataset` read `times` times over in one epoch: index i is image i mod n, each
    read drawing a fresh augmented view (repeated augmentation, timm's
    RepeatAugSampler; Hoffer et al. 2020), so a tiny training set gives an epoch
    of several optimiser steps rather than one."""

    def __init__(self, dataset: Dataset, times: int) -> None:
        self.dataset = dataset
        self.times = times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


# -- transforms ---------------------------------------------------------------


def resolve_preprocessing(preprocessing: backbones.Preprocessing, image_size: int) -> backbones.Preprocessing:
    """The weights' preprocessing at `image_size` (0: their own crop), keeping their
    resize/crop ratio (e.g. 232/224), mean, std and interpolation."""
    if not image_size or image_size == preprocessing.crop_size:
        return preprocessing
    resize = round(image_size * preprocessing.resize_size / preprocessing.crop_size)
    return dataclasses.replace(preprocessing, resize_size=resize, crop_size=image_size)


def eval_transform(pre: backbones.Preprocessing) -> T.Compose:
    return T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=_INTERPOLATION[pre.interpolation], antialias=True),
            T.CenterCrop(pre.crop_size),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def train_transform(pre: backbones.Preprocessing, config: TrainConfig) -> T.Compose:
    """The eval transform when augmentation is off; else the eval resize and a random
    resized crop of `crop_min_scale` to 1 times the eval crop's area, then whichever of
    flip, rotation and colour jitter the config turns on, then the same tensor +
    normalise."""
    if not config.augment:
        return eval_transform(pre)
    interpolation = _INTERPOLATION[pre.interpolation]
    # The crops are drawn around the eval view's scale: resize as eval does, then crop
    # between crop_min_scale and all of the area the eval centre crop keeps
    # ((crop/resize)², 0.77 for 224 of 256). Cropping the raw image down to 80 % of
    # it instead showed the network its images zoomed out by ~14 % against eval, with
    # borders eval never shows: on real digits at one image per class that cost 15
    # points from scratch (51 against 67; the plain loop, resize = crop, scored 62).
    kept = (pre.crop_size / pre.resize_size) ** 2
    steps: list = [
        T.Resize(pre.resize_size, interpolation=interpolation, antialias=True),
        T.RandomResizedCrop(pre.crop_size, scale=(config.crop_min_scale * kept, kept), interpolation=interpolation, antialias=True),
    ]
    if config.horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if config.rotation_degrees > 0:
        steps.append(T.RandomRotation(config.rotation_degrees, interpolation=interpolation))
    if config.color_jitter > 0:
        j = config.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


# -- loaders ------------------------------------------------------------------


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def worker_count(num_images: int, device_type: str, *, cpus: int | None = None, local_processes: int = 1) -> int:
    """Loader worker processes for a split of `num_images` read for a model on
    `device_type` (module docstring)."""
    if device_type == "cpu" or num_images < PARALLEL_DECODE_MIN_IMAGES:
        return 0
    cpus = available_cpus() if cpus is None else cpus
    return max(0, min(MAX_WORKERS, cpus // max(1, local_processes) - 1))


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator (base_seed + id); numpy
    # and python's `random` need the same so any transform using them is reproducible.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader whose order depends only on `seed` and the epoch: call
    `set_loader_epoch(loader, epoch)` before each epoch. With `world_size` > 1 each
    process reads its own shard (DistributedSampler) of a shuffled split."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        shuffle = False
    workers = worker_count(len(dataset), device.type, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    # A last batch of one image breaks BatchNorm layers that train ("Expected more
    # than 1 value per channel"); drop it, and only it, when it would occur.
    per_process = math.ceil(len(dataset) / world_size)
    drop_last = (shuffle or sampler is not None) and per_process > batch_size and per_process % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=False,
    )


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Makes the epoch's order (and the workers' augmentation seeds) a function of
    (seed, epoch) alone, so a resumed run reads the same batches as an unbroken one."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    # A different stream per epoch; 1_000_003 (prime) keeps (seed, epoch) pairs apart.
    loader.generator.manual_seed(seed * 1_000_003 + epoch)
