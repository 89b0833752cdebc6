"""Pure pieces of inference: the dynamic batcher with a fake infer_fn, image
preprocessing against the evaluation transform, the model cache's accounting, top-k.
No ONNX Runtime, no model, no gRPC."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones, images
from tlserve.service.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from tlserve.service.inference import cache, preprocess
from tlserve.service.inference.batcher import DynamicBatcher
from tlserve.service.inference.postprocess import softmax, top_k
from tlserve.service.inference.predictor import concurrent_batches
from tlserve.service.inference.stats import ModelStatistics
from tlserve.service.variant import Variant
from tlserve.service.training.data import eval_transform

# -- the batcher ----------------------------------------------------------------------


class FakeModel:
    """infer_fn that doubles its input, records batch sizes and can be held at a gate."""

    def __init__(self, *, fail: Exception | None = None, rows_off_by: int = 0) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = fail
        self.rows_off_by = rows_off_by

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.batches.append(x.copy())
        self.started.set()
        assert self.gate.wait(10), "test gate never opened"
        if self.fail is not None:
            raise self.fail
        n = len(x) + self.rows_off_by
        return {"double": x[:n] * 2, "first": x[:n, 0] * 2}

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


def batcher_for(model, pool, **kwargs) -> DynamicBatcher:
    options = dict(max_batch_size=8, max_delay_seconds=0.002, max_queue_size=16, executor=pool, max_concurrent_batches=1)
    options.update(kwargs)
    return DynamicBatcher(model, **options)


def rows(*values: float) -> np.ndarray:
    return np.array([[v, v] for v in values], dtype=np.float32)  # (n, 2)


async def wait_until(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


def test_requests_submitted_together_run_as_one_batch_and_get_their_own_rows(pool):
    model = FakeModel()

    async def main():
        b = batcher_for(model, pool)
        return await asyncio.gather(b.submit(rows(1)), b.submit(rows(2, 3)), b.submit(rows(4)))

    one, two, three = asyncio.run(main())
    assert model.sizes == [4]
    np.testing.assert_array_equal(one["double"], rows(2))
    np.testing.assert_array_equal(two["double"], rows(4, 6))
    np.testing.assert_array_equal(three["first"], [8.0])


def test_an_idle_model_runs_a_lone_request_without_waiting_for_the_delay(pool):
    model = FakeModel()

    async def main():
        b = batcher_for(model, pool, max_delay_seconds=5.0)
        start = time.monotonic()
        await b.submit(rows(1))
        return time.monotonic() - start

    assert asyncio.run(main()) < 1.0
    assert model.sizes == [1]


def test_requests_arriving_while_a_batch_computes_form_the_next_batch(pool):
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = batcher_for(model, pool, max_delay_seconds=5.0)
        first = asyncio.ensure_future(b.submit(rows(1)))
        await wait_until(model.started.is_set)
        later = []
        for v in (2, 3, 4):  # arrive at different times while batch 1 computes
            later.append(asyncio.ensure_future(b.submit(rows(v))))
            await asyncio.sleep(0.01)
        assert b.queue_depth == 3
        model.gate.set()  # batch 1 finishes: the collected batch launches at once, delay or not
        await asyncio.wait_for(asyncio.gather(first, *later), 2.0)
        return [r["first"][0] for r in await asyncio.gather(*later)]

    assert asyncio.run(main()) == [4.0, 6.0, 8.0]
    assert model.sizes == [1, 3]


class Providers:
    def __init__(self, *providers: str) -> None:
        self.providers = providers


def test_one_batch_computes_at_a_time_on_the_cpu_and_two_on_a_gpu():
    assert concurrent_batches(Providers("CPUExecutionProvider")) == 1
    assert concurrent_batches(Providers("pytorch-cpu")) == 1
    assert concurrent_batches(Providers("CUDAExecutionProvider", "CPUExecutionProvider")) == 2
    assert concurrent_batches(Providers("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                        "CPUExecutionProvider")) == 2
    assert concurrent_batches(Providers("pytorch-cuda")) == 2


def test_cpu_lanes_default_to_one_per_intra_op_thread(monkeypatch):
    from tlserve.service import hardware
    from tlserve.service.config import Settings
    from tlserve.service.inference.sessions import cpu_lanes

    monkeypatch.setattr(hardware, "physical_cores", lambda: 6)
    assert cpu_lanes(Settings()) == 6  # ONNX Runtime's default threads: the physical cores
    assert cpu_lanes(Settings(inference_threads=3)) == 3
    assert cpu_lanes(Settings(inference_threads=3, cpu_lanes=2)) == 2
    assert cpu_lanes(Settings(cpu_lanes=1)) == 1  # off


def test_physical_cores_is_at_least_one_and_at_most_the_cpus_this_process_may_use():
    import os

    from tlserve.service import hardware

    assert 1 <= hardware.physical_cores() <= len(os.sched_getaffinity(0))


# -- the batcher's lanes (a model on the CPU: single-threaded runs side by side) -------


class LaneModel:
    """infer_fn (narrow) and solo_fn (wide) that record which ran each batch, with
    batches held at a gate while the test looks."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, int]] = []
        self.gates = {"solo": threading.Event(), "narrow": threading.Event()}
        self.lock = threading.Lock()

    def _run(self, kind: str, x: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.runs.append((kind, len(x)))
        assert self.gates[kind].wait(10), "test gate never opened"
        return {"double": x * 2}

    def narrow(self, x):
        return self._run("narrow", x)

    def solo(self, x):
        return self._run("solo", x)


def laned_batcher(model: LaneModel, pool, **kwargs) -> DynamicBatcher:
    options = dict(max_batch_size=8, max_delay_seconds=5.0, max_queue_size=16, executor=pool,
                   max_concurrent_batches=2, solo_fn=model.solo)
    options.update(kwargs)
    return DynamicBatcher(model.narrow, **options)


def test_a_lone_request_on_an_idle_model_runs_on_every_core_and_alone(pool):
    model = LaneModel()

    async def main():
        b = laned_batcher(model, pool)
        first = asyncio.ensure_future(b.submit(rows(1, 2)))  # one request, two images
        await wait_until(lambda: model.runs)
        rest = [asyncio.ensure_future(b.submit(rows(v))) for v in (3, 4, 5)]
        await asyncio.sleep(0.05)
        assert b.computing == 1 and b.queue_depth == 3  # a free lane, but the solo run takes every core
        model.gates["solo"].set()
        model.gates["narrow"].set()
        results = await asyncio.gather(first, *rest)
        return [r["double"][:, 0].tolist() for r in results]

    assert asyncio.run(main()) == [[2.0, 4.0], [6.0], [8.0], [10.0]]
    assert model.runs[0] == ("solo", 2)
    # The three waiting requests shared the two lanes freed together: 2 + 1, single-threaded.
    assert sorted(model.runs[1:]) == [("narrow", 1), ("narrow", 2)]


def test_on_an_idle_model_fewer_requests_than_lanes_run_wide_together_and_more_fill_the_lanes(pool):
    model = LaneModel()
    model.gates["solo"].set()
    model.gates["narrow"].set()

    async def main():
        b = laned_batcher(model, pool, max_concurrent_batches=4)
        await asyncio.gather(*(b.submit(rows(v)) for v in (1, 2, 3)))  # 3 < 4 lanes: could not fill the cores
        await asyncio.gather(*(b.submit(rows(v)) for v in range(4, 9)))  # 5 ≥ 4 lanes: one batch per lane

    asyncio.run(main())
    assert model.runs[0] == ("solo", 3)
    assert sorted(model.runs[1:]) == [("narrow", 1), ("narrow", 1), ("narrow", 1), ("narrow", 2)]


def test_lanes_take_waiting_requests_at_once_and_a_request_waits_only_while_every_lane_computes(pool):
    model = LaneModel()

    async def main():
        b = laned_batcher(model, pool, max_delay_seconds=5.0)
        first = asyncio.ensure_future(b.submit(rows(1)))
        await wait_until(lambda: model.runs)
        second, third = (asyncio.ensure_future(b.submit(rows(v))) for v in (2, 3))
        await asyncio.sleep(0.05)
        assert b.computing == 1  # the solo run
        model.gates["solo"].set()
        await first
        await wait_until(lambda: len(model.runs) == 3, timeout=1.0)  # one lane each, no 5 s delay
        assert b.computing == 2
        fourth = asyncio.ensure_future(b.submit(rows(4)))
        await asyncio.sleep(0.05)
        assert b.queue_depth == 1  # every lane busy: it waits for one
        model.gates["narrow"].set()
        await asyncio.wait_for(asyncio.gather(second, third, fourth), 2.0)

    asyncio.run(main())
    assert model.runs == [("solo", 1), ("narrow", 1), ("narrow", 1), ("narrow", 1)]


def test_a_lane_takes_its_share_of_the_queue_and_leaves_the_rest_for_the_next_lane(pool):
    model = LaneModel()
    release = {1: threading.Event(), 2: threading.Event()}
    started: list[int] = []

    sizes: list[int] = []

    def narrow(x):
        started.append(int(x[0, 0]))
        sizes.append(len(x))
        release[int(x[0, 0])].wait(5) if int(x[0, 0]) in release else None
        return {"double": x * 2}

    async def main():
        b = DynamicBatcher(narrow, max_batch_size=8, max_delay_seconds=5.0, max_queue_size=16, executor=pool,
                           max_concurrent_batches=2, solo_fn=model.solo)
        both = [asyncio.ensure_future(b.submit(rows(v))) for v in (1, 2)]  # two requests: the two lanes
        await wait_until(lambda: len(started) == 2)
        rest = [asyncio.ensure_future(b.submit(rows(v))) for v in (5, 6, 7)]
        await asyncio.sleep(0.02)
        release[2].set()  # lane 2 frees while lane 1 still computes: it takes 2 of the 3 (ceil(3 / 2))
        await asyncio.wait_for(asyncio.gather(*rest), 2.0)  # then the last one, lane 1 still busy
        release[1].set()
        await asyncio.gather(*both)
        return sizes

    sizes = asyncio.run(main())
    assert sorted(started[:2]) == [1, 2] and started[2:] == [5, 7]
    assert sizes[2:] == [2, 1]
    assert model.runs == []  # never solo: the model was never idle with one request


def test_with_one_concurrent_batch_the_next_waits_for_the_running_one_however_long(pool):
    release = threading.Event()
    sizes: list[int] = []

    def model(x):
        sizes.append(len(x))
        release.wait(5)
        return {"logits": x[:, :1]}

    async def main():
        b = batcher_for(model, pool, max_delay_seconds=0.01, max_concurrent_batches=1)
        first = asyncio.ensure_future(b.submit(np.ones((1, 2), np.float32)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit(np.ones((1, 2), np.float32))) for _ in range(3)]
        await asyncio.sleep(0.1)  # ten times the delay: still queued behind the running batch
        assert b.computing == 1 and b.queue_depth == 3
        release.set()
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert sizes == [1, 3]


def test_a_batch_collected_during_a_long_compute_starts_alongside_once_its_delay_passes(pool):
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = batcher_for(model, pool, max_delay_seconds=0.05, max_concurrent_batches=2)
        first = asyncio.ensure_future(b.submit(rows(1)))
        await wait_until(model.started.is_set)
        model.started.clear()
        second = asyncio.ensure_future(b.submit(rows(2)))
        await asyncio.sleep(0.02)
        assert model.sizes == [1]  # within the delay: still collecting
        await wait_until(model.started.is_set)  # delay passed: runs while batch 1 still computes
        assert b.computing == 2 and not first.done()
        model.gate.set()
        await asyncio.gather(first, second)

    asyncio.run(main())
    assert model.sizes == [1, 1]


def test_a_full_batch_launches_without_waiting_for_the_delay(pool):
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = batcher_for(model, pool, max_batch_size=4, max_delay_seconds=5.0, max_concurrent_batches=2)
        first = asyncio.ensure_future(b.submit(rows(0)))
        await wait_until(model.started.is_set)
        rest = [asyncio.ensure_future(b.submit(rows(v, v))) for v in (1, 2)]  # 4 images: full
        await wait_until(lambda: len(model.batches) == 2, timeout=2.0)
        model.gate.set()
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert model.sizes == [1, 4]


def test_batches_never_hold_more_than_max_batch_size_images(pool):
    model = FakeModel()

    async def main():
        b = batcher_for(model, pool, max_batch_size=4)
        results = await asyncio.gather(*(b.submit(rows(v, v)) for v in range(5)))
        return [r["first"].tolist() for r in results]

    assert asyncio.run(main()) == [[2.0 * v] * 2 for v in range(5)]
    assert max(model.sizes) <= 4 and sum(model.sizes) == 10


def test_a_request_larger_than_max_batch_size_is_split_and_joined_in_order(pool):
    model = FakeModel()

    async def main():
        b = batcher_for(model, pool, max_batch_size=4)
        return await b.submit(rows(*range(10)))

    result = asyncio.run(main())
    np.testing.assert_array_equal(result["first"], 2.0 * np.arange(10))
    assert sorted(model.sizes) == [2, 4, 4]


def test_an_array_returning_infer_fn_gives_arrays_back(pool):
    async def main():
        b = DynamicBatcher(lambda x: x + 1, max_batch_size=2, max_delay_seconds=0, max_queue_size=4, executor=pool)
        return await asyncio.gather(b.submit(rows(1)), b.submit(rows(2, 3, 4)))

    small, big = asyncio.run(main())
    np.testing.assert_array_equal(small, rows(2))
    np.testing.assert_array_equal(big, rows(3, 4, 5))


def test_an_exception_from_infer_fn_reaches_every_caller_that_fails_alone_too(pool):
    model = FakeModel(fail=RuntimeError("the model broke"))
    stats = ModelStatistics("m", 1, "onnx")

    async def main():
        b = batcher_for(model, pool, stats=stats)
        return await asyncio.gather(b.submit(rows(1)), b.submit(rows(2)), return_exceptions=True)

    results = asyncio.run(main())
    assert [str(r) for r in results] == ["the model broke"] * 2
    assert model.sizes == [2, 1, 1]  # together, then each alone
    assert (stats.fail.count, stats.success.count, stats.execution_count) == (2, 0, 0)


def test_a_request_that_breaks_the_model_fails_alone_and_the_rest_of_its_batch_is_answered(pool):
    class Poisoned(FakeModel):
        def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
            if (x == 99).any():
                self.batches.append(x.copy())
                raise ValueError("row 99 breaks this model")
            return super().__call__(x)

    model = Poisoned()
    stats = ModelStatistics("m", 1, "onnx")

    async def main():
        b = batcher_for(model, pool, stats=stats)
        return await asyncio.gather(b.submit(rows(1)), b.submit(rows(99, 5)), b.submit(rows(2, 3)),
                                    return_exceptions=True)

    first, poisoned, last = asyncio.run(main())
    assert model.sizes == [5, 1, 2, 2]  # one batch, then each request alone
    np.testing.assert_array_equal(first["double"], rows(2))
    assert isinstance(poisoned, ValueError) and "row 99" in str(poisoned)
    np.testing.assert_array_equal(last["double"], rows(4, 6))
    assert (stats.success.count, stats.fail.count, stats.inference_count) == (2, 1, 3)


def test_outputs_with_the_wrong_number_of_rows_fail_the_batch(pool):
    model = FakeModel(rows_off_by=-1)

    async def main():
        b = batcher_for(model, pool, name="model m:1")
        return await asyncio.gather(b.submit(rows(1, 2)), b.submit(rows(3)), return_exceptions=True)

    wide, narrow = asyncio.run(main())
    assert model.sizes == [3, 2, 1]
    assert isinstance(wide, RuntimeError) and isinstance(narrow, RuntimeError)
    assert "model m:1: infer_fn returned output 'double' with shape (1, 2) for a batch of 2" in str(wide)
    assert "model m:1: infer_fn returned output 'double' with shape (0, 2) for a batch of 1" in str(narrow)


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_before_compute(pool):
    model = FakeModel()
    model.gate.clear()
    stats = ModelStatistics("m", 1, "onnx")

    async def main():
        b = batcher_for(model, pool, stats=stats)
        first = asyncio.ensure_future(b.submit(rows(1)))
        await wait_until(model.started.is_set)
        late = asyncio.ensure_future(b.submit(rows(99), deadline=time.monotonic() + 0.02))
        on_time = asyncio.ensure_future(b.submit(rows(2), deadline=time.monotonic() + 60))
        await asyncio.sleep(0.05)
        model.gate.set()
        await first
        with pytest.raises(DeadlineExceeded, match="dropped before computing"):
            await late
        await on_time

    asyncio.run(main())
    assert model.sizes == [1, 1]
    assert 99 not in np.concatenate(model.batches)
    assert stats.fail.count == 1 and stats.success.count == 2


def test_a_deadline_already_passed_is_refused_at_once(pool):
    model = FakeModel()

    async def main():
        b = batcher_for(model, pool)
        with pytest.raises(DeadlineExceeded):
            await b.submit(rows(1), deadline=time.monotonic() - 1)

    asyncio.run(main())
    assert model.sizes == []


def test_a_full_queue_is_refused_naming_the_limit_and_the_setting(pool):
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = batcher_for(model, pool, max_queue_size=2)
        running = asyncio.ensure_future(b.submit(rows(0)))
        await wait_until(model.started.is_set)
        waiting = [asyncio.ensure_future(b.submit(rows(v))) for v in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match=r"max_queue_size 2 \(TLSERVE_MAX_QUEUE_SIZE\)"):
            await b.submit(rows(3))
        model.gate.set()
        await asyncio.gather(running, *waiting)

    asyncio.run(main())


def test_a_cancelled_caller_frees_its_queue_slot_and_is_never_computed(pool):
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = batcher_for(model, pool, max_queue_size=1)
        running = asyncio.ensure_future(b.submit(rows(0)))
        await wait_until(model.started.is_set)
        cancelled = asyncio.ensure_future(b.submit(rows(77)))
        await asyncio.sleep(0)
        assert b.queue_depth == 1
        cancelled.cancel()
        await asyncio.sleep(0)
        assert b.queue_depth == 0
        replacement = asyncio.ensure_future(b.submit(rows(5)))  # the slot is free again
        model.gate.set()
        await asyncio.gather(running, replacement)
        assert cancelled.cancelled()

    asyncio.run(main())
    assert 77 not in np.concatenate(model.batches)


def test_a_caller_cancelled_while_its_batch_computes_does_not_disturb_the_others(pool):
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = batcher_for(model, pool)
        leaving, staying = asyncio.ensure_future(b.submit(rows(1))), asyncio.ensure_future(b.submit(rows(2)))
        await wait_until(model.started.is_set)
        leaving.cancel()
        model.gate.set()
        return await staying

    assert asyncio.run(main())["first"].tolist() == [4.0]


def test_statistics_count_images_batches_and_per_batch_size_times(pool):
    model = FakeModel()
    stats = ModelStatistics("m", 1, Variant.onnx("fp32"))

    async def main():
        b = batcher_for(model, pool, stats=stats)
        await asyncio.gather(b.submit(rows(1)), b.submit(rows(2, 3)))
        await b.submit(rows(4))

    asyncio.run(main())
    snap = stats.snapshot()
    assert (snap.inference_count, snap.execution_count) == (4, 2)
    assert snap.success.count == 3 and snap.queue.count == 3 and snap.compute_infer.count == 3
    assert set(snap.batch_stats) == {3, 1} and snap.batch_stats[3].count == 1
    assert snap.batch_stats[3].compute_infer_ns > 0 and snap.last_inference_ms > 0
    assert snap.fail.count == 0


def test_close_finishes_queued_work_then_refuses_new_requests(pool):
    model = FakeModel()
    model.gate.clear()

    async def main():
        b = batcher_for(model, pool)
        running = asyncio.ensure_future(b.submit(rows(1)))
        await wait_until(model.started.is_set)
        queued = asyncio.ensure_future(b.submit(rows(2)))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.01)
        assert not closing.done()
        model.gate.set()
        await closing
        assert running.done() and queued.done() and b.idle
        with pytest.raises(Unavailable):
            await b.submit(rows(3))

    asyncio.run(main())


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("max_batch_size", 0, "max_batch_size must be >= 1"),
        ("max_delay_seconds", -0.1, "max_delay_seconds must be >= 0"),
        ("max_queue_size", 0, "max_queue_size must be >= 1"),
        ("max_concurrent_batches", 0, "max_concurrent_batches must be >= 1"),
    ],
)
def test_bad_batcher_options_fail_when_it_is_built(option, value, message, pool):
    options = dict(max_batch_size=4, max_delay_seconds=0.0, max_queue_size=4, executor=pool)
    options[option] = value
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(lambda x: x, **options)


# -- preprocessing --------------------------------------------------------------------

PRE = pb.Preprocessing(resize_size=36, crop_size=32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                       interpolation="bilinear")
GREY_LEVEL = (1 / (255 * np.array(PRE.std, dtype=np.float32))).reshape(3, 1, 1)  # one grey level, normalised


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth image with edges and noise, like a photo at small scale: (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
    base[(x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2] = (230, 40, 60)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def reference(data: bytes, pre: pb.Preprocessing = PRE) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return eval_transform(backbones.Preprocessing.from_proto(pre))(image.convert("RGB")).numpy()


def prepared(prep: preprocess.Preprocessor, *images: pb.ImageInput, max_pixels: int = 10**8) -> np.ndarray:
    return prep.prepare(list(images), max_pixels)


@pytest.mark.parametrize("size", [(200, 120), (120, 200), (37, 36), (36, 36), (513, 77)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_decoded_pngs_give_the_pixels_of_the_evaluation_transform(size, interpolation):
    pre = pb.Preprocessing()
    pre.CopyFrom(PRE)
    pre.interpolation = interpolation
    data = encode(photo(*size), "PNG")
    (got,) = prepared(preprocess.Preprocessor(pre), pb.ImageInput(encoded=data))
    assert got.shape == (3, 32, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(data, pre), atol=1e-5)  # float rounding only


def test_greyscale_palette_and_rgba_images_become_rgb_as_in_training():
    prep = preprocess.Preprocessor(PRE)
    rgb = photo(80, 60)
    for image in (Image.fromarray(rgb).convert("L"), Image.fromarray(rgb).convert("P"),
                  Image.fromarray(rgb).convert("RGBA")):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        (got,) = prepared(prep, pb.ImageInput(encoded=buffer.getvalue()))
        np.testing.assert_allclose(got, reference(buffer.getvalue()), atol=1e-5)


def test_jpeg_draft_decoding_stays_within_a_few_grey_levels_of_a_full_decode():
    data = encode(photo(640, 480, seed=1), "JPEG", quality=90)  # drafted at 1/2: 240 px ≥ 4 × 36
    full = prepared(preprocess.Preprocessor(PRE, draft=False), pb.ImageInput(encoded=data))
    drafted = prepared(preprocess.Preprocessor(PRE), pb.ImageInput(encoded=data))
    np.testing.assert_allclose(full[0], reference(data), atol=1e-5)
    levels = np.abs(drafted - full) / GREY_LEVEL
    assert levels.mean() < 0.5 and levels.max() <= 4


def test_jpeg_is_not_drafted_when_the_reduced_image_would_be_too_small():
    data = encode(photo(100, 100), "JPEG", quality=90)  # 1/2 would leave 50 px < 4 × 36
    full = prepared(preprocess.Preprocessor(PRE, draft=False), pb.ImageInput(encoded=data))
    drafted = prepared(preprocess.Preprocessor(PRE), pb.ImageInput(encoded=data))
    np.testing.assert_array_equal(full, drafted)


def test_webp_decodes():
    data = encode(photo(90, 70), "WEBP", lossless=True)
    (got,) = prepared(preprocess.Preprocessor(PRE), pb.ImageInput(encoded=data))
    np.testing.assert_allclose(got, reference(data), atol=1e-5)


def test_a_uint8_tensor_of_any_size_is_prepared_like_the_same_decoded_image():
    pixels = photo(90, 50)
    prep = preprocess.Preprocessor(PRE)
    tensor = pb.ImageInput(tensor=pb.Tensor(shape=pixels.shape, dtype=pb.DATA_TYPE_UINT8, data=pixels.tobytes()))
    assert not prep.is_prepared(tensor)
    np.testing.assert_array_equal(prepared(prep, tensor), prepared(prep, pb.ImageInput(encoded=encode(pixels, "PNG"))))


def test_a_crop_sized_uint8_tensor_is_taken_as_already_resized_and_cropped():
    pixels = photo(32, 32)
    prep = preprocess.Preprocessor(PRE)
    tensor = pb.ImageInput(tensor=pb.Tensor(shape=[32, 32, 3], dtype=pb.DATA_TYPE_UINT8, data=pixels.tobytes()))
    assert prep.is_prepared(tensor)
    (got,) = prepared(prep, tensor)
    expected = (pixels.transpose(2, 0, 1) / 255.0 - np.reshape(PRE.mean, (3, 1, 1))) / np.reshape(PRE.std, (3, 1, 1))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_normalised_float_tensor_passes_through_and_a_uint8_graph_gets_pixels_back():
    pixels = photo(32, 32)
    nchw = preprocess.Preprocessor(PRE)
    (normalised,) = prepared(nchw, pb.ImageInput(
        tensor=pb.Tensor(shape=[32, 32, 3], dtype=pb.DATA_TYPE_UINT8, data=pixels.tobytes())))
    image = pb.ImageInput(tensor=pb.Tensor(shape=[3, 32, 32], dtype=pb.DATA_TYPE_FLOAT32, data=normalised.tobytes()))
    assert nchw.is_prepared(image)
    np.testing.assert_array_equal(prepared(nchw, image)[0], normalised)
    nhwc = preprocess.Preprocessor(PRE, "uint8_nhwc")
    np.testing.assert_array_equal(prepared(nhwc, image)[0], pixels)


def test_the_uint8_layout_gives_raw_crops_for_the_graph_to_normalise():
    data = encode(photo(120, 80), "PNG")
    got = prepared(preprocess.Preprocessor(PRE, "uint8_nhwc"), pb.ImageInput(encoded=data))
    assert got.shape == (1, 32, 32, 3) and got.dtype == np.uint8
    normalised = (got[0].transpose(2, 0, 1) / 255.0 - np.reshape(PRE.mean, (3, 1, 1))) / np.reshape(PRE.std, (3, 1, 1))
    np.testing.assert_allclose(normalised, reference(data), atol=1e-5)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (pb.Tensor(shape=[32, 32], dtype=pb.DATA_TYPE_UINT8, data=bytes(1024)), r"got uint8 \(32, 32\)"),
        (pb.Tensor(shape=[32, 32, 4], dtype=pb.DATA_TYPE_UINT8, data=bytes(4096)), r"got uint8 \(32, 32, 4\)"),
        (pb.Tensor(shape=[3, 16, 16], dtype=pb.DATA_TYPE_FLOAT32, data=bytes(3072)), r"got float32 \(3, 16, 16\)"),
        (pb.Tensor(shape=[32, 32, 3], dtype=pb.DATA_TYPE_INT64, data=bytes(24576)), r"got int64 \(32, 32, 3\)"),
        (pb.Tensor(shape=[32, 32, 3], dtype=pb.DATA_TYPE_UINT8, data=bytes(100)),
         r"tensor data is 100 bytes, got uint8 \(32, 32, 3\) needs 3072"),
    ],
)
def test_tensors_of_the_wrong_shape_dtype_or_length_are_refused_naming_the_image(tensor, message):
    prep = preprocess.Preprocessor(PRE)
    good = pb.ImageInput(tensor=pb.Tensor(shape=[32, 32, 3], dtype=pb.DATA_TYPE_UINT8, data=bytes(3072)))
    with pytest.raises(InvalidArgument, match=r"images\[1\]: .*" + message) as e:
        prepared(prep, good, pb.ImageInput(tensor=tensor))
    assert "expected uint8 (H, W, 3) RGB or float32 (3, 32, 32) normalised" in str(e.value)


def test_undecodable_bytes_are_refused_naming_the_image():
    prep = preprocess.Preprocessor(PRE)
    good = pb.ImageInput(encoded=encode(photo(40, 40), "PNG"))
    with pytest.raises(InvalidArgument, match=r"images\[2\]: cannot decode 9 bytes: not a JPEG, PNG or WebP file"):
        prepared(prep, good, good, pb.ImageInput(encoded=b"not a jpg"))
    jpeg = encode(photo(200, 200), "JPEG")
    with pytest.raises(InvalidArgument, match=r"images\[0\]: cannot decode the JPEG header"):
        prepared(prep, pb.ImageInput(encoded=jpeg[:300]))
    with pytest.raises(InvalidArgument, match=r"images\[0\]: cannot decode the JPEG image: .*truncated"):
        prepared(prep, pb.ImageInput(encoded=jpeg[: len(jpeg) // 2]))
    with pytest.raises(InvalidArgument, match=r"images\[0\]: empty image"):
        prepared(prep, pb.ImageInput())


def test_an_image_over_max_pixels_is_refused_from_its_header_before_pil_s_bomb_check(monkeypatch):
    # 20000 x 10000 one-bit pixels compress to a few KB: decoding would allocate 600 MB as RGB.
    buffer = io.BytesIO()
    Image.new("1", (20000, 10000)).save(buffer, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own check would fire first if it ran
    with pytest.raises(InvalidArgument, match=(
        r"images\[0\]: 20000x10000 = 200000000 pixels is over the server's max_image_pixels 50000000 "
        r"\(TLSERVE_MAX_IMAGE_PIXELS\)"
    )):
        prepared(preprocess.Preprocessor(PRE), pb.ImageInput(encoded=buffer.getvalue()), max_pixels=50_000_000)
    # Under our limit, PIL's process-wide limit does not refuse it either.
    small = encode(photo(60, 60), "PNG")
    assert prepared(preprocess.Preprocessor(PRE), pb.ImageInput(encoded=small)).shape == (1, 3, 32, 32)
    huge = pb.Tensor(shape=[3000, 3000, 3], dtype=pb.DATA_TYPE_UINT8, data=b"")
    with pytest.raises(InvalidArgument, match=r"3000x3000 = 9000000 pixels is over"):
        prepared(preprocess.Preprocessor(PRE), pb.ImageInput(tensor=huge), max_pixels=1_000_000)


def test_a_thin_image_is_refused_from_its_header_and_the_widest_accepted_one_stays_cheap():
    # 1 x 200,000 pixels: 0.2 MP and under 1 KB as PNG; resized by its shorter side it
    # became 36 x 7.2 M pixels (7.5 s, +2.6 GB) before the aspect-ratio cap.
    thin = io.BytesIO()
    Image.new("L", (200_000, 1)).save(thin, "PNG")
    assert len(thin.getvalue()) < 2000
    prep = preprocess.Preprocessor(PRE)
    with pytest.raises(InvalidArgument, match=r"images\[0\]: 200000x1 is longer than 32 times its width or height"):
        prepared(prep, pb.ImageInput(encoded=thin.getvalue()))
    strip = pb.Tensor(shape=[1, 200_000, 3], dtype=pb.DATA_TYPE_UINT8, data=bytes(600_000))
    with pytest.raises(InvalidArgument, match=r"200000x1 is longer than 32 times"):
        prepared(prep, pb.ImageInput(tensor=strip))
    # The widest shape accepted is still served; one pixel wider is not.
    widest = encode(np.zeros((2, 2 * images.MAX_ASPECT_RATIO, 3), np.uint8), "PNG")
    assert prepared(prep, pb.ImageInput(encoded=widest)).shape == (1, 3, 32, 32)
    with pytest.raises(InvalidArgument, match="longer than 32 times"):
        prepared(prep, pb.ImageInput(encoded=encode(np.zeros((2, 65, 3), np.uint8), "PNG")))


def test_resize_geometry_follows_torchvision():
    assert preprocess.resized_size(640, 480, 256) == (341, 256)  # long side rounded down
    assert preprocess.resized_size(480, 640, 256) == (256, 341)
    assert preprocess.crop_offsets(341, 256, 224) == (58, 16)  # int(round(117 / 2)) = 58 (half to even)
    with pytest.raises(InvalidArgument, match="smaller than the crop"):
        preprocess.crop_offsets(200, 300, 224)


# -- the model cache -------------------------------------------------------------------


class Item:
    def __init__(self, memory_bytes: int, in_use: int = 0) -> None:
        self.memory_bytes, self.in_use = memory_bytes, in_use


def test_the_cache_evicts_least_recently_used_models_when_over_budget():
    c = cache.ModelCache(100)
    a, b, d = Item(40), Item(40), Item(40)
    assert c.put("a", a) == [] and c.put("b", b) == []
    c.get("a")  # a is now more recent than b
    assert c.put("d", d) == [b]
    assert list(c) == ["a", "d"] and c.total_bytes == 80


def test_the_cache_never_evicts_a_model_in_use_or_the_one_just_loaded():
    c = cache.ModelCache(100)
    busy = Item(60, in_use=1)
    c.put("busy", busy)
    big = Item(70)
    assert c.put("big", big) == []  # over budget: busy is in use, big was just loaded
    assert c.total_bytes == 130
    busy.in_use = 0  # its last request finished: the cache trims again
    assert c.trim() == [busy]
    assert list(c) == ["big"]


def test_peek_does_not_change_recency_and_pop_removes():
    c = cache.ModelCache(100)
    c.put("a", Item(50))
    c.put("b", Item(50))
    c.peek("a")
    assert c.put("c", Item(10))[0] is not None and "a" not in c
    assert c.pop("b") is not None and c.pop("b") is None


def test_measure_load_reports_the_resident_memory_a_load_adds_floored_at_the_file_size():
    assert cache.resident_bytes() > 0
    # Garbage that earlier tests left, freed during the measurement, would hide the growth.
    import gc

    gc.collect()
    cache.release_memory()
    block, added = cache.measure_load(lambda: np.ones(64 * 1024 * 1024, np.uint8), floor_bytes=1)
    assert 60 * 2**20 <= added <= 80 * 2**20
    del block
    cache.release_memory()
    _, floor = cache.measure_load(lambda: None, floor_bytes=12345)
    assert floor >= 12345


# -- top-k -----------------------------------------------------------------------------


def test_softmax_is_stable_for_large_logits_and_top_k_orders_highest_first_ties_by_index():
    p = softmax(np.array([[1000.0, 1001.0, 999.0], [0.0, 0.0, 5.0]], np.float32))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert np.isfinite(p).all()
    assert top_k(p, 2).tolist() == [[1, 0], [2, 0]]
    many = np.zeros((2, 1000))
    many[0, [700, 3, 999]] = [3.0, 2.0, 1.0]
    assert top_k(softmax(many), 5).tolist()[0] == [700, 3, 999, 0, 1]
    assert top_k(p, 10).shape == (2, 3)


# -- sessions: spinning between runs ------------------------------------------------------


def _tiny_onnx(path) -> None:
    """A (N, 3, 4, 4) → logits (N, 2) graph that runs in microseconds."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [48, 2], np.ones(96, np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


def _force_spinning_stop(session) -> str:
    return session._session.get_session_options().get_session_config_entry("session.force_spinning_stop")


def test_a_cpu_session_with_short_runs_stops_spinning_between_runs(tmp_path):
    from tlserve.service.inference import sessions

    _tiny_onnx(tmp_path / "tiny.onnx")
    session = sessions.open_onnx_session(tmp_path / "tiny.onnx", warm_batch=4, fill_size=4,
                                         providers=["CPUExecutionProvider"])
    assert session.spin_between_runs is False
    assert _force_spinning_stop(session) == "1"
    assert session.run(np.ones((2, 3, 4, 4), np.float32))["logits"].tolist() == [[48.0, 48.0]] * 2


def test_a_cpu_session_with_long_runs_keeps_onnx_runtimes_spinning(tmp_path, monkeypatch):
    from tlserve.service.inference import sessions

    _tiny_onnx(tmp_path / "tiny.onnx")
    monkeypatch.setattr(sessions, "SPIN_MIN_RUN_SECONDS", 0.0)  # every run counts as long
    session = sessions.open_onnx_session(tmp_path / "tiny.onnx", warm_batch=4, fill_size=4,
                                         providers=["CPUExecutionProvider"])
    assert session.spin_between_runs is True
    with pytest.raises(Exception):  # the entry was never set: ORT's default applies
        _force_spinning_stop(session)


def test_with_lanes_a_cpu_model_opens_a_single_threaded_session_beside_the_wide_one(tmp_path):
    from tlserve.service.inference import sessions

    _tiny_onnx(tmp_path / "tiny.onnx")
    session = sessions.open_onnx_session(tmp_path / "tiny.onnx", warm_batch=4, fill_size=4, lanes=2,
                                         threads=2, providers=["CPUExecutionProvider"])
    try:
        assert isinstance(session, sessions.LanedSession) and session.lanes == 2
        wide = session.wide._session.get_session_options()
        narrow = session.narrow._session.get_session_options()
        assert (wide.intra_op_num_threads, narrow.intra_op_num_threads) == (2, 1)
        x = np.arange(3 * 48, dtype=np.float32).reshape(3, 3, 4, 4)
        np.testing.assert_array_equal(session.run(x)["logits"], session.run_wide(x)["logits"])
        assert session.input == session.wide.input and session.outputs == session.wide.outputs
    finally:
        session.close()
    assert session.wide._session is None and session.narrow._session is None
    plain = sessions.open_onnx_session(tmp_path / "tiny.onnx", warm_batch=4, fill_size=4, lanes=1,
                                       providers=["CPUExecutionProvider"])
    assert isinstance(plain, sessions.OnnxSession)


# -- providers: TensorRT → CUDA → CPU, as available ----------------------------------------


ALL_PROVIDERS = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "TensorrtExecutionProvider"]


@pytest.mark.parametrize(
    ("gpus", "tensorrt_runtime", "expected"),
    [
        (0, True, ("CPUExecutionProvider",)),  # onnxruntime-gpu lists CUDA and TensorRT on any machine
        (1, False, ("CUDAExecutionProvider", "CPUExecutionProvider")),
        (1, True, ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
    ],
)
def test_providers_come_in_order_and_count_only_with_a_gpu_and_tensorrts_runtime(monkeypatch, gpus, tensorrt_runtime,
                                                                                   expected):
    import onnxruntime

    from tlserve.service import hardware

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(ALL_PROVIDERS))
    monkeypatch.setattr(hardware, "gpu_count", lambda: gpus)
    monkeypatch.setattr(hardware.ctypes.util, "find_library",
                        lambda name: "libnvinfer.so.10" if tensorrt_runtime and name == "nvinfer" else None)
    find_spec = hardware.importlib.util.find_spec
    monkeypatch.setattr(hardware.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt_libs" else find_spec(name, *a))
    hardware.onnxruntime_providers.cache_clear()
    try:
        assert hardware.onnxruntime_providers() == expected
    finally:
        hardware.onnxruntime_providers.cache_clear()


def test_provider_options_give_tensorrt_a_batch_profile_and_an_engine_cache_and_cuda_a_growing_arena(tmp_path):
    from tlserve.service.inference.sessions import provider_options

    cache_dir = tmp_path / "cache" / "tensorrt"
    options = provider_options(("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                               input_name="input", sample_shape=(3, 224, 224), max_batch_size=32, fp16=True,
                               cache_dir=cache_dir)
    assert [name for name, _ in options] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    tensorrt, cuda, cpu = (o for _, o in options)
    assert tensorrt["trt_fp16_enable"] == "1"
    assert (tensorrt["trt_profile_min_shapes"], tensorrt["trt_profile_opt_shapes"], tensorrt["trt_profile_max_shapes"]) == (
        "input:1x3x224x224", "input:32x3x224x224", "input:32x3x224x224")
    assert tensorrt["trt_engine_cache_enable"] == "1" and tensorrt["trt_engine_cache_path"] == str(cache_dir)
    assert cache_dir.is_dir()  # made for TensorRT to write its engines into
    assert cuda["arena_extend_strategy"] == "kSameAsRequested" and cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cpu == {}
    fp32 = dict(provider_options(("TensorrtExecutionProvider",), input_name="x", sample_shape=(224, 224, 3),
                                 max_batch_size=8, fp16=False, cache_dir=None))["TensorrtExecutionProvider"]
    assert fp32["trt_fp16_enable"] == "0" and fp32["trt_profile_max_shapes"] == "x:8x224x224x3"
    assert "trt_engine_cache_enable" not in fp32


def test_an_onnx_session_passes_its_threads_and_providers_to_onnx_runtime(tmp_path, monkeypatch):
    import onnxruntime

    from tlserve.service.inference import sessions

    _tiny_onnx(tmp_path / "tiny.onnx")
    made = []
    real = onnxruntime.InferenceSession

    def recording(path, sess_options=None, providers=None, **kwargs):
        made.append((sess_options.intra_op_num_threads, providers))
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    sessions.OnnxSession(tmp_path / "tiny.onnx", threads=3, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    threads, providers = made[0]
    assert threads == 3
    assert [name for name, _ in providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers[0][1]["device_id"] == "0"


# -- preprocessing: uint8 pixels normalised in the compute thread ---------------------------


def _pixel_tensor(pixels: np.ndarray) -> pb.ImageInput:
    return pb.ImageInput(tensor=pb.Tensor(shape=list(pixels.shape), dtype=pb.DATA_TYPE_UINT8, data=pixels.tobytes()))


def test_collated_pixels_equal_what_prepare_gives_and_keep_request_order():
    prep = preprocess.Preprocessor(pb.Preprocessing(resize_size=9, crop_size=8, mean=[0.485, 0.456, 0.406],
                                                    std=[0.229, 0.224, 0.225], interpolation="bilinear"))
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (1, 2))
    images_a, images_b = [_pixel_tensor(p) for p in a], [_pixel_tensor(p) for p in b]
    pixels_a, pixels_b = prep.pixels(images_a), prep.pixels(images_b)
    assert pixels_a.dtype == np.uint8 and pixels_a.shape == (1, 8, 8, 3) and pixels_b.shape == (2, 8, 8, 3)
    normalised = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)  # a float tensor request, prepared already
    batch = prep.collate([pixels_a, normalised, pixels_b])
    expected = np.concatenate([prep.prepare(images_a, 10**6), normalised, prep.prepare(images_b, 10**6)])
    assert batch.dtype == np.float32 and batch.shape == (4, 3, 8, 8)
    assert np.array_equal(batch, expected)  # the same float32 operations, bit for bit


def test_only_uint8_tensors_of_the_models_size_take_the_pixel_path():
    prep = preprocess.Preprocessor(pb.Preprocessing(resize_size=9, crop_size=8, mean=[0.5] * 3, std=[0.5] * 3,
                                                    interpolation="bilinear"))
    good = _pixel_tensor(np.zeros((8, 8, 3), np.uint8))
    assert prep.pixels([good, good]).shape == (2, 8, 8, 3)
    assert prep.pixels([good, _pixel_tensor(np.zeros((9, 8, 3), np.uint8))]) is None  # needs a resize
    short = pb.ImageInput(tensor=pb.Tensor(shape=[8, 8, 3], dtype=pb.DATA_TYPE_UINT8, data=b"\0" * 10))
    assert prep.pixels([short]) is None  # `prepare` names what is wrong with it
    assert prep.pixels([pb.ImageInput(encoded=b"\xff\xd8\xff")]) is None
