"""tlserve: a transfer-learning service and its client, under one top-level name.

- `tlserve.client`: the SDK a backend service installs (`Client`, `AsyncClient`,
  `TLServeError`, the generated messages as `pb`) and the `tlserve` command line;
- `tlserve.service`: the server (the `[server]` extra), `python -m tlserve.service`.

`tlserve.Client`, `tlserve.AsyncClient`, `tlserve.TLS` and `tlserve.TLServeError`
are the client's, imported on first use so that `import tlserve` stays light.

In the wheel the two live in this package (the source folders `client/` and
`service/` are mapped onto `tlserve.client` and `tlserve.service`). In a source
checkout they stay beside this folder, where the path below finds them, so the
tree runs uninstalled too (`python -m tlserve.service` from its root).
"""

from __future__ import annotations

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent
if not (_HERE / "client").is_dir() and (_CHECKOUT / "pyproject.toml").is_file() and (
    _CHECKOUT / "service" / "__main__.py"
).is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 - a package's own __path__

_CLIENT_NAMES = ("Client", "AsyncClient", "TLS", "TLServeError", "pb", "__version__")


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        from tlserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'tlserve' has no attribute {name!r}")


__all__ = list(_CLIENT_NAMES)
