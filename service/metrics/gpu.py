"""GPU memory per device as metrics, read at each scrape (`GpuCollector`,
registered as `GPU`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType

import prometheus_client
from prometheus_client import Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tlserve.service.metrics import COLLECT_ERRORS
from tlserve.service.metrics.families import Sample, assemble
from tlserve.service.metrics.families import gauge as _gauge

log = logging.getLogger("tlserve.metrics")


GPU_TOTAL = _gauge("gpu_memory_total_bytes", "Memory of a GPU (NVML; torch.cuda's figure without NVML).", "device")
GPU_USED = _gauge("gpu_memory_used_bytes", "Memory in use on a GPU by every process (NVML).", "device")
GPU_ALLOCATED = _gauge("gpu_memory_allocated_bytes", "GPU memory this process's PyTorch tensors occupy "
                       "(torch.cuda.memory_allocated).", "device")
GPU_RESERVED = _gauge("gpu_memory_reserved_bytes", "GPU memory this process's PyTorch caching allocator holds "
                      "(torch.cuda.memory_reserved).", "device")
GPU_FAMILIES = (GPU_TOTAL, GPU_USED, GPU_ALLOCATED, GPU_RESERVED)


def visible_gpus(spec: str | None, count: int, uuid: Callable[[int], str]) -> list[int]:
    """NVML indices of the GPUs this process's CUDA numbers 0, 1, …, read from
    CUDA_VISIBLE_DEVICES (`spec`) as CUDA reads it: integers or GPU UUID prefixes,
    up to the first entry that names no device. Assumes CUDA orders devices as NVML
    does (PCI bus order: CUDA_DEVICE_ORDER=PCI_BUS_ID, or one GPU per container)."""
    if spec is None:
        return list(range(count))
    visible: list[int] = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.lstrip("-").isdigit():
            index = int(entry)
            matches = [index] if 0 <= index < count else []
        elif entry.startswith("GPU-"):
            matches = [i for i in range(count) if uuid(i).startswith(entry)]
        else:  # MIG instances, empty, anything else: CUDA stops here
            matches = []
        if len(matches) != 1 or matches[0] in visible:
            break
        visible.append(matches[0])
    return visible


def _import_pynvml() -> ModuleType | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    return pynvml


class GpuCollector(Collector):
    """GPU memory per device, read at each scrape: total and used from NVML (every
    process on the device: ONNX Runtime's arenas, the training workers), allocated
    and reserved from torch.cuda for this process, only once this process has
    initialised CUDA itself (a scrape never imports torch nor starts a CUDA context).
    Without a GPU, NVML or CUDA the families are absent, not zero.

    `device` is "cuda:N", N as CUDA numbers the devices this process sees. `nvml` and
    `torch` are for tests (fakes); by default pynvml (imported and initialised at
    the first scrape, once) and the torch module if something imported it already.
    """

    def __init__(
        self, errors: Counter = COLLECT_ERRORS, *,
        nvml: Callable[[], ModuleType | None] = _import_pynvml,
        torch: Callable[[], ModuleType | None] = lambda: sys.modules.get("torch"),
        environ=os.environ,
    ) -> None:
        self._errors = errors
        self._load_nvml = nvml
        self._torch = torch
        self._environ = environ
        self._nvml: ModuleType | None = None
        self._nvml_tried = False
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return [family.empty() for family in GPU_FAMILIES]

    def collect(self) -> list[Metric]:
        samples: list[Sample] = []
        for source, read in (("nvml", self._nvml_samples), ("torch", self._torch_samples)):
            try:
                samples.extend(read())
            except Exception as e:  # noqa: BLE001 - a scrape must not fail because of a driver
                self._errors.labels(collector="gpu").inc()
                log.warning("metrics: could not read GPU memory; left out of this scrape",
                            extra={"fields": {"source": source, "error": f"{type(e).__name__}: {e}"}})
        return assemble(GPU_FAMILIES, samples)

    def _nvml_module(self) -> ModuleType | None:
        with self._lock:
            if not self._nvml_tried:
                self._nvml_tried = True
                nvml = self._load_nvml()
                if nvml is not None:
                    try:
                        nvml.nvmlInit()
                        self._nvml = nvml
                    except Exception as e:  # noqa: BLE001 - NVMLError: no driver, no GPU: no NVML figures
                        log.info("metrics: NVML unavailable, no device-wide GPU memory figures",
                                 extra={"fields": {"error": f"{type(e).__name__}: {e}"}})
            return self._nvml

    def _nvml_samples(self) -> list[Sample]:
        nvml = self._nvml_module()
        if nvml is None:
            return []
        count = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

        def uuid(i: int) -> str:
            value = nvml.nvmlDeviceGetUUID(handles[i])
            return value.decode() if isinstance(value, bytes) else value

        samples: list[Sample] = []
        for cuda_index, nvml_index in enumerate(visible_gpus(self._environ.get("CUDA_VISIBLE_DEVICES"), count, uuid)):
            info = nvml.nvmlDeviceGetMemoryInfo(handles[nvml_index])
            device = (f"cuda:{cuda_index}",)
            samples += [(GPU_TOTAL, device, info.total), (GPU_USED, device, info.used)]
        return samples

    def _torch_samples(self) -> list[Sample]:
        torch = self._torch()
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not cuda.is_initialized():
            return []
        samples: list[Sample] = []
        for index in range(cuda.device_count()):
            device = (f"cuda:{index}",)
            samples += [
                (GPU_ALLOCATED, device, cuda.memory_allocated(index)),
                (GPU_RESERVED, device, cuda.memory_reserved(index)),
                # After NVML's figure for the same device, which `assemble` keeps.
                (GPU_TOTAL, device, cuda.get_device_properties(index).total_memory),
            ]
        return samples


GPU = GpuCollector()
prometheus_client.REGISTRY.register(GPU)
