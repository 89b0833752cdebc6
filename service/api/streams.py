"""What the gRPC servicers share about calls and streams: a call's deadline on the
monotonic clock, and the ordered window that PredictStream and ModelStreamInfer
answer through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Reply = TypeVar("Reply")


def call_deadline(context) -> float | None:
    """The call's deadline on the time.monotonic() clock, or None without one (or without a call)."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else time.monotonic() + remaining


async def ordered_replies(
    requests: AsyncIterable[Request], answer: Callable[[Request], Awaitable[Reply]], window: int,
) -> AsyncIterator[Reply]:
    """`answer(request)` for each request of the stream, started as soon as it arrives
    (up to `window` at once, so a stream batches with itself and with other calls),
    yielded in request order. `answer` must turn a request's own failure into a reply:
    an exception from it ends the stream. A failure of the request stream itself
    (e.g. an oversized message) is raised after the replies to what came before it;
    a stream that ends early cancels what is still running."""
    pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(window)

    async def read() -> None:
        try:
            async for request in requests:
                await pending.put(asyncio.create_task(answer(request)))
        finally:
            await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (task := await pending.get()) is not None:
            yield await task
        await reader
    finally:
        reader.cancel()
        while not pending.empty():
            task = pending.get_nowait()
            if task is not None:
                task.cancel()
