"""Where a job trains: the device's mixed precision, the processes under torchrun
(`Processes`, `setup_processes`, `broadcast`, `wrap_ddp`), and seeding."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tlserve.service.training.config import TrainConfig

# -- device, precision, processes ---------------------------------------------------------


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None (fp32) on the CPU or when mixed precision is off; bf16 where the GPU
    has it, else fp16 (which needs a GradScaler)."""
    if device.type != "cuda" or config.mixed_precision == "off":
        return None
    if config.mixed_precision == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclasses.dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # fine_tune started the process group and ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_processes(device: torch.device) -> Processes:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Processes(rank=dist.get_rank(), world_size=dist.get_world_size(), owns_group=owns)


def broadcast(values: list[float], procs: Processes, device: torch.device) -> list[float]:
    """Rank 0's `values` on every rank (nccl needs the tensor on the GPU)."""
    if not procs.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def wrap_ddp(model: nn.Module, image: torch.Tensor, device: torch.device) -> nn.Module:
    """DDP over `model` for its current set of trainable parameters (DDP records
    them at construction: a new phase of progressive unfreezing needs a new wrapper).
    `find_unused_parameters` costs a graph walk per step, so only when a trainable
    parameter gets no gradient (checked once, on `image` (3, H, W), in eval mode so
    that BatchNorm statistics stay untouched)."""
    unused = _has_unused_parameters(model, image, device)
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], find_unused_parameters=unused)
    return DistributedDataParallel(model, find_unused_parameters=unused)


def _has_unused_parameters(model: nn.Module, image: torch.Tensor, device: torch.device) -> bool:
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    model(image.unsqueeze(0).to(device)).float().sum().backward()  # (1, C)
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    for module, training in was_training.items():
        module.train(training)
    return unused


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too


@contextlib.contextmanager
def side_stream(seed: int, device: torch.device):
    """Runs a block (probe, feature cache) on its own seeded RNG stream and puts the
    global RNG back after, so the training run's random numbers do not depend on
    whether the block ran (it does not run again on resume when cached)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned host memory + non_blocking overlaps the copy with compute;
        # channels_last is what cuDNN's fast convolution kernels want.
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images
