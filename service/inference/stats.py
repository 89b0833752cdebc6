"""Per-model inference statistics, in the shape of the KServe v2 / Triton
`ModelStatistics` message.

One `ModelStatistics` per (name, version, variant) that has run since the server
started; its model's `DynamicBatcher` updates it (on the event loop) as requests
finish, and readers take a `snapshot()`. Counts and durations follow Triton:

- `inference_count`: images computed; `execution_count`: batches run.
- `success`, `fail`, `queue`, `compute_*`: per request (a request in a batch of 8
  adds the batch's compute time once to its own count); `success` is the time from
  entering the queue to its results being ready, `fail` the same for failures
  (an error from the model, or a deadline that passed while waiting).
- `batch_stats[size]`: per batch executed with `size` images: how many, and their
  input preparation, inference and output splitting times.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from typing import NamedTuple

from tlserve.service.variant import Variant


@dataclasses.dataclass
class Duration:
    """A count and a cumulative duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


class BatchStats(NamedTuple):
    """Batches run with one batch size: how many, and their cumulative times (ns)."""

    count: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0


@dataclasses.dataclass
class ModelStatistics:
    name: str
    version: int
    variant: Variant
    last_inference_ms: int = 0  # unix milliseconds of the last batch run; 0 = never
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = dataclasses.field(default_factory=Duration)
    fail: Duration = dataclasses.field(default_factory=Duration)
    queue: Duration = dataclasses.field(default_factory=Duration)
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)
    batch_stats: dict[int, BatchStats] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def record_batch(
        self, *, images: int, queue_ns: list[int], total_ns: list[int],
        input_ns: int, infer_ns: int, output_ns: int, end_unix_ms: int,
    ) -> None:
        """One batch that ran: `queue_ns` and `total_ns` (queue entry → results) per
        request in it; the compute times are the batch's."""
        requests = len(queue_ns)
        with self._lock:
            self.last_inference_ms = end_unix_ms
            self.inference_count += images
            self.execution_count += 1
            for q, total in zip(queue_ns, total_ns):
                self.queue.add(q)
                self.success.add(total)
            self.compute_input.add(input_ns * requests, requests)
            self.compute_infer.add(infer_ns * requests, requests)
            self.compute_output.add(output_ns * requests, requests)
            old = self.batch_stats.get(images, BatchStats())
            self.batch_stats[images] = BatchStats(
                old.count + 1, old.compute_input_ns + input_ns, old.compute_infer_ns + infer_ns,
                old.compute_output_ns + output_ns,
            )

    def record_failure(self, total_ns: int, count: int = 1) -> None:
        with self._lock:
            self.fail.add(total_ns * count, count)

    def snapshot(self) -> ModelStatistics:
        """A consistent copy, safe to read while the original is updated."""
        with self._lock:
            copied = copy.copy(self)
            for f in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                setattr(copied, f, dataclasses.replace(getattr(self, f)))
            copied.batch_stats = dict(self.batch_stats)
            copied._lock = threading.Lock()
        return copied
