"""Transport-independent pieces shared by the sync and asyncio clients.

`Client` (`_client.py`) and `AsyncClient` (`_aio.py`) differ only in how they
invoke a call; everything else lives here: the `TLServeError` raised for every
failed RPC, the channel options and retry service config, model-ref and
weights-spec parsing, option-name → enum mappings, request builders, archive
preparation and chunking for `UploadDataset`, and the receiver that writes a
`DownloadModel` stream to disk and verifies it. Nothing here imports grpc.aio,
torch or numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

SERVICE = "tlserve.v1.TLServe"
HEALTH_SERVICE = "grpc.health.v1.Health"

# Read-only RPCs: safe to send again after UNAVAILABLE (the request never
# reached a server, or the server went away before acting on it). Anything
# that creates, deletes or starts work is absent on purpose.
IDEMPOTENT_METHODS = (
    "GetServerInfo",
    "ListBackbones",
    "GetDataset",
    "ListDatasets",
    "GetJob",
    "ListJobs",
    "WatchJob",
    "ListModels",
    "GetModel",
    "DownloadModel",
    "Predict",
)

# Called with (bytes done, bytes in all); the total is 0 when unknown.
ProgressFn = Callable[[int, int], None]


# --- Errors -------------------------------------------------------------------


class TLServeError(Exception):
    """A failed tlserve call: gRPC status code, server message and method.

    `method` is the full gRPC method name, e.g. "/tlserve.v1.TLServe/GetModel".
    Also raised for client-side failures of a stream (a download whose size or
    sha256 does not match), with the status code that fits.
    """

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.method = method


def error_from_rpc(err: grpc.RpcError, method: str) -> TLServeError:
    """Converts a grpc.RpcError (sync or aio) into a TLServeError."""
    # Sync errors are also grpc.Call objects; a bare RpcError has neither method.
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return TLServeError(code, details or str(err) or code.name, method)


def method_path(name: str, service: str = SERVICE) -> str:
    return f"/{service}/{name}"


# --- Channel ------------------------------------------------------------------


def retry_service_config(max_attempts: int = 4) -> dict[str, Any]:
    """The channel's service config: UNAVAILABLE retried on read-only methods only."""
    names = [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS]
    names.append({"service": HEALTH_SERVICE, "method": "Check"})
    return {
        "methodConfig": [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    # 0.1 s, 0.2 s, 0.4 s (± jitter): about 0.7 s in all
                    # before a caller sees UNAVAILABLE.
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(retry_service_config())),
        # A call is only retried while its request still fits the retry
        # buffer (default 256 KiB), so a Predict carrying a few images would
        # silently lose its retries; the request is held whole in memory by
        # the caller anyway.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]



# --- Security: TLS and bearer tokens --------------------------------------------


@dataclass(frozen=True)
class TLS:
    """How to reach a server over TLS: `ca_file` (PEM) is the CA that signed the
    server's certificate (None: the system's roots); `cert_file` and `key_file`
    (PEM) are this client's certificate and key where the server asks for one
    (mutual TLS)."""

    ca_file: str | os.PathLike | None = None
    cert_file: str | os.PathLike | None = None
    key_file: str | os.PathLike | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate and its key go together: give both or neither")

        def read(path: str | os.PathLike | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


def channel_security(
    token: str | None, tls: TLS | None, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """The channel credentials and per-call metadata for a token and TLS settings.

    Over TLS the token rides as call credentials (gRPC attaches it to every call
    and never sends it in clear text); without TLS it can only be plain metadata,
    which is fine on loopback and readable by anyone on the path elsewhere."""
    if token is not None and not token.strip():
        raise ValueError("the token is empty")
    if tls is None:
        extra = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        return None, metadata + extra
    credentials = tls.credentials()
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token.strip())
        )
    return credentials, metadata

# --- Names → enums -------------------------------------------------------------


def enum_choices(enum: EnumTypeWrapper, prefix: str) -> dict[str, int]:
    """Lower-case option names of an enum, e.g. {"fp32": 1, "fp16": 2, "int8": 3}.

    Derived from the enum itself so the names are never typed twice; the
    UNSPECIFIED member (the server's default) is left out.
    """
    return {
        name[len(prefix):].lower(): value
        for name, value in enum.items()
        if name.startswith(prefix) and not name.endswith("_UNSPECIFIED")
    }


ENUM_PREFIXES: dict[EnumTypeWrapper, str] = {
    pb.Strategy: "STRATEGY_",
    pb.Precision: "PRECISION_",
    pb.Runtime: "RUNTIME_",
    pb.InputFormat: "INPUT_FORMAT_",
    pb.Optimizer: "OPTIMIZER_",
    pb.ArtifactFormat: "ARTIFACT_FORMAT_",
    pb.JobState: "JOB_STATE_",
    pb.ArchiveFormat: "ARCHIVE_FORMAT_",
    pb.JobPhase: "JOB_PHASE_",
    pb.Split: "SPLIT_",
    pb.DatasetWarning.Kind: "KIND_",
}


def enum_value(enum: EnumTypeWrapper, value: str | int | None) -> int:
    """An enum value from an int, a short name ("fp16") or a full name ("PRECISION_FP16")."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    prefix = ENUM_PREFIXES[enum]
    choices = enum_choices(enum, prefix)
    key = value.lower()
    if key in choices:
        return choices[key]
    if value.upper() in enum.keys():
        return enum.Value(value.upper())
    raise ValueError(f"unknown {enum.DESCRIPTOR.name} {value!r}; expected one of {', '.join(choices)}")


def enum_label(enum: EnumTypeWrapper, value: int) -> str:
    """Short lower-case name of an enum value ("fp16"), or "default" for UNSPECIFIED."""
    name = enum.Name(value) if value in enum.values() else str(value)
    prefix = ENUM_PREFIXES.get(enum, "")
    if name.endswith("_UNSPECIFIED"):
        return "default"
    return name[len(prefix):].lower() if name.startswith(prefix) else name.lower()


# --- Model refs and weights ------------------------------------------------------

_MODEL_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_model_ref(text: str) -> pb.ModelRef:
    """Parses "name", "name:3" or "name:latest" into a ModelRef (version 0 = latest)."""
    name, sep, version = text.strip().rpartition(":")
    if not sep:
        name, version = version, ""
    if not _MODEL_NAME.match(name):
        raise ValueError(
            f"bad model reference {text!r}: expected NAME or NAME:VERSION, "
            "the name made of letters, digits, '-', '_' and '.'"
        )
    if sep and not version:
        raise ValueError(f"bad model reference {text!r}: nothing after ':' (use NAME or NAME:VERSION)")
    if version in ("", "latest"):
        return pb.ModelRef(name=name, version=0)
    if not version.isdigit():
        raise ValueError(f"bad model reference {text!r}: version must be a number or 'latest'")
    return pb.ModelRef(name=name, version=int(version))


def request_iterator(requests: Any) -> Any:
    """A client stream's requests as the stubs take them: an async iterable as it is
    (grpc.aio reads it), anything else as an iterator (the sync stub calls next() on it)."""
    return requests if hasattr(requests, "__aiter__") else iter(requests)


def model_ref(model: str | pb.ModelRef, version: int | None = None) -> pb.ModelRef:
    """A ModelRef from a string or a ModelRef; `version`, when given, overrides."""
    ref = parse_model_ref(model) if isinstance(model, str) else pb.ModelRef(name=model.name, version=model.version)
    if version is not None:
        if version < 0:
            raise ValueError(f"model version must be >= 0, got {version}")
        ref.version = version
    return ref


def format_model_ref(ref: pb.ModelRef) -> str:
    return f"{ref.name}:{ref.version}" if ref.version else ref.name


def parse_weights(spec: str) -> pb.WeightsSource:
    """Parses a weights spec: "DEFAULT", a weights enum member, "none",
    "file:PATH" (under the server's data root) or "model:NAME[:V]"."""
    kind, sep, rest = spec.partition(":")
    if spec.lower() in ("none", "scratch"):
        return pb.WeightsSource(scratch=pb.WeightsSource.Scratch())
    if sep and kind == "file":
        if not rest:
            raise ValueError("weights 'file:' needs a path relative to the server's data root")
        return pb.WeightsSource(file=rest)
    if sep and kind == "model":
        return pb.WeightsSource(model=parse_model_ref(rest))
    if not spec or sep:
        raise ValueError(
            f"bad weights {spec!r}: expected DEFAULT, a weights name such as "
            "ResNet18_Weights.IMAGENET1K_V1, none, file:PATH or model:NAME[:V]"
        )
    return pb.WeightsSource(torchvision=spec)


# --- Request builders ------------------------------------------------------------


def image_input(image: bytes | pb.ImageInput | pb.Tensor) -> pb.ImageInput:
    if isinstance(image, pb.ImageInput):
        return image
    if isinstance(image, pb.Tensor):
        return pb.ImageInput(tensor=image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.ImageInput(encoded=bytes(image))
    raise TypeError(f"an image is encoded bytes, a pb.ImageInput or a pb.Tensor, not {type(image).__name__}")


def predict_request(
    model: str | pb.ModelRef,
    images: Iterable[bytes | pb.ImageInput | pb.Tensor],
    *,
    version: int | None = None,
    top_k: int = 0,
    runtime: str | int | None = None,
    precision: str | int | None = None,
    return_logits: bool = False,
    return_embeddings: bool = False,
    request_id: str = "",
) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model_ref(model, version),
        runtime=enum_value(pb.Runtime, runtime),
        precision=enum_value(pb.Precision, precision),
        images=[image_input(i) for i in images],
        top_k=top_k,
        return_logits=return_logits,
        return_embeddings=return_embeddings,
        request_id=request_id,
    )


# Keywords of fine_tune that land in TrainingOptions rather than the request.
_TRAINING_KEYWORDS = {"epochs", "batch_size", "learning_rate", "optimizer"}


def fine_tune_request(request: pb.FineTuneRequest | None = None, **kw: Any) -> pb.FineTuneRequest:
    """A FineTuneRequest from a full request or from keywords, never both.

    Keywords: the request's own fields, `weights` as a spec string or a
    WeightsSource, `strategy`/`optimizer` as names or enum values, and the
    TrainingOptions shortcuts epochs, batch_size, learning_rate, optimizer and
    patience (early stopping's).
    """
    given = {k: v for k, v in kw.items() if v is not None}
    if request is not None:
        if given:
            raise TypeError(f"fine_tune takes a request or keywords, not both (got {', '.join(sorted(given))})")
        return request
    missing = [k for k in ("dataset", "model_name", "backbone") if not given.get(k)]
    if missing:
        raise TypeError(f"fine_tune needs {', '.join(missing)}")
    req = pb.FineTuneRequest()
    training = given.pop("training", None)
    if training is not None:
        req.training.CopyFrom(training)
    for key in _TRAINING_KEYWORDS & given.keys():
        value = given.pop(key)
        setattr(req.training, key, enum_value(pb.Optimizer, value) if key == "optimizer" else value)
    if "patience" in given:
        req.training.early_stopping.SetInParent()  # present even at 0 (no early stopping)
        req.training.early_stopping.patience = given.pop("patience")
    weights = given.pop("weights", None)
    if weights is not None:
        req.weights.CopyFrom(parse_weights(weights) if isinstance(weights, str) else weights)
    if "strategy" in given:
        req.strategy = enum_value(pb.Strategy, given.pop("strategy"))
    if "augmentation" in given:
        req.augmentation.CopyFrom(given.pop("augmentation"))
    labels = given.pop("labels", None)
    if labels:
        req.labels.update(labels)
    for key, value in given.items():
        setattr(req, key, value)  # AttributeError names an unknown keyword
    return req


# --- Dataset upload ---------------------------------------------------------------

# Suffix → archive format; longest suffixes first so ".tar.gz" wins over ".gz".
_ARCHIVE_SUFFIXES = {
    ".tar.gz": pb.ARCHIVE_FORMAT_TAR_GZ,
    ".tgz": pb.ARCHIVE_FORMAT_TAR_GZ,
    ".tar": pb.ARCHIVE_FORMAT_TAR,
    ".zip": pb.ARCHIVE_FORMAT_ZIP,
}
# Image formats are compressed already: deflating them costs CPU for nothing.
_STORED_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".zip", ".gz"}
# Zip entries carry a timestamp; a fixed one makes the archive (and its
# sha256) depend on the files' contents only.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def archive_format(path: str) -> int:
    lower = path.lower()
    for suffix, fmt in _ARCHIVE_SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: expected a directory or a .zip, .tar, .tar.gz or .tgz archive")


def zip_directory(root: str, dest: str) -> int:
    """Zips the regular files under `root` into `dest`, paths relative to
    `root`, in sorted order; symlinks are skipped, never followed. Returns the
    number of files written."""
    count = 0
    with zipfile.ZipFile(dest, "w") as zf:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                arcname = os.path.relpath(full, root).replace(os.sep, "/")
                info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
                info.external_attr = 0o644 << 16  # rw-r--r--, whatever the local mode
                stored = os.path.splitext(name)[1].lower() in _STORED_SUFFIXES
                info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                with open(full, "rb") as src, zf.open(info, "w") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                count += 1
    if count == 0:
        os.unlink(dest)
        raise ValueError(f"{root}: no files to upload")
    return count


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PreparedArchive:
    """An archive ready to stream: the file, its format, size and sha256.

    `temporary` is set when the archive was built from a directory; call
    `cleanup()` when the upload is over.
    """

    path: str
    format: int
    size_bytes: int
    sha256: str
    temporary: bool = False

    def cleanup(self) -> None:
        if self.temporary:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def prepare_archive(path: str | os.PathLike[str]) -> PreparedArchive:
    """Checks an archive file, or zips a directory into a temporary file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        fd, tmp = tempfile.mkstemp(prefix="tlserve-upload-", suffix=".zip")
        os.close(fd)
        try:
            zip_directory(path, tmp)
            return PreparedArchive(tmp, pb.ARCHIVE_FORMAT_ZIP, os.path.getsize(tmp), sha256_file(tmp), True)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    fmt = archive_format(path)
    return PreparedArchive(path, fmt, os.path.getsize(path), sha256_file(path))


def upload_requests(
    archive: PreparedArchive,
    name: str,
    split: pb.SplitOptions | None = None,
    chunk_size: int = 1 << 20,
    progress: ProgressFn | None = None,
) -> Iterator[pb.UploadDatasetRequest]:
    """The UploadDataset stream: metadata first, then the archive in chunks."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    yield pb.UploadDatasetRequest(
        metadata=pb.UploadDatasetMetadata(
            name=name,
            format=archive.format,
            size_bytes=archive.size_bytes,
            sha256=archive.sha256,
            split=split,
        )
    )
    done = 0
    if progress:
        progress(0, archive.size_bytes)
    with open(archive.path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield pb.UploadDatasetRequest(chunk=chunk)
            done += len(chunk)
            if progress:
                progress(done, archive.size_bytes)


# --- Model download ----------------------------------------------------------------


class ArtifactReceiver:
    """Writes a DownloadModel stream to `dest_path + ".part"`, checks its size
    and sha256 against the artifact metadata, then renames it into place.

    Feed it each response with `feed()`, then call `finish()`; on any failure
    call `abort()`, which removes the partial file.
    """

    def __init__(self, dest_path: str | os.PathLike[str], method: str, progress: ProgressFn | None = None) -> None:
        self.dest_path = os.fspath(dest_path)
        self.part_path = self.dest_path + ".part"
        self.method = method
        self.progress = progress
        self.artifact: pb.ModelArtifact | None = None
        self._file: Any = None
        self._digest = hashlib.sha256()
        self._done = 0

    def _fail(self, message: str) -> TLServeError:
        return TLServeError(grpc.StatusCode.DATA_LOSS, message, self.method)

    def feed(self, response: pb.DownloadModelResponse) -> None:
        kind = response.WhichOneof("payload")
        if self.artifact is None:
            if kind != "artifact":
                raise self._fail("download stream did not start with the artifact metadata")
            self.artifact = response.artifact
            self._file = open(self.part_path, "wb")
            if self.progress:
                self.progress(0, self.artifact.size_bytes)
            return
        if kind != "chunk":
            raise self._fail("download stream sent the artifact metadata twice")
        self._file.write(response.chunk)
        self._digest.update(response.chunk)
        self._done += len(response.chunk)
        if self.artifact.size_bytes and self._done > self.artifact.size_bytes:
            raise self._fail(f"received more than the announced {self.artifact.size_bytes} bytes")
        if self.progress:
            self.progress(self._done, self.artifact.size_bytes)

    def finish(self) -> pb.ModelArtifact:
        if self.artifact is None:
            raise self._fail("download stream ended before the artifact metadata")
        self._file.close()
        if self._done != self.artifact.size_bytes:
            raise self._fail(f"received {self._done} bytes, expected {self.artifact.size_bytes}")
        if self.artifact.sha256 and self._digest.hexdigest() != self.artifact.sha256.lower():
            raise self._fail(f"sha256 mismatch: got {self._digest.hexdigest()}, expected {self.artifact.sha256}")
        os.replace(self.part_path, self.dest_path)  # atomic: readers see all or nothing
        return self.artifact

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        try:
            os.unlink(self.part_path)
        except FileNotFoundError:
            pass


def download_request(
    model: str | pb.ModelRef,
    *,
    version: int | None = None,
    format: str | int | None = None,
    precision: str | int | None = None,
    input_format: str | int | None = None,
    chunk_size_bytes: int = 0,
) -> pb.DownloadModelRequest:
    return pb.DownloadModelRequest(
        model=model_ref(model, version),
        format=enum_value(pb.ArtifactFormat, format),
        precision=enum_value(pb.Precision, precision),
        input_format=enum_value(pb.InputFormat, input_format),
        chunk_size_bytes=chunk_size_bytes,
    )


def export_request(
    model: str | pb.ModelRef,
    *,
    version: int | None = None,
    precision: str | int | None = None,
    input_format: str | int | None = None,
    include_embedding: bool = False,
    opset: int = 0,
    max_accuracy_drop_points: float | None = None,
    calibration: pb.CalibrationOptions | None = None,
) -> pb.ExportModelRequest:
    req = pb.ExportModelRequest(
        model=model_ref(model, version),
        precision=enum_value(pb.Precision, precision),
        input_format=enum_value(pb.InputFormat, input_format),
        include_embedding=include_embedding,
        opset=opset,
        calibration=calibration,
    )
    if max_accuracy_drop_points is not None:
        req.max_accuracy_drop_points = max_accuracy_drop_points
    return req


def profile_request(
    model: str | pb.ModelRef,
    *,
    version: int | None = None,
    variants: Iterable[pb.Variant | tuple[str | int, str | int]] = (),
    batch_size: int = 0,
    iterations: int = 0,
    measure_accuracy: bool = False,
) -> pb.ProfileModelRequest:
    """Variants are pb.Variant or (runtime, precision) pairs such as ("onnx", "fp16")."""
    built = [
        v if isinstance(v, pb.Variant)
        else pb.Variant(runtime=enum_value(pb.Runtime, v[0]), precision=enum_value(pb.Precision, v[1]))
        for v in variants
    ]
    return pb.ProfileModelRequest(
        model=model_ref(model, version),
        variants=built,
        batch_size=batch_size,
        iterations=iterations,
        measure_accuracy=measure_accuracy,
    )


def split_options(split: pb.SplitOptions | Mapping[str, Any] | None) -> pb.SplitOptions | None:
    if split is None or isinstance(split, pb.SplitOptions):
        return split
    return pb.SplitOptions(**split)
