"""Bearer tokens and their roles: who may call what.

A tokens file holds one token per line, `NAME ROLES SECRET`:

    # name     roles          secret: the token itself, or sha256:<hex of its SHA-256>
    deployer   admin          sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    web        predict        k3Jq0bVx1T0m2m9Yc7s5wA8pLr4eN6dZ
    prometheus metrics,read   sha256:...

Only the SHA-256 of each token is kept in memory, and a presented token is
compared with every stored digest in constant time (`hmac.compare_digest`), so
neither the file's plain tokens nor the comparison's timing tell a caller what a
token is. `tlserve token` (or `python -m tlserve.service.auth`) makes a token and its
line. The roles:

- `admin`: everything (datasets, fine-tuning, export, download, delete, profiling);
- `predict`: Predict, PredictStream and KServe inference, and what `read` allows;
- `read`: the read-only calls (Get*, List*, WatchJob, server and model metadata);
- `metrics`: the Prometheus endpoint, where it asks for a token.

`TokenTable.load(path)` raises ConfigError with the line at fault; `reload()`
keeps the table it had when the file turns bad, so a SIGHUP after a typo does
not lock everyone out.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import logging
import pathlib
import re
import secrets
import sys
import threading

from tlserve.service.errors import ConfigError

log = logging.getLogger("tlserve.auth")

# A token must be hard to guess: at least 128 bits when it is base64 or hex.
MIN_TOKEN_CHARS = 24
_DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what fits a header


class Role(enum.Enum):
    ADMIN = "admin"
    PREDICT = "predict"
    READ = "read"
    METRICS = "metrics"


# What each role also allows: admin may do anything, predict may also read.
IMPLIES: dict[Role, frozenset[Role]] = {
    Role.ADMIN: frozenset(Role),
    Role.PREDICT: frozenset({Role.PREDICT, Role.READ}),
    Role.READ: frozenset({Role.READ}),
    Role.METRICS: frozenset({Role.METRICS}),
}


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a token belongs to: the file's name for it and what it may do."""

    name: str
    roles: frozenset[Role]

    def allows(self, role: Role) -> bool:
        return any(role in IMPLIES[r] for r in self.roles)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str = "tokens file") -> list[tuple[bytes, Principal]]:
    """The (digest, principal) pairs of a tokens file; ConfigError names the line at fault."""
    entries: list[tuple[bytes, Principal]] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        fields = line.split()
        if len(fields) != 3:
            raise ConfigError(f"{where}: expected NAME ROLES SECRET, got {len(fields)} field(s)")
        name, roles_text, secret = fields
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: name {name!r} must be 1-63 letters, digits, '.', '_', '@' or '-'")
        if name in names:
            raise ConfigError(f"{where}: name {name!r} appears twice")
        try:
            roles = frozenset(Role(r) for r in roles_text.split(",") if r)
        except ValueError:
            raise ConfigError(
                f"{where}: roles {roles_text!r}: each must be one of {', '.join(r.value for r in Role)}"
            ) from None
        if not roles:
            raise ConfigError(f"{where}: no role given")
        hashed = _DIGEST.fullmatch(secret)
        if hashed:
            value = bytes.fromhex(hashed.group(1))
        elif secret.startswith("sha256:"):
            raise ConfigError(f"{where}: a sha256: secret is 64 hex digits")
        elif len(secret) < MIN_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(secret):
            raise ConfigError(
                f"{where}: the token of {name!r} must be at least {MIN_TOKEN_CHARS} printable characters "
                "(make one with `tlserve token`)"
            )
        else:
            value = digest(secret)
        if value in digests:
            raise ConfigError(f"{where}: the token of {name!r} is another name's token too")
        names.add(name)
        digests.add(value)
        entries.append((value, Principal(name, roles)))
    if not entries:
        raise ConfigError(f"{source}: holds no token, so no call could ever be allowed")
    return entries


class TokenTable:
    """The tokens a server accepts; thread-safe, reloadable."""

    def __init__(self, path: pathlib.Path, entries: list[tuple[bytes, Principal]]) -> None:
        self.path = path
        self._entries = entries
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: pathlib.Path) -> TokenTable:
        return cls(path, cls._read(path))

    @staticmethod
    def _read(path: pathlib.Path) -> list[tuple[bytes, Principal]]:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(
                f"cannot read the tokens file {path}: {e.strerror or e} "
                "(set --auth-tokens-file or TLSERVE_AUTH_TOKENS_FILE)"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"the tokens file {path} is not text") from None
        return parse_tokens(text, f"tokens file {path}")

    def reload(self) -> bool:
        """Rereads the file; on any error logs it and keeps the tokens it had."""
        try:
            entries = self._read(self.path)
        except ConfigError as e:
            log.error("tokens file not reloaded; the previous tokens stay in force",
                      extra={"fields": {"error": str(e)}})
            return False
        with self._lock:
            self._entries = entries
        log.info("tokens file reloaded", extra={"fields": {"path": str(self.path), "tokens": len(entries)}})
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def principal(self, authorization: str) -> Principal | None:
        """Whose `Bearer <token>` header value this is; None for no bearer token or an
        unknown one."""
        token = bearer_token(authorization)
        return self.authenticate(token) if token else None

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose token this is, or None. Every stored digest is compared,
        in constant time each, whether or not an earlier one matched."""
        presented = digest(token)
        with self._lock:
            entries = self._entries
        found = None
        for stored, principal in entries:
            if hmac.compare_digest(stored, presented):
                found = principal
        return found


def bearer_token(authorization: str) -> str | None:
    """The token of an `authorization: Bearer <token>` value, or None."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def token_line(name: str, roles: str, token: str) -> str:
    """The tokens-file line for `token`, holding only its digest."""
    line = f"{name} {roles} sha256:{hashlib.sha256(token.encode()).hexdigest()}"
    parse_tokens(line)  # refuses a bad name or role here rather than at the server's start
    return line


def main(argv: list[str] | None = None) -> int:
    """`python -m tlserve.service.auth NAME ROLES`: prints a new token, then its tokens-file line."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="tlserve token",
        description="Make a bearer token: prints the token (give it to the caller) and the line for the server's "
        "tokens file (it holds only the token's SHA-256).",
    )
    parser.add_argument("name", help="who the token is for, e.g. web-frontend")
    parser.add_argument("roles", help="comma-separated: " + ", ".join(r.value for r in Role))
    args = parser.parse_args(argv)
    token = new_token()
    try:
        line = token_line(args.name, args.roles, token)
    except ConfigError as e:
        print(f"tlserve token: error: {str(e).removeprefix('tokens file line 1: ')}", file=sys.stderr)
        return 2
    print(f"token: {token}")
    print(f"tokens file line: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
