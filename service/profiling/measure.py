"""Timing and memory measurements shared by ProfileModel and CompareBackbones.

Pure helpers, no gRPC and no store:

- `time_calls(call, iterations, warmup)`: wall-clock seconds of each call after
  `warmup` untimed ones, with `time.perf_counter`. A GPU caller passes a call that
  synchronises (`torch.cuda.synchronize`) so the time covers the kernels.
- `percentile(samples, q)`: linear interpolation between closest ranks, the
  definition numpy's default uses, so p50 of two samples is their mean.
- `PeakMemory`: the peak resident memory of this process while a block runs,
  above what it was when the block began. Linux keeps the peak (VmHWM) itself;
  writing "5" to /proc/self/clear_refs resets it to the current value, so the peak
  is exact, not sampled. Where that is refused (an old kernel, a locked-down
  container) a 1 ms sampling thread stands in and the result says so.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import threading
import time
from collections.abc import Callable, Sequence

_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


def time_calls(call: Callable[[], object], iterations: int, warmup: int = 3) -> list[float]:
    """Seconds taken by each of `iterations` calls, after `warmup` untimed calls."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) of `samples`, interpolated between ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass(frozen=True)
class Latency:
    p50: float
    p95: float
    p99: float
    mean: float
    count: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Latency:
        return cls(
            p50=percentile(samples, 50), p95=percentile(samples, 95), p99=percentile(samples, 99),
            mean=sum(samples) / len(samples), count=len(samples),
        )


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where unreadable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def resident_bytes() -> int:
    return _status_bytes("VmRSS")


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    # The reset takes the peak down to the current resident size.
    return _status_bytes("VmHWM") <= _status_bytes("VmRSS") + 64 * 1024


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.bytes`: the most resident memory
    the process held during the block, above its resident memory at the start.

    `exact` says whether the kernel's own peak was used (True) or sampling (False).
    Another thread allocating meanwhile is counted too: measure in a process that
    does nothing else (ProfileModel runs each variant in a child process)."""

    SAMPLE_SECONDS = 0.001

    def __init__(self) -> None:
        self.start_bytes = 0
        self.peak_bytes = 0
        self.exact = False
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    @property
    def bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def __enter__(self) -> PeakMemory:
        self.start_bytes = resident_bytes()
        self.peak_bytes = self.start_bytes
        self.exact = _reset_peak()
        if not self.exact:
            self._sampler = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.SAMPLE_SECONDS):
            self.peak_bytes = max(self.peak_bytes, resident_bytes())

    def __exit__(self, *exc) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        peak = _status_bytes("VmHWM") if self.exact else resident_bytes()
        self.peak_bytes = max(self.peak_bytes, peak, resident_bytes())
