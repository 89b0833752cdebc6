"""The model cache: loaded models kept under a memory budget, least recently used
unloaded first.

`ModelCache` is the accounting only (pure, no sessions): entries are anything with
`memory_bytes` and `in_use` (requests holding the model now). Putting a model in,
or a model's last user leaving, evicts least-recently-used entries while the total
is over `budget_bytes` — never the entry just put in, never one in use: a model in
use is evicted only once its in-flight batches are done (until then the cache may
stay over budget). The inference service closes what it is handed back.

How a model's memory is measured (`measure_load`): the process's resident memory
(RSS, from /proc/self/statm) just before and just after loading and warming up the
session (batch 1 and the largest batch), under `LOAD_LOCK` so that two loads (or a
load and an unload) never overlap and mix their deltas, floored at the model file's
size. The runtime library is imported and the devices probed before the first
reading, so the first model is not charged for them. The delta counts what the load
added: weights (and ONNX Runtime's pre-packed copies), the arena at the largest
warm-up batch, host buffers of TensorRT/CUDA. Unloading ends with `release_memory()`
(glibc's `malloc_trim(0)`), and `configure_allocator()` makes blocks of 4 MiB and up
mmapped, so that freed weights go back to the OS instead of staying in the heap
where the next load would reuse them unseen. Other threads allocating during a load
(decoding, other models' batches) make the number noisy by a few MiB: it is a
budget, not an audit. GPU memory is not counted (ORT's CUDA arena grows only by
what is asked).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, Protocol, TypeVar

# One load or unload at a time in this process, so RSS deltas belong to one model.
LOAD_LOCK = threading.Lock()

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (RSS) in bytes, from /proc/self/statm; 0 where
    there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return 0


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only; musl and macOS have none
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


# Allocations at least this big are mmapped, and so unmapped when freed, whatever glibc
# has seen before: by default its threshold rises to the largest block freed so far (up
# to 32 MiB), after which an unloaded model's weights and arenas stay in the heap, are
# reused by the next load (hiding its memory from the RSS delta) and give RSS steps of
# tens of MiB that malloc_trim cannot always return (fragmentation). Measured with the
# 20-cycle test: RSS after unloads varied by up to +63 MiB with the default, +14 MiB
# with a fixed 4 MiB threshold (mostly flat); a loaded resnet18 at 32 px measured 62-89 MiB
# instead of 117-157 MiB of partly reused, partly fragmented heap.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def configure_allocator() -> None:
    """Fixes glibc's mmap threshold (see MMAP_THRESHOLD_BYTES) for this process; called
    once by the inference service. No effect where there is no glibc."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_memory() -> None:
    """Collects garbage and gives freed heap memory back to the OS (glibc)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


T = TypeVar("T")


def measure_load(load: Callable[[], T], floor_bytes: int = 0) -> tuple[T, int]:
    """Runs `load()` under LOAD_LOCK; returns its result and the resident memory it
    added, at least `floor_bytes` (the model file's size)."""
    with LOAD_LOCK:
        before = resident_bytes()
        result = load()
        after = resident_bytes()
    return result, max(after - before, floor_bytes)


def unload(close: Callable[[], None]) -> None:
    """Runs `close()` (dropping a session) under LOAD_LOCK, then releases memory."""
    with LOAD_LOCK:
        close()
        release_memory()


class Entry(Protocol):
    memory_bytes: int
    in_use: int


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Entry)


class ModelCache(Generic[K, V]):
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    @property
    def total_bytes(self) -> int:
        return sum(e.memory_bytes for e in self._entries.values())

    def get(self, key: K) -> V | None:
        """The entry, now the most recently used; None if absent."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def peek(self, key: K) -> V | None:
        """The entry without touching its recency."""
        return self._entries.get(key)

    def put(self, key: K, entry: V) -> list[V]:
        """Adds (or replaces) an entry as the most recently used; returns the entries
        evicted to make room (removed from the cache; the caller unloads them)."""
        self._entries[key] = entry
        self._entries.move_to_end(key)
        return self.trim(keep=key)

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def trim(self, keep: K | None = None) -> list[V]:
        """Evicts least recently used entries not in use (and not `keep`) while over budget."""
        evicted: list[V] = []
        total = self.total_bytes
        for key in list(self._entries):
            if total <= self.budget_bytes:
                break
            entry = self._entries[key]
            if key == keep or entry.in_use > 0:
                continue
            del self._entries[key]
            total -= entry.memory_bytes
            evicted.append(entry)
        return evicted
