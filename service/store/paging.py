"""Page tokens for List calls: opaque to clients, an offset inside.

An offset is enough for lists ordered newest first that grow at the front
only between two calls of one listing; the token carries a marker so a
token from another list or a hand-made one is refused clearly.
"""

from __future__ import annotations

import base64

from service.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


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


def page(kind: str, rows: list, requested_size: int, token: str) -> tuple[list, str]:
    """Slices `rows` (the whole ordered list) into one page and the next token."""
    size, offset = page_size(requested_size), decode(kind, token)
    chunk = rows[offset : offset + size]
    next_token = encode(kind, offset + size) if offset + size < len(rows) else ""
    return chunk, next_token
