"""The ordered reply window both streaming servicers answer through, without gRPC."""

from __future__ import annotations

import asyncio
import time

import pytest

from tlserve.service.api.streams import call_deadline, ordered_replies


async def _requests(items, *, fail_after: int | None = None):
    for i, item in enumerate(items):
        if fail_after is not None and i == fail_after:
            raise ValueError("the request stream broke")
        yield item
        await asyncio.sleep(0)


def test_replies_come_in_request_order_while_the_answers_run_together():
    running, most = 0, 0

    async def answer(delay: float) -> float:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(delay)
        running -= 1
        return delay

    async def main():
        delays = [0.05, 0.01, 0.03, 0.0, 0.02, 0.04]
        return delays, [r async for r in ordered_replies(_requests(delays), answer, window=3)]

    delays, replies = asyncio.run(main())
    assert replies == delays
    assert most > 1  # concurrent, not one after another


def test_at_most_window_answers_wait_unread():
    started = []

    async def answer(i: int) -> int:
        started.append(i)
        await asyncio.sleep(0.01)
        return i

    async def main():
        stream = ordered_replies(_requests(range(100)), answer, window=4)
        first = await anext(stream)
        await asyncio.sleep(0.05)  # a slow reader: the window fills and reading stops
        seen = len(started)
        await stream.aclose()
        return first, seen

    first, seen = asyncio.run(main())
    assert first == 0
    assert seen <= 4 + 2  # the window, the one taken out and the one the reader holds


def test_a_broken_request_stream_fails_after_the_replies_before_it():
    async def answer(i: int) -> int:
        return i

    async def main():
        got = []
        with pytest.raises(ValueError, match="broke"):
            async for reply in ordered_replies(_requests(range(5), fail_after=3), answer, window=8):
                got.append(reply)
        return got

    assert asyncio.run(main()) == [0, 1, 2]


def test_closing_the_stream_early_cancels_the_answers_still_running():
    cancelled = []

    async def answer(i: int) -> int:
        try:
            await asyncio.sleep(0 if i == 0 else 10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    async def main():
        stream = ordered_replies(_requests(range(4)), answer, window=8)
        assert await anext(stream) == 0
        await asyncio.sleep(0.01)
        await stream.aclose()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert sorted(cancelled) == [1, 2, 3]


class _Context:
    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


def test_call_deadline_is_on_the_monotonic_clock():
    assert call_deadline(None) is None and call_deadline(_Context(None)) is None
    before = time.monotonic()
    deadline = call_deadline(_Context(2.0))
    assert before + 2.0 <= deadline <= time.monotonic() + 2.0
