"""The metrics HTTP endpoint on its own port."""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry

from service.config import split_address


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """PEM files of an HTTPS endpoint; with `client_ca`, clients must present a certificate it signed."""

    cert: pathlib.Path | None
    key: pathlib.Path | None
    client_ca: pathlib.Path | None = None


class MetricsServer:
    """The metrics HTTP endpoint on its own port; `port` is the one bound. With
    `tls`, HTTPS (and mutual TLS when it names a client CA)."""

    def __init__(
        self, address: str, registry: CollectorRegistry = prometheus_client.REGISTRY, tls: TLSFiles | None = None
    ) -> None:
        host, port = split_address(address)
        host = host.strip("[]")
        self._httpd: WSGIServer
        self._thread: threading.Thread
        https = {}
        if tls is not None:
            https = {"certfile": str(tls.cert), "keyfile": str(tls.key),
                     "client_cafile": str(tls.client_ca) if tls.client_ca else None,
                     "client_auth_required": tls.client_ca is not None}
        self.scheme = "https" if tls is not None else "http"
        self._httpd, self._thread = prometheus_client.start_http_server(port, addr=host, registry=registry, **https)
        self.host = host
        self.port: int = self._httpd.server_port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
