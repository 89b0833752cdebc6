"""The artifact store: model files under TLSERVE_HOME/artifacts, published atomically.

A writer gets a temporary file next to the destination; only when it closes
without error is the file flushed to disk (fsync), renamed over the final name
and the directory entry flushed too. A reader therefore sees either no file or
the whole file, never half of one, even across a crash or a kill -9. Leftover
temporary files from a crash are removed at start-up.

    with store.writer("models/flowers/3/model.onnx") as f:
        f.write(data)
    info = store.info("models/flowers/3/model.onnx")   # size_bytes, sha256
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from tlserve.service.errors import InvalidArgument, NotFound

TEMP_PREFIX = ".tmp-"
_READ_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ArtifactInfo:
    path: pathlib.Path
    size_bytes: int
    sha256: str


class _HashingWriter:
    """A write-only file that keeps a running sha256 and byte count."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size_bytes = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size_bytes += len(data)
        return self._file.write(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class ArtifactStore:
    def __init__(self, root: pathlib.Path | str) -> None:
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, relpath: str | os.PathLike[str]) -> pathlib.Path:
        """The absolute path of an artifact; refuses anything outside the root."""
        rel = pathlib.PurePosixPath(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise InvalidArgument(f"artifact path must be relative and inside the store, got {str(relpath)!r}")
        return self.root.joinpath(*rel.parts)

    @contextlib.contextmanager
    def writer(self, relpath: str | os.PathLike[str]) -> Iterator[_HashingWriter]:
        """Yields a file to write; publishes it atomically when the block succeeds."""
        final = self.path(relpath)
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{final.name}")
        try:
            with open(temp, "xb") as raw:
                out = _HashingWriter(raw)
                yield out
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)

    def publish_file(self, source: pathlib.Path, relpath: str | os.PathLike[str]) -> ArtifactInfo:
        """Copies a file made elsewhere (for example by an exporter) into the store."""
        with self.writer(relpath) as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, _READ_CHUNK_BYTES)
        return ArtifactInfo(self.path(relpath), out.size_bytes, out.sha256)

    def publish_bytes(self, data: bytes, relpath: str | os.PathLike[str]) -> ArtifactInfo:
        with self.writer(relpath) as out:
            out.write(data)
        return ArtifactInfo(self.path(relpath), out.size_bytes, out.sha256)

    def info(self, relpath: str | os.PathLike[str]) -> ArtifactInfo:
        path = self.path(relpath)
        if not path.is_file():
            raise NotFound(f"artifact {relpath} does not exist")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK_BYTES):
                digest.update(chunk)
        return ArtifactInfo(path, path.stat().st_size, digest.hexdigest())

    def delete(self, relpath: str | os.PathLike[str]) -> None:
        """Removes a file or a whole directory of artifacts; absent is fine."""
        path = self.path(relpath)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def remove_stale_temps(self) -> int:
        """Deletes temporary files a crashed writer left behind; returns how many."""
        stale = [p for p in self.root.rglob(f"{TEMP_PREFIX}*") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


def _fsync_dir(directory: pathlib.Path) -> None:
    # The rename is only durable once the directory entry is on disk too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
