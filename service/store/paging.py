"""Page tokens for List calls: opaque to clients, an offset inside.

An offset is enough for lists ordered newest first that grow at the front
only between two calls of one listing; the token carries a marker so a
token from another list or a hand-made one is refused clearly.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import TypeVar

from tlserve.service.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A page also ends before its records pass this many bytes (it always holds at least
# one): gRPC clients receive at most 4 MB by default, and a page of 1,000 jobs with
# their labels could pass that.
PAGE_BYTES = 3 * 1024 * 1024

T = TypeVar("T")


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode(kind: str, offset: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{offset}".encode()).decode()


def decode(kind: str, token: str) -> int:
    if not token:
        return 0
    try:
        prefix, offset = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if prefix != kind or int(offset) < 0:
            raise ValueError
        return int(offset)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not one this server returned for this list; start with an empty token") from None


def fit(items: Sequence[T], size_of: Callable[[T], int], budget: int = PAGE_BYTES) -> int:
    """How many of `items`, from the first, fit in `budget` bytes; at least one."""
    total = 0
    for i, item in enumerate(items):
        total += size_of(item)
        if total > budget and i > 0:
            return i
    return len(items)


def page(kind: str, rows: Sequence[T], requested_size: int, token: str,
         size_of: Callable[[T], int] | None = None) -> tuple[list[T], str]:
    """Slices `rows` (the whole ordered list) into one page and the next token; with
    `size_of` (a row's bytes in the answer), the page also ends at PAGE_BYTES."""
    size, offset = page_size(requested_size), decode(kind, token)
    chunk = list(rows[offset : offset + size])
    if size_of is not None:
        chunk = chunk[: fit(chunk, size_of)]
    end = offset + len(chunk)
    return chunk, encode(kind, end) if end < len(rows) else ""
