"""Writes the synchronous client, client/_client.py, from the asyncio one, client/_aio.py.

The two clients are the same methods with the same keywords, requests, docstrings
and error handling; they differ only in `async`/`await` and in the asyncio types
they name. The asyncio file is the source and this script removes the difference
(the way httpcore and elasticsearch-py keep their sync and async clients as one):

    .venv/bin/python scripts/gen_sync_client.py           # rewrite client/_client.py
    .venv/bin/python scripts/gen_sync_client.py --check   # exit 1 if it is out of date

`make sync-client` runs the first; the test suite runs the second.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "client" / "_aio.py"
TARGET = ROOT / "client" / "_client.py"

DOCSTRING = '''"""The synchronous tlserve client, `Client`: one typed method per RPC of tlserve.v1.TLServe.

A backend service creates one `Client` per server address and shares it across
threads (a gRPC channel is thread-safe):

    with Client("tlserve:50051") as tl:
        job = tl.fine_tune(dataset="flowers", model_name="flowers", backbone="resnet18")
        for event in tl.watch_job(job.id):
            print(event.epoch, event.val_accuracy)

Methods take friendly keywords, build the request with the helpers in `_common`,
and return the generated proto messages. Unary calls carry the client's deadline
unless given `timeout=`; streaming calls have none unless given one. Every
grpc.RpcError comes out as a `TLServeError`.

Generated from `_aio.py` by scripts/gen_sync_client.py (`make sync-client`): edit
that file, not this one.
"""'''

# (pattern, replacement), applied in order to every line after the module docstring.
RULES: list[tuple[str, str]] = [
    (r"^import asyncio\n", ""),
    (r"^import grpc\.aio\n", ""),
    (r"await asyncio\.to_thread\(([\w.]+), ", r"\1("),  # run inline: no event loop to keep free
    (r"\basyncio\.sleep\(", "time.sleep("),
    (r"\basync def ", "def "),
    (r"\basync for ", "for "),
    (r"\basync with ", "with "),
    (r"\bawait ", ""),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"\bAsyncResponseStream\b", "ResponseStream"),
    (r"\bAsyncClient\b", "Client"),
    (r"\bAsyncIterable\b", "Iterable"),
    (r"\bgrpc\.aio\.", "grpc."),
    (r"\basync iterators?\b", lambda m: m.group(0).removeprefix("async ")),
    (r"\bcoroutines?\b", lambda m: "method" + ("s" if m.group(0).endswith("s") else "")),
    # `X | X` left by a rename (Iterable[...] | AsyncIterable[...]): one of them.
    (r"(\w[\w.]*\[[\w.]+\]) \| \1(?![\w.\[])", r"\1"),
]


def _dedupe_import(line: str) -> str:
    """`from m import A, A, B` (two names that a rename made one) -> `from m import A, B`."""
    match = re.fullmatch(r"(from \S+ import )(.+)\n", line)
    if not match:
        return line
    names = list(dict.fromkeys(name.strip() for name in match.group(2).split(",")))
    return match.group(1) + ", ".join(names) + "\n"

CLASS_DOC = (
    '    """Asyncio client of one tlserve server: every method a coroutine (server streams\n'
    "    are async iterators) over a grpc.aio channel, created inside the event loop that\n"
    "    uses it.",
    '    """Synchronous client of one tlserve server, safe to share across threads.',
)


def generate(source: str) -> str:
    end = source.index('"""', 3) + 3  # the module docstring
    body = source[end:]
    if CLASS_DOC[0] not in body:
        raise SystemExit(f"{SOURCE.name}: the class docstring changed; update CLASS_DOC in {Path(__file__).name}")
    body = body.replace(*CLASS_DOC)
    lines = []
    for line in body.splitlines(keepends=True):
        for pattern, replacement in RULES:
            line = re.sub(pattern, replacement, line)
        lines.append(_dedupe_import(line))
    out = DOCSTRING + "".join(lines)
    for left in ("async ", "await ", "asyncio", "Async", "aio"):
        if left in out.replace("_aio.py", ""):
            raise SystemExit(f"{TARGET.name} would still say {left!r}: add a rule to {Path(__file__).name}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if client/_client.py is not what the source gives")
    args = parser.parse_args()
    wanted = generate(SOURCE.read_text())
    if args.check:
        if TARGET.read_text() != wanted:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run `make sync-client`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
