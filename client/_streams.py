"""The server-stream wrappers of the two clients: each turns grpc.RpcError into
`TLServeError` and lets the caller end the stream early. They differ in how a
stream is read (a sync call is an iterator; a grpc.aio call is read until EOF),
which is all the clients' stream handling there is."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from tlserve.client import _common as c

T = TypeVar("T")


class ResponseStream(Generic[T]):
    """An iterator over a server stream that raises TLServeError; `cancel()` ends it early."""

    def __init__(self, call: Any, method: str) -> None:
        self._call = call
        self._method = method

    def __iter__(self) -> ResponseStream[T]:
        return self

    def __next__(self) -> T:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise c.error_from_rpc(err, self._method) from err

    def cancel(self) -> None:
        self._call.cancel()


class AsyncResponseStream(Generic[T]):
    """An async iterator over a server stream that raises TLServeError; `cancel()` ends it early."""

    def __init__(self, call: Any, method: str) -> None:
        self._call = call
        self._method = method

    def __aiter__(self) -> AsyncResponseStream[T]:
        return self

    async def __anext__(self) -> T:
        try:
            response = await self._call.read()
        except grpc.RpcError as err:
            raise c.error_from_rpc(err, self._method) from err
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return response

    def cancel(self) -> None:
        self._call.cancel()
