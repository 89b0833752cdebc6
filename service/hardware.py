"""What this server runs on: library versions, compute devices and ONNX Runtime
execution providers. Read once at start-up for GetServerInfo and logs."""

from __future__ import annotations

import ctypes.util
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import pathlib

# ONNX Runtime providers tlserve uses, in preference order (design: TensorRT →
# CUDA → CPU); the available ones are intersected with this list.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    description: str = ""
    memory_total_bytes: int = 0


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def devices() -> tuple[Device, ...]:
    import torch

    found = [Device("cpu")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found.append(Device(f"cuda:{index}", props.name, props.total_memory))
    return tuple(found)


@functools.cache
def onnxruntime_providers() -> tuple[str, ...]:
    """The providers that can run here. onnxruntime-gpu lists CUDA and TensorRT
    as available whenever they are compiled in, GPU or not; they count only
    with a CUDA device (and, for TensorRT, its runtime library) present."""
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    if not gpu_count():
        available -= {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    elif ctypes.util.find_library("nvinfer") is None and importlib.util.find_spec("tensorrt_libs") is None:
        available.discard("TensorrtExecutionProvider")
    return tuple(p for p in PREFERRED_PROVIDERS if p in available)


@functools.cache
def versions() -> dict[str, str]:
    return {
        "tlserve": package_version("tlserve"),
        "torch": package_version("torch"),
        "torchvision": package_version("torchvision"),
        "onnxruntime": package_version("onnxruntime-gpu") if package_version("onnxruntime-gpu") != "unknown"
        else package_version("onnxruntime"),
    }


def gpu_count() -> int:
    return sum(1 for d in devices() if d.name.startswith("cuda"))


@functools.cache
def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings count once), as
    ONNX Runtime counts them for its default intra-op threads; the logical CPU count
    where the topology cannot be read."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores: set[str] = set()
    for cpu in cpus:
        try:
            siblings = pathlib.Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
        except OSError:
            return len(cpus)
        cores.add(siblings.strip())
    return len(cores) or len(cpus) or os.cpu_count() or 1
