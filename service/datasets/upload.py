"""UploadDataset: an `Upload` receives the chunks into a file under HOME, then
`finish` checks the archive, extracts it and ingests it as RegisterDataset does,
keeping only the images that pass their checks."""

from __future__ import annotations

import hashlib
import pathlib
import threading
from typing import TYPE_CHECKING

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.datasets.archive import _ARCHIVE_ERRORS, _Archive, _UnpackLimit, sniff_format
from tlserve.service.datasets.common import _FORMAT_NAMES, SplitConfig, _is_junk, _remove
from tlserve.service.datasets.ingest import _ingest, _Ingested
from tlserve.service.datasets.layout import plan_layout
from tlserve.service.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from tlserve.service.datasets.catalog import Datasets


# --- Uploads ---------------------------------------------------------------------------


class Upload:
    """One UploadDataset call: bytes to a temporary file, then `finish` or `abort`.

    `write` is cheap (append and hash) and may run on the event loop; `finish` is
    blocking. On any failure everything the upload made is removed.
    """

    def __init__(self, datasets: Datasets, meta: pb.UploadDatasetMetadata, options: SplitConfig) -> None:
        self._datasets = datasets
        self._meta = meta
        self._options = options
        self.id = datasets._new_id()
        uploads = datasets.uploads_dir
        self._part = uploads / f"{self.id}.part"
        self._staging = uploads / f"{self.id}.staging"
        self._file = open(self._part, "xb")
        self._digest = hashlib.sha256()
        self._received = 0
        self._lock = threading.Lock()
        self._state = "open"  # open → finishing → done | aborted
        self._cancelled = False

    @property
    def received_bytes(self) -> int:
        return self._received

    def write(self, chunk: bytes) -> None:
        with self._lock:
            if self._state != "open":
                raise FailedPrecondition(f"upload {self.id} is {self._state}; start a new UploadDataset call")
            limit, declared = self._datasets.settings.max_upload_bytes, self._meta.size_bytes
            received = self._received + len(chunk)
            if received > limit:
                self._abort_locked()
                raise InvalidArgument(
                    f"the archive is over the server's max_upload_bytes {limit} (TLSERVE_MAX_UPLOAD_BYTES); "
                    "upload a smaller dataset"
                )
            if declared and received > declared:
                self._abort_locked()
                raise InvalidArgument(
                    f"received more than metadata.size_bytes {declared} bytes; send the archive's exact size or 0"
                )
            self._file.write(chunk)
            self._digest.update(chunk)
            self._received = received

    def abort(self) -> None:
        with self._lock:
            if self._state == "finishing":
                # finish() runs in another thread; it checks this flag and cleans up.
                self._cancelled = True
                return
            self._abort_locked()

    def _abort_locked(self) -> None:
        if self._state in ("done", "aborted"):
            return
        self._state = "aborted"
        self._file.close()
        _remove(self._part)
        _remove(self._staging)

    def _check_cancelled(self) -> None:
        if self._cancelled:
            raise FailedPrecondition(f"upload {self.id} was cancelled by the client")

    def finish(self) -> pb.Dataset:
        with self._lock:
            if self._state != "open":
                raise FailedPrecondition(f"upload {self.id} is {self._state}; start a new UploadDataset call")
            self._state = "finishing"
        try:
            dataset = self._finish()
        except BaseException:
            with self._lock:
                self._state = "finishing-failed"
                self._abort_locked()
            raise
        with self._lock:
            self._state = "done"
        return dataset

    def _finish(self) -> pb.Dataset:
        settings = self._datasets.settings
        self._file.close()
        meta = self._meta
        if self._received == 0:
            raise InvalidArgument(
                "the upload has no archive bytes; send the archive in chunk messages after the metadata"
            )
        if meta.size_bytes and self._received != meta.size_bytes:
            raise InvalidArgument(
                f"received {self._received} bytes but metadata.size_bytes is {meta.size_bytes}; "
                "the upload was cut short or the size is wrong"
            )
        if meta.sha256 and self._digest.hexdigest() != meta.sha256.lower():
            raise InvalidArgument(
                f"sha256 mismatch: the archive received hashes to {self._digest.hexdigest()}, "
                f"metadata.sha256 says {meta.sha256.lower()}; the upload was corrupted, send it again"
            )
        fmt = self._resolve_format()
        archive = _Archive(
            self._part, fmt, settings.max_dataset_files, _UnpackLimit(self._received, settings.max_upload_bytes)
        )
        fmt_name = _FORMAT_NAMES[fmt]
        try:
            entries = archive.scan()
            self._check_cancelled()
            files = [f for f in entries.files if not any(_is_junk(p) for p in f.split("/"))]
            dirs = [d for d in entries.dirs if not any(_is_junk(p) for p in d.split("/"))]
            layout = plan_layout(files, dirs)
            files_dir = self._staging / "files"
            files_dir.mkdir(parents=True)
            # Only the files that can become images are written, already without the wrapping folder.
            archive.extract(entries, {item.display: item.rel for item in layout.items}, files_dir)
        except _ARCHIVE_ERRORS as e:
            raise InvalidArgument(
                f"the {fmt_name} archive is truncated or malformed ({type(e).__name__}: {e}); "
                "check the file and upload it again"
            ) from None
        _remove(self._part)  # the extracted files are all we need now; free the disk
        self._check_cancelled()
        ingested = _ingest(files_dir, layout, self._options, settings)
        _remove_unlisted(files_dir, ingested)
        self._check_cancelled()
        return self._datasets._publish(
            self.id, meta.name, "upload", ingested,
            manifest_root=self._datasets.dataset_dir(self.id) / "files",
            staging=self._staging, before_commit=self._check_cancelled,
        )

    def _resolve_format(self) -> int:
        declared = self._meta.format
        sniffed = sniff_format(self._part)
        if declared == pb.ARCHIVE_FORMAT_UNSPECIFIED:
            if sniffed == pb.ARCHIVE_FORMAT_UNSPECIFIED:
                raise InvalidArgument(
                    "the upload is not a zip, tar or tar.gz archive (its first bytes match none); "
                    "set metadata.format or send one of those"
                )
            return sniffed
        # A plain tar without the ustar magic (old v7 format) sniffs as unknown: trust the caller.
        if sniffed not in (declared, pb.ARCHIVE_FORMAT_UNSPECIFIED):
            raise InvalidArgument(
                f"metadata.format is {_FORMAT_NAMES[declared]} but the archive's first bytes say "
                f"{_FORMAT_NAMES[sniffed]}; set the right format or leave it unspecified"
            )
        return declared


def _remove_unlisted(files_dir: pathlib.Path, ingested: _Ingested) -> None:
    """Deletes the extracted files the manifest does not list (those that failed
    their image check: not an image, corrupt), so that the published dataset holds
    only images that decode; their CORRUPT warnings are what the caller sees."""
    listed = {rel for samples in ingested.splits.values() for rel, _ in samples}
    for path in files_dir.rglob("*"):
        if path.is_file() and path.relative_to(files_dir).as_posix() not in listed:
            path.unlink()
