"""The metrics HTTP endpoint on its own port: plain HTTP, or HTTPS (mutual with a
client CA), optionally asking for a bearer token with the `metrics` role.

prometheus_client's own `start_http_server` wraps the listening socket, so each
TLS handshake runs in the thread that accepts connections: one client that
connects and never speaks would stop the endpoint for everyone. Here the handshake
runs in the connection's own thread, with a timeout.
"""

from __future__ import annotations

import dataclasses
import pathlib
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry

from tlserve.service.auth import Role, TokenTable
from tlserve.service.config import split_address

# Seconds a connection may take for its handshake and request before it is dropped.
CONNECTION_TIMEOUT_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """PEM files of an HTTPS endpoint; with `client_ca`, clients must present a certificate it signed."""

    cert: pathlib.Path | None
    key: pathlib.Path | None
    client_ca: pathlib.Path | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile=str(self.cert), keyfile=str(self.key))
        if self.client_ca is not None:
            context.load_verify_locations(cafile=str(self.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def get_request(self):
        connection, address = super().get_request()
        connection.settimeout(CONNECTION_TIMEOUT_SECONDS)
        if self.tls is not None:  # the handshake happens on first use, in the connection's thread
            connection = self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # scrapes every few seconds: no access log
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ssl.SSLError, OSError):  # a failed handshake or a client gone: that connection only
            pass


def _needs_token(app, tokens: TokenTable):
    """`app` behind `authorization: Bearer <token>` with the metrics role (admin has it too)."""

    def guarded(environ, start_response):
        principal = tokens.principal(environ.get("HTTP_AUTHORIZATION", ""))
        if principal is None or not principal.allows(Role.METRICS):
            status = "401 Unauthorized" if principal is None else "403 Forbidden"
            body = (b"a bearer token with the metrics role is needed\n" if principal is None
                    else b"this token lacks the metrics role\n")
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("WWW-Authenticate", 'Bearer realm="tlserve metrics"')])
            return [body]
        return app(environ, start_response)

    return guarded


class MetricsServer:
    """The metrics HTTP endpoint on its own port; `port` is the one bound. With
    `tls`, HTTPS (and mutual TLS when it names a client CA); with `tokens`, each
    scrape needs a bearer token with the metrics role."""

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry = prometheus_client.REGISTRY,
        tls: TLSFiles | None = None,
        tokens: TokenTable | None = None,
    ) -> None:
        host, port = split_address(address)
        host = host.strip("[]")
        app = prometheus_client.make_wsgi_app(registry)
        if tokens is not None:
            app = _needs_token(app, tokens)

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        Server.tls = tls.context() if tls is not None else None
        self._httpd: WSGIServer = make_server(host, port, app, Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.host = host
        self.port: int = self._httpd.server_port
        self.scheme = "https" if tls is not None else "http"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
