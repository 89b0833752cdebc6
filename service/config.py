"""Server settings: one object, read once at start-up from flags and `TLSERVE_*`
environment variables.

Every setting is a field of `Settings`; its flag is `--field-name` and its
environment variable `TLSERVE_FIELD_NAME`. A flag beats the environment, which
beats the default. `Settings.load(argv, environ)` parses, validates and prepares
the home directory, and raises `ConfigError` with one line a person can act on.

    settings = Settings.load(["--grpc-address", "127.0.0.1:0"], os.environ)
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import pathlib
from collections.abc import Mapping, Sequence

from tlserve.service.errors import ConfigError

ENV_PREFIX = "TLSERVE_"
MiB = 1024 * 1024


def _setting(default, help: str, type=str):
    return dataclasses.field(default=default, metadata={"help": help, "type": type})


def _path(value: str) -> pathlib.Path:
    return pathlib.Path(value).expanduser()


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must be >= 0, got {number}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return number


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _choice(*choices: str):
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return parse


def split_address(address: str) -> tuple[str, int]:
    """Splits "host:port" (or "[v6]:port") into host and port; port 0 means any free port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 0..65535, got {address!r}")
    return host, int(port)


def _address(value: str) -> str:
    split_address(value)
    return value


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT listens on this machine only (127.0.0.0/8, ::1, localhost)."""
    host = split_address(address)[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


@dataclasses.dataclass(frozen=True)
class Settings:
    home: pathlib.Path = _setting(
        pathlib.Path("var"), "directory for the database, artifacts, datasets and weights cache", _path
    )
    grpc_address: str = _setting("127.0.0.1:50051", "gRPC listen address HOST:PORT (port 0: any free port)", _address)
    metrics_address: str = _setting(
        "127.0.0.1:9464", "Prometheus metrics HTTP address HOST:PORT (port 0: any free port)", _address
    )
    data_root: pathlib.Path | None = _setting(
        None, "directory that RegisterDataset and weights files may be read from", _path
    )
    max_receive_message_bytes: int = _setting(
        64 * MiB, "largest request message accepted, in bytes (a batch of camera JPEGs fits)", _positive_int
    )
    max_send_message_bytes: int = _setting(64 * MiB, "largest response message sent, in bytes", _positive_int)
    max_upload_bytes: int = _setting(
        4 * 1024 * MiB, "largest dataset archive UploadDataset accepts, in bytes", _positive_int
    )
    max_dataset_files: int = _setting(200_000, "most files one dataset may hold", _positive_int)
    max_image_pixels: int = _setting(
        50_000_000, "largest image accepted, in pixels (width x height); larger ones are refused before decoding",
        _positive_int,
    )
    job_workers: int = _setting(1, "fine-tuning jobs run at once", _positive_int)
    executor_threads: int = _setting(
        max(2, min(8, os.cpu_count() or 2)), "threads for blocking work off the event loop", _positive_int
    )
    grace_seconds: float = _setting(
        10.0, "on SIGTERM/SIGINT, seconds in-flight calls get to finish", _non_negative_float
    )
    inference_threads: int = _setting(
        0, "ONNX Runtime intra-op threads per loaded model (0: ONNX Runtime's default, one per physical core)",
        _non_negative_int,
    )
    cpu_lanes: int = _setting(
        0, "batches of one model on the CPU that run at once, each on one core, under load; fewer requests than "
        "lanes run together on every intra-op thread (0: one per intra-op thread; 1: off, one batch at a time on "
        "every thread)",
        _non_negative_int,
    )
    model_cache_bytes: int = _setting(
        2 * 1024 * MiB, "memory budget for models loaded for prediction; the least recently used are unloaded",
        _positive_int,
    )
    max_batch_size: int = _setting(32, "most images one dynamic batch of a model holds", _positive_int)
    batch_delay_seconds: float = _setting(
        0.002, "on a GPU, how long requests gather while a batch computes before the next starts beside it "
        "(0: at once); an idle model never waits, and on the CPU a batch starts when a core frees",
        _non_negative_float,
    )
    max_queue_size: int = _setting(
        256, "predict requests waiting per model; beyond it Predict answers RESOURCE_EXHAUSTED", _positive_int
    )
    log_level: str = _setting("info", "debug, info, warning or error", _choice("debug", "info", "warning", "error"))
    log_format: str = _setting("json", "json (one object per line) or text", _choice("json", "text"))
    auth_tokens_file: pathlib.Path | None = _setting(
        None, "bearer tokens and their roles, one 'NAME ROLES SECRET' per line (see service/auth.py); reread on "
        "SIGHUP. Without it every call is allowed, which only a loopback address or --insecure permits",
        _path,
    )
    insecure: bool = _setting(
        False, "allow listening on a non-loopback address without --auth-tokens-file (anyone who reaches the "
        "port may upload, train, export and delete)", _bool,
    )
    tls_cert_file: pathlib.Path | None = _setting(
        None, "PEM certificate chain: serve gRPC over TLS (with --tls-key-file)", _path
    )
    tls_key_file: pathlib.Path | None = _setting(None, "PEM private key of --tls-cert-file", _path)
    tls_client_ca_file: pathlib.Path | None = _setting(
        None, "PEM CA bundle: mutual TLS, every client must present a certificate signed by it", _path
    )
    metrics_tls: bool = _setting(
        False, "serve the metrics endpoint over TLS too, with the same certificate (and client CA)", _bool
    )
    metrics_auth: bool = _setting(
        False, "the metrics endpoint asks for a bearer token with the metrics role (or admin) from "
        "--auth-tokens-file, as Prometheus sends with authorization.credentials_file", _bool,
    )
    ready_file: pathlib.Path | None = _setting(
        None, "once serving, write the bound addresses here as JSON (for scripts and tests)", _path
    )

    # Everything lives under `home` (design: nothing is written outside it).
    @property
    def database_path(self) -> pathlib.Path:
        return self.home / "tlserve.db"

    @property
    def artifacts_dir(self) -> pathlib.Path:
        return self.home / "artifacts"

    @property
    def weights_dir(self) -> pathlib.Path:
        return self.home / "weights"

    @property
    def datasets_dir(self) -> pathlib.Path:
        return self.home / "datasets"

    @property
    def checkpoints_dir(self) -> pathlib.Path:
        return self.home / "checkpoints"

    @property
    def scratch_dir(self) -> pathlib.Path:
        """Temporary files (INT8 calibration graphs, libraries' temp files via TMPDIR);
        emptied at each server start, so a crash leaves nothing behind for long."""
        return self.home / "tmp"

    @property
    def resolved_data_root(self) -> pathlib.Path:
        return self.data_root if self.data_root is not None else self.home / "data"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            env = ENV_PREFIX + f.name.upper()
            default = "HOME/data" if f.name == "data_root" else f.default
            flag = {"nargs": "?", "const": "true", "metavar": "BOOL"} if f.metadata["type"] is _bool else {
                "metavar": f.name.split("_")[-1].upper()}
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=None,
                help=f"{f.metadata['help']} [env {env}; default {default}]",
                **flag,
            )

    @classmethod
    def from_namespace(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
        values = {}
        for f in dataclasses.fields(cls):
            env = ENV_PREFIX + f.name.upper()
            raw, source = getattr(args, f.name, None), "--" + f.name.replace("_", "-")
            if raw is None and environ.get(env):
                raw, source = environ[env], env
            if raw is None:
                continue
            try:
                values[f.name] = f.metadata["type"](raw)
            except ValueError as e:
                raise ConfigError(f"{source}: {e}") from None
        settings = cls(**values)
        settings.check_security()
        return settings

    def check_security(self) -> None:
        """Refuses settings that would expose the API unauthenticated or half-configure TLS."""
        if self.auth_tokens_file is None and not self.insecure and not is_loopback(self.grpc_address):
            raise ConfigError(
                f"refusing to listen on {self.grpc_address} without authentication: give --auth-tokens-file "
                "(TLSERVE_AUTH_TOKENS_FILE), or --insecure (TLSERVE_INSECURE=1) to let anyone who reaches the port "
                "call every RPC"
            )
        if self.metrics_auth and self.auth_tokens_file is None:
            raise ConfigError("--metrics-auth needs --auth-tokens-file: the tokens it accepts come from there")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("--tls-cert-file and --tls-key-file go together: give both or neither")
        if self.tls_cert_file is None and (self.tls_client_ca_file is not None or self.metrics_tls):
            given = "--tls-client-ca-file" if self.tls_client_ca_file is not None else "--metrics-tls"
            raise ConfigError(f"{given} needs --tls-cert-file and --tls-key-file")

    @classmethod
    def parse(cls, argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
        """Parses flags and environment (nothing is written: see `load`)."""
        parser = argparse.ArgumentParser(prog="tlserve serve", description="Run the tlserve gRPC server.")
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(list(argv)), os.environ if environ is None else environ)

    @classmethod
    def load(cls, argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
        """Parses flags and environment, then prepares the home directory."""
        settings = cls.parse(argv, environ)
        settings.prepare_home()
        return settings

    def prepare_home(self) -> None:
        """Creates the home layout and proves it is writable, or raises ConfigError."""
        try:
            for directory in (self.home, self.artifacts_dir, self.weights_dir, self.datasets_dir, self.checkpoints_dir,
                              self.scratch_dir):
                directory.mkdir(parents=True, exist_ok=True)
            probe = self.home / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            reason = e.strerror or str(e)
            raise ConfigError(f"home directory {self.home} is not usable: {reason} (set --home or TLSERVE_HOME)") from None
