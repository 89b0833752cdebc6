"""Builds and runs the tlserve gRPC server.

`create_server(settings)` opens the stores, binds the gRPC and metrics ports and
wires servicers and interceptors, without starting anything, so a test can
bind port 0 and read back `server.grpc_port`. `TLServeServer.start()` starts
serving and flips health to SERVING; `stop(grace)` flips it to NOT_SERVING,
stops taking calls, gives in-flight calls `grace` seconds, then closes the
stores. `serve(settings)` does all that around SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import tempfile

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tlserve.client.tlserve.v1 import tlserve_pb2, tlserve_pb2_grpc
from tlserve.service import hardware, metrics
from tlserve.service.metrics import gpu as _gpu_collector  # noqa: F401 - registers the GPU collector
from tlserve.service.metrics import http as metrics_http
from tlserve.service.metrics import store as metrics_store
from tlserve.service.api import kserve
from tlserve.service.api.auth import AuthInterceptor
from tlserve.service.api.interceptors import ErrorInterceptor, MessageSizeInterceptor, ObserveInterceptor
from tlserve.service.auth import TokenTable
from tlserve.service.api.servicer import ServerState, TLServeServicer
from tlserve.service.clock import now
from tlserve.service.config import Settings, is_loopback, split_address
from tlserve.service.datasets import Datasets
from tlserve.service.errors import ConfigError
from tlserve.service.export.exporter import ExportService
from tlserve.service.profiling.compare import BackboneComparer
from tlserve.service.profiling.profile import ProfileService
from tlserve.service.inference.predictor import InferenceService
from tlserve.service.jobs.runner import JobRunner
from tlserve.service.jobs.control import JobService
from tlserve.service.store import ArtifactStore, MetadataStore
from tlserve.service.store.jobs import JobStore
from tlserve.service.store.models import ModelStore

log = logging.getLogger("tlserve.server")

TLSERVE_SERVICE = tlserve_pb2.DESCRIPTOR.services_by_name["TLServe"].full_name
SERVICE_NAMES = (TLSERVE_SERVICE, kserve.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)

# gRPC core reads no message bigger than this multiple of max_receive_message_bytes;
# between the setting and the cap, MessageSizeInterceptor refuses with a message that
# names the call and the setting (gRPC's own refusal names neither).
CORE_RECEIVE_CAP_FACTOR = 2


class Readiness:
    """Whether the server takes traffic: the health service's SERVING, as the KServe
    ServerReady RPC reports it."""

    serving = False


class TLServeServer:
    def __init__(
        self,
        settings: Settings,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        grpc_port: int,
        metrics_server: metrics_http.MetricsServer,
        metadata: MetadataStore,
        artifacts: ArtifactStore,
        runner: JobRunner,
        inference: InferenceService,
        readiness: Readiness,
        tokens: TokenTable | None = None,
        home_lock: HomeLock | None = None,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self._home_lock = home_lock
        self.grpc_port = grpc_port
        self.metrics_port = metrics_server.port
        self.metadata = metadata
        self.artifacts = artifacts
        self._server = server
        self._health = health_servicer
        self._metrics_server = metrics_server
        self._runner = runner
        self._inference = inference
        self._readiness = readiness
        self._stopped = False

    @property
    def grpc_address(self) -> str:
        host, _ = split_address(self.settings.grpc_address)
        return f"{host}:{self.grpc_port}"

    @property
    def metrics_address(self) -> str:
        return self._metrics_server.address

    async def start(self) -> None:
        await self._runner.start(on_dead=self._runner_died)
        await self._server.start()
        for name in ("", TLSERVE_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._readiness.serving = True
        if not self._runner.healthy:  # it died before SERVING was set: its report came too early
            await self._runner_died()
        if self.settings.ready_file is not None:
            _write_atomically(
                self.settings.ready_file,
                json.dumps({"grpc_address": self.grpc_address, "metrics_address": self.metrics_address, "pid": os.getpid()}),
            )
        log.info(
            "tlserve serving",
            extra={
                "fields": {
                    "grpc_address": self.grpc_address,
                    "metrics_address": self.metrics_address,
                    "home": str(self.settings.home),
                    "version": hardware.versions()["tlserve"],
                }
            },
        )

    async def _runner_died(self) -> None:
        """The job runner stopped supervising, so queued jobs would never start:
        NOT_SERVING makes the probes fail and the orchestrator restart the server
        (which resumes the jobs)."""
        self._readiness.serving = False
        for name in ("", TLSERVE_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING first (load balancers stop routing), then no new
        calls, then in-flight calls get `grace` seconds before being cancelled."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("draining", extra={"fields": {"grace_seconds": grace}})
        self._readiness.serving = False
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self._inference.close()
        # Training workers stop too; their jobs resume from the last checkpoint at the next start.
        await self._runner.stop()
        self._metrics_server.stop()
        metrics_store.STORE.detach(self.metadata)
        self.metadata.close()
        if self._home_lock is not None:
            self._home_lock.release()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def create_server(settings: Settings) -> TLServeServer:
    """Opens the stores and binds the ports; raises ConfigError if a port can't be bound,
    or a tokens or certificate file is unusable."""
    settings.check_security()
    tokens = TokenTable.load(settings.auth_tokens_file) if settings.auth_tokens_file is not None else None
    credentials = _server_credentials(settings)
    # Before anything is read or cleaned up: a second server on this home would
    # re-queue the first one's running jobs and delete its uploads in flight.
    home_lock = HomeLock.acquire(settings.home)
    try:
        return await _create_server(settings, tokens, credentials, home_lock)
    except BaseException:
        home_lock.release()
        raise


async def _create_server(settings: Settings, tokens: TokenTable | None, credentials: grpc.ServerCredentials | None,
                         home_lock: HomeLock) -> TLServeServer:
    _empty_scratch(settings)
    metadata = MetadataStore(settings.database_path)
    artifacts = ArtifactStore(settings.artifacts_dir)
    removed = artifacts.remove_stale_temps()
    if removed:
        log.warning("removed partial artifacts left by a crash", extra={"fields": {"count": removed}})

    server = grpc.aio.server(
        interceptors=[
            ObserveInterceptor(metrics.GRPC),
            # Inside Observe, so refused calls are counted and logged with their code.
            *([AuthInterceptor(tokens)] if tokens is not None else []),
            ErrorInterceptor(),
            MessageSizeInterceptor(
                settings.max_receive_message_bytes, "--max-receive-message-bytes / TLSERVE_MAX_RECEIVE_MESSAGE_BYTES"
            ),
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes * CORE_RECEIVE_CAP_FACTOR),
            ("grpc.max_send_message_length", settings.max_send_message_bytes),
            # Without this, a second server on the same port binds silently and
            # steals half the connections.
            ("grpc.so_reuseport", 0),
        ],
    )
    start_time = now()
    jobs = JobStore(metadata)
    models = ModelStore(metadata, artifacts)
    datasets = Datasets(settings, metadata)
    datasets.remove_leftovers()  # uploads a crash interrupted; only the server does this, never a worker
    runner = JobRunner(settings, jobs)
    inference = InferenceService(settings, models, artifacts)
    state = ServerState(
        settings=settings,
        start_time=start_time,
        datasets=datasets,
        jobs=JobService(settings, jobs, datasets, models, artifacts, runner),
        models=models,
        exports=ExportService(settings, models, artifacts),
        inference=inference,
        profiles=ProfileService(settings, models, artifacts, inference.choose_variant),
        compare=BackboneComparer(settings, datasets),
    )
    tlserve_pb2_grpc.add_TLServeServicer_to_server(TLServeServicer(state), server)
    health_servicer = health.aio.HealthServicer()
    readiness = Readiness()
    kserve.add_to_server(
        kserve.KServeServicer(
            inference, models, server_name="tlserve", server_version=hardware.versions()["tlserve"],
            is_ready=lambda: readiness.serving, max_batch_size=settings.max_batch_size,
            batch_delay_seconds=settings.batch_delay_seconds,
        ),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", TLSERVE_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(SERVICE_NAMES, server)

    grpc_port, core_log = _bind(server, settings.grpc_address, credentials)
    if grpc_port == 0:
        metadata.close()
        reason = _BIND_REASON.search(core_log)
        raise ConfigError(
            f"cannot listen for gRPC on {settings.grpc_address}: "
            f"{reason.group(1) if reason else 'the address is in use or not local'} "
            "(set --grpc-address or TLSERVE_GRPC_ADDRESS)"
        )
    try:
        metrics_server = metrics_http.MetricsServer(
            settings.metrics_address,
            tls=metrics_http.TLSFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            if settings.metrics_tls else None,
            tokens=tokens if settings.metrics_auth else None,
        )
    except OSError as e:
        metadata.close()
        raise ConfigError(
            f"cannot listen for metrics on {settings.metrics_address}: {e.strerror or e} "
            "(set --metrics-address or TLSERVE_METRICS_ADDRESS)"
        ) from None
    metrics.BUILD_INFO.labels(version=hardware.versions()["tlserve"], torch_version=hardware.versions()["torch"]).set(1)
    # Models, profiles and jobs are read from the store at each scrape (detached in `stop`).
    metrics_store.STORE.attach(metadata, models, jobs)
    if tokens is None:
        # Loopback: this machine's users only, the development default. Elsewhere --insecure was asked for.
        log.log(logging.INFO if is_loopback(settings.grpc_address) else logging.WARNING,
                "no --auth-tokens-file: every call is allowed to whoever reaches the port",
                extra={"fields": {"grpc_address": settings.grpc_address}})
    elif credentials is None and not is_loopback(settings.grpc_address):
        log.warning("bearer tokens travel in clear text: give --tls-cert-file and --tls-key-file",
                    extra={"fields": {"grpc_address": settings.grpc_address}})
    return TLServeServer(settings, server, health_servicer, grpc_port, metrics_server, metadata, artifacts, runner,
                         inference, readiness, tokens, home_lock)


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains within the grace period."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(
        concurrent.futures.ThreadPoolExecutor(settings.executor_threads, thread_name_prefix="tlserve-worker")
    )
    server = await create_server(settings)
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    if server.tokens is not None:
        # A rotated Secret or an edited file takes effect without a restart.
        loop.add_signal_handler(signal.SIGHUP, server.tokens.reload)
    await server.start()
    await stop_requested.wait()
    await server.stop()


# gRPC core explains a failed bind only in its own stderr log, e.g.
# "... (Error in bind for address '[::ffff:127.0.0.1]:42397': Address already in use)".
_BIND_REASON = re.compile(r"Error in bind for address '[^']*': ([^)\n]+)")


def _empty_scratch(settings: Settings) -> None:
    """Removes what a crashed server left in the scratch directory (only this server,
    holding the home's lock, writes there) and sends every library's temporary files
    there too, this process's and its children's: nothing is written outside the home."""
    scratch = settings.scratch_dir
    scratch.mkdir(parents=True, exist_ok=True)
    for leftover in scratch.iterdir():
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch.resolve())


class HomeLock:
    """An exclusive lock on HOME/server.lock for as long as a server uses that home.

    The SQLite store serves one server on one host: two servers on one home would
    both run a job and each clean the other's uploads away. flock is released by
    the kernel when the process dies, however it dies, so a crash leaves no stale
    lock; the file keeps the holder's pid for the refusal message. The descriptor
    is not inherited by job workers (Python opens files close-on-exec)."""

    def __init__(self, fd: int, path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, home) -> HomeLock:
        path = home / "server.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"another tlserve server (pid {holder}) is using the home {home}: one server per home "
                "(set --home or TLSERVE_HOME)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _read_pem(path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {flag} {path}: {e.strerror or e}") from None


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mutual with a client CA) from the settings' PEM files; None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    chain = _read_pem(settings.tls_cert_file, "--tls-cert-file")
    key = _read_pem(settings.tls_key_file, "--tls-key-file")
    client_ca = _read_pem(settings.tls_client_ca_file, "--tls-client-ca-file") if settings.tls_client_ca_file else None
    for text, flag in ((chain, "--tls-cert-file"), (key, "--tls-key-file"), (client_ca, "--tls-client-ca-file")):
        if text is not None and b"-----BEGIN " not in text:
            raise ConfigError(f"{flag} is not a PEM file")
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> tuple[int, str]:
    """Binds `address`; returns the port (0 on failure) and what gRPC core logged.

    The core writes bind errors straight to file descriptor 2; they are caught
    here so that a failed start prints one clear line, not a core log dump.
    """
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return port, captured.read().decode(errors="replace")


def _write_atomically(path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    os.replace(temp, path)
