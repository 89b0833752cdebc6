"""Dynamic batching: requests for one model that wait together run as one batch.

One `DynamicBatcher` per loaded model. Callers on the event loop `await
submit(inputs, deadline)` with an array of n samples (n, ...); the batcher
concatenates what is queued (at most `max_batch_size` samples; or `collate(arrays)`
makes the batch, in the compute thread, e.g. normalising uint8 pixels), runs
`infer_fn(batch)` in a thread of `executor` (ONNX Runtime and PyTorch release the
GIL), checks that every output has one row per sample and hands each caller its
rows. `infer_fn` returns an array or a dict of arrays; callers get the same kind.

    batcher = DynamicBatcher(session.run, max_batch_size=32, max_delay_seconds=0.002,
                             max_queue_size=256, executor=pool)
    outputs = await batcher.submit(x, deadline=time.monotonic() + 1.0)   # {"logits": (n, C)}

When a batch is formed. The batcher is event-driven (no collector task): a new
request, a finished batch and the delay timer each run `_pump`, which launches
batches while fewer than `max_concurrent_batches` compute:

- An idle model (no batch computing) runs what is queued at once: waiting on an
  idle CPU or GPU only adds latency, and at concurrency 1 nothing would come.
  Requests submitted in the same event-loop iteration still form one batch.
- While a batch computes, the next one is collected: it launches when the model
  goes idle (the finished batch's callback launches it with no gap), when it
  holds `max_batch_size` samples, or when its oldest request has waited
  `max_delay_seconds` — then it computes alongside the running one (pipelining),
  up to `max_concurrent_batches` (2 by default: more only share the same device).

Lanes (`solo_fn`, for a model on the CPU). `infer_fn` then runs a batch on one core,
and `max_concurrent_batches` such runs go on side by side, one per core ("lanes");
`solo_fn` runs a batch on every core at once (the multi-threaded session):

- On an idle model, fewer waiting requests than lanes (a lone request, on 2 cores)
  could not fill every core on their own: they run as one batch through `solo_fn`,
  at the latency of all the cores, and nothing else launches until it ends.
- Otherwise batches go to free lanes at once: a free lane is an idle core, so the
  delay does not apply. A lane takes its share of what waits, ceil(images / lanes):
  one that took all of it while the other computed left that one nothing when it
  freed (resnet18 at concurrency 8 on 2 cores: p99 155 ms against 117, throughput
  equal within noise).

Single-threaded runs side by side have no barrier between cores, so the server's
own work (gRPC, parsing, the client on the same machine) delays one run instead of
stalling both halves of a multi-threaded one. Measured on 2 cores, Predict from a
client process against in-process ONNX Runtime at the same batch size, servers with
and without lanes alternating (medians of 5-s rounds): resnet18 at 224 px,
concurrency 8, 0.84 → 0.91 of in-process (every round higher), concurrency 32 0.87 →
0.93; mobilenet_v3_large 0.59 → 0.66 at concurrency 8; at concurrency 1, where the
solo run serves, the added latency stayed 1.6 ms for both.

Handing over. A batch runs in `executor` (submitted there directly) and its end
reaches the loop through one `call_soon_threadsafe`, whose callback hands out the
results and launches the batch collected meanwhile. Through `loop.run_in_executor`
the end took a second loop iteration, behind the gRPC work ready by then: on 2 cores,
mobilenet_v3_large at 224 px at concurrency 8, the compute thread waited 1.4-2.0 ms
(median) between batches of ~18 ms, against 0.3 ms now, and Predict served 190-208
images/s against 163-192 (servers alternating).

Limits and failures:
- A request larger than `max_batch_size` is split into chunks of at most that
  size, queued together (each counts against `max_queue_size`) and joined back.
- More than `max_queue_size` requests waiting → `ResourceExhausted` at once.
- A request whose deadline (a `time.monotonic()` value) has passed when its batch
  is formed is dropped without computing (`DeadlineExceeded`).
- A caller that is cancelled (a gRPC client that cancels) leaves the queue at
  once; if its batch already runs, its rows are discarded.
- A batch of several requests whose `infer_fn` raises (or returns outputs of the
  wrong length) runs again one request at a time, so that only the requests that
  fail alone get the error: one request's inputs that break the model, or a batch
  too large for the device's memory, do not fail the others in its batch.

Bookkeeping happens on the event loop: `ModelStatistics` (KServe statistics) and
an optional observer (Prometheus) get queue and compute times per batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from tlserve.service.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from tlserve.service.inference.stats import ModelStatistics

Outputs = Mapping[str, np.ndarray] | np.ndarray
InferFn = Callable[[np.ndarray], Outputs]


class BatchObserver(Protocol):
    """Receives what a batcher measures (service.metrics.ModelMetrics implements it)."""

    def observe_batch(self, images: int, queue_seconds: Sequence[float], compute_seconds: float) -> None: ...

    def observe_queue_depth(self, requests: int) -> None: ...


@dataclasses.dataclass(frozen=True)
class _Failed:
    """A request's share of a batch: it failed when it ran alone."""

    error: Exception


@dataclasses.dataclass(eq=False)
class _Pending:
    inputs: np.ndarray  # (n, ...)
    future: asyncio.Future
    enqueued: float  # time.monotonic()
    deadline: float | None
    queued: bool = True  # still in the queue (not taken, not abandoned)

    @property
    def images(self) -> int:
        return len(self.inputs)


class DynamicBatcher:
    def __init__(
        self,
        infer_fn: InferFn,
        *,
        max_batch_size: int,
        max_delay_seconds: float,
        max_queue_size: int,
        executor: concurrent.futures.Executor,
        stats: ModelStatistics | None = None,
        observer: BatchObserver | None = None,
        max_concurrent_batches: int = 2,
        collate: Callable[[list[np.ndarray]], np.ndarray] | None = None,
        solo_fn: InferFn | None = None,
        name: str = "model",
    ) -> None:
        if not callable(infer_fn):
            raise TypeError(f"infer_fn must be callable, got {type(infer_fn).__name__}")
        if solo_fn is not None and not callable(solo_fn):
            raise TypeError(f"solo_fn must be callable, got {type(solo_fn).__name__}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_seconds < 0:
            raise ValueError(f"max_delay_seconds must be >= 0, got {max_delay_seconds}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        self._infer_fn = infer_fn
        self._solo_fn = solo_fn
        self._collate = collate
        self.max_batch_size = max_batch_size
        self.max_delay_seconds = max_delay_seconds
        self.max_queue_size = max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self.name = name
        self._executor = executor
        self._stats = stats
        self._observer = observer
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued = 0  # requests (chunks) waiting, abandoned ones not counted
        self._queued_images = 0
        self._computing = 0  # batches running in the executor
        self._solo = False  # a batch runs through solo_fn: nothing else launches
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._drained: list[asyncio.Future] = []

    @property
    def queue_depth(self) -> int:
        """Requests waiting (a split request counts once per chunk)."""
        return self._queued

    @property
    def computing(self) -> int:
        """Batches running now."""
        return self._computing

    @property
    def idle(self) -> bool:
        return not self._queued and not self._computing

    async def submit(self, inputs: np.ndarray, deadline: float | None = None) -> Outputs:
        """The model's outputs for `inputs` (n, ...): arrays with n rows, in order."""
        if self._closed:
            raise Unavailable(f"{self.name} is being unloaded; retry the request")
        n = len(inputs)
        if n == 0:
            raise ValueError("submit() needs at least one sample")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"the deadline passed before {self.name} was reached")
        size = self.max_batch_size
        chunks = [inputs] if n <= size else [inputs[i : i + size] for i in range(0, n, size)]
        if self._queued + len(chunks) > self.max_queue_size:
            raise ResourceExhausted(
                f"{self.name} has {self._queued} requests waiting, its limit is max_queue_size "
                f"{self.max_queue_size} (TLSERVE_MAX_QUEUE_SIZE): retry later, or raise the limit"
            )
        loop = self._loop
        entries = [_Pending(chunk, loop.create_future(), now, deadline) for chunk in chunks]
        self._queue.extend(entries)
        self._queued += len(entries)
        self._queued_images += n
        self._queue_changed()
        self._schedule_pump()
        try:
            if len(entries) == 1:
                return await entries[0].future
            parts = [await e.future for e in entries]
        except BaseException:
            # Cancelled (asyncio cancels the awaited future too) or failed: whatever of
            # this request still waits leaves the queue now.
            for e in entries:
                self._abandon(e)
            raise
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts)
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    async def close(self) -> None:
        """Refuses new requests, then waits for queued and running batches to finish."""
        self._closed = True
        if self.idle or self._loop is None:
            return
        waiter = self._loop.create_future()
        self._drained.append(waiter)
        self._schedule_pump()
        await waiter

    # -- the pump: runs on the event loop --------------------------------------------

    def _schedule_pump(self) -> None:
        # Deferred to the next loop iteration, so that requests submitted together
        # (callers woken by the same finished batch) form one batch.
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._computing < self.max_concurrent_batches and not self._solo:
            self._drop_dead()
            if not self._queue:
                break
            if self._solo_fn is not None:
                if not self._computing and self._queued < self.max_concurrent_batches:
                    batch = self._take()
                    if batch:
                        self._launch(batch, solo=True)
                    break
                # Each lane takes its share of the queue, ceil(images / lanes), not all of it.
                batch = self._take(-(-self._queued_images // self.max_concurrent_batches))
            else:
                if self._computing and not self._closed and self.max_delay_seconds > 0:
                    wait = self._queue[0].enqueued + self.max_delay_seconds - time.monotonic()
                    if self._queued_images < self.max_batch_size and wait > 0:
                        self._timer = self._loop.call_later(wait, self._pump)
                        break
                batch = self._take()
            if batch:
                self._launch(batch)
        if self.idle and self._drained:
            for waiter in self._drained:
                if not waiter.done():
                    waiter.set_result(None)
            self._drained.clear()

    def _drop_dead(self) -> None:
        """Pops abandoned requests and fails expired ones at the head of the queue."""
        now = time.monotonic()
        while self._queue:
            head = self._queue[0]
            if not head.queued:
                self._queue.popleft()
            elif head.future.done():  # cancelled; its caller has not run its cleanup yet
                self._queue.popleft()
                self._dequeue(head)
            elif head.deadline is not None and head.deadline <= now:
                self._queue.popleft()
                self._dequeue(head)
                self._expire(head, now)
            else:
                return

    def _take(self, images_wanted: int | None = None) -> list[_Pending]:
        """The next batch: queued requests in order, up to max_batch_size samples, and
        up to `images_wanted` (at least one request) when given."""
        limit = self.max_batch_size if images_wanted is None else min(self.max_batch_size, images_wanted)
        batch: list[_Pending] = []
        images = 0
        now = time.monotonic()
        while self._queue:
            entry = self._queue[0]
            if not entry.queued:
                self._queue.popleft()
                continue
            if entry.future.done():  # cancelled; its caller has not run its cleanup yet
                self._queue.popleft()
                self._dequeue(entry)
                continue
            if entry.deadline is not None and entry.deadline <= now:
                self._queue.popleft()
                self._dequeue(entry)
                self._expire(entry, now)
                continue
            if batch and images + entry.images > limit:
                break
            self._queue.popleft()
            self._dequeue(entry)
            batch.append(entry)
            images += entry.images
        self._queue_changed()
        return batch

    def _launch(self, batch: list[_Pending], solo: bool = False) -> None:
        self._computing += 1
        self._solo = solo
        start = time.monotonic()
        arrays = [e.inputs for e in batch]
        # Not loop.run_in_executor: see "Handing over" above.
        future = self._executor.submit(self._run_batch, arrays, self._solo_fn if solo else self._infer_fn)
        future.add_done_callback(functools.partial(self._finished, batch, start))

    def _finished(self, batch: list[_Pending], start: float, future: concurrent.futures.Future) -> None:
        """In the compute thread, as the batch ends: its results go to the loop."""
        try:
            self._loop.call_soon_threadsafe(self._batch_done, batch, start, future)
        except RuntimeError:  # the loop is closed: nobody waits for these results any more
            pass

    def _batch_done(self, batch: list[_Pending], start: float, future: concurrent.futures.Future) -> None:
        self._computing -= 1
        self._solo = False
        end = time.monotonic()
        try:
            parts, (input_ns, infer_ns, output_ns) = future.result()
        except BaseException as e:  # noqa: BLE001 - a lone request failed (or the run was interrupted)
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(e)
                if self._stats is not None:
                    self._stats.record_failure(int((end - entry.enqueued) * 1e9))
        else:
            answered = []
            for entry, part in zip(batch, parts):
                if isinstance(part, _Failed):
                    if not entry.future.done():
                        entry.future.set_exception(part.error)
                    if self._stats is not None:
                        self._stats.record_failure(int((end - entry.enqueued) * 1e9))
                    continue
                if not entry.future.done():
                    entry.future.set_result(part)
                answered.append(entry)
            images = sum(e.images for e in answered)
            queue_seconds = [start - e.enqueued for e in answered]
            if self._stats is not None and answered:
                self._stats.record_batch(
                    images=images,
                    queue_ns=[int(q * 1e9) for q in queue_seconds],
                    total_ns=[int((end - e.enqueued) * 1e9) for e in answered],
                    input_ns=input_ns, infer_ns=infer_ns, output_ns=output_ns,
                    end_unix_ms=int(time.time() * 1000),
                )
            if self._observer is not None and answered:
                self._observer.observe_batch(images, queue_seconds, (input_ns + infer_ns + output_ns) / 1e9)
        # The batch collected meanwhile launches now, with no gap.
        self._pump()

    # -- in the executor ---------------------------------------------------------------

    def _run_batch(
        self, arrays: list[np.ndarray], infer_fn: InferFn,
    ) -> tuple[list[Outputs | _Failed], tuple[int, int, int]]:
        """Each request's outputs, and the batch's input, infer and output times in ns."""
        try:
            return self._compute(arrays, infer_fn)
        except Exception:
            if len(arrays) == 1:
                raise
        # See "Limits and failures" above: each request runs alone.
        parts: list[Outputs | _Failed] = []
        times = (0, 0, 0)
        for array in arrays:
            try:
                (part,), spent = self._compute([array], infer_fn)
            except Exception as error:  # noqa: BLE001 - this request's own failure
                parts.append(_Failed(error))
            else:
                parts.append(part)
                times = tuple(a + b for a, b in zip(times, spent))
        return parts, times

    def _compute(self, arrays: list[np.ndarray], infer_fn: InferFn) -> tuple[list[Outputs], tuple[int, int, int]]:
        t0 = time.perf_counter_ns()
        if self._collate is not None:
            x = self._collate(arrays)  # (N, ...)
        else:
            x = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        t1 = time.perf_counter_ns()
        outputs = infer_fn(x)
        t2 = time.perf_counter_ns()
        n = len(x)
        named = {"": outputs} if isinstance(outputs, np.ndarray) else outputs
        for key, value in named.items():
            if not isinstance(value, np.ndarray) or value.ndim == 0 or len(value) != n:
                got = f"shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
                what = f"output {key!r}" if key else "its output"
                raise RuntimeError(f"{self.name}: infer_fn returned {what} with {got} for a batch of {n}")
        parts: list[Any] = []
        offset = 0
        for array in arrays:
            stop = offset + len(array)
            if isinstance(outputs, np.ndarray):
                parts.append(outputs[offset:stop])
            else:
                parts.append({key: value[offset:stop] for key, value in outputs.items()})
            offset = stop
        t3 = time.perf_counter_ns()
        return parts, (t1 - t0, t2 - t1, t3 - t2)

    # -- bookkeeping -------------------------------------------------------------------

    def _dequeue(self, entry: _Pending) -> None:
        entry.queued = False
        self._queued -= 1
        self._queued_images -= entry.images

    def _abandon(self, entry: _Pending) -> None:
        if entry.queued:
            self._dequeue(entry)
            self._queue_changed()
        if not entry.future.done():
            entry.future.cancel()
        elif not entry.future.cancelled():
            entry.future.exception()  # retrieved: no "exception was never retrieved" log

    def _expire(self, entry: _Pending, now: float) -> None:
        waited_ms = (now - entry.enqueued) * 1000
        if not entry.future.done():
            entry.future.set_exception(
                DeadlineExceeded(f"the deadline passed after {waited_ms:.0f} ms in {self.name}'s queue; "
                                 "the request was dropped before computing")
            )
        if self._stats is not None:
            self._stats.record_failure(int((now - entry.enqueued) * 1e9))

    def _queue_changed(self) -> None:
        if self._observer is not None:
            self._observer.observe_queue_depth(self._queued)
