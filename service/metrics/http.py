"""The metrics HTTP endpoint on its own port."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry

from service.config import split_address


class MetricsServer:
    """The metrics HTTP endpoint on its own port; `port` is the one bound."""

    def __init__(self, address: str, registry: CollectorRegistry = prometheus_client.REGISTRY) -> None:
        host, port = split_address(address)
        host = host.strip("[]")
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
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
