"""`Datasets`: the domain object of the dataset API: uploads and registrations
begun and published, datasets listed, read and deleted (with their rows in the
metadata store and their files under HOME/datasets)."""

from __future__ import annotations

import os
import pathlib
import re
import stat
import time
import uuid
from collections.abc import Callable

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.config import Settings
from tlserve.service.datasets.common import (
    _ACTIVE_JOB_STATES,
    _ID_PATTERN,
    ID_PREFIX,
    MANIFEST_FILE,
    UPLOADS_DIR,
    SplitConfig,
    _is_junk,
    _remove,
    validate_name,
)
from tlserve.service.datasets.ingest import _ingest, _Ingested
from tlserve.service.datasets.layout import plan_layout
from tlserve.service.datasets.upload import Upload
from tlserve.service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tlserve.service.manifest import SPLITS, Manifest
from tlserve.service.store.datasets import DatasetStore
from tlserve.service.store.metadata import MetadataStore

# --- The domain object -------------------------------------------------------------------


class Datasets:
    """Datasets: upload, register, get, list, delete, and the manifest for training."""

    def __init__(self, settings: Settings, store: MetadataStore) -> None:
        self.settings = settings
        self.store = store
        self.records = DatasetStore(store)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)

    @property
    def uploads_dir(self) -> pathlib.Path:
        return self.settings.datasets_dir / UPLOADS_DIR

    def dataset_dir(self, dataset_id: str) -> pathlib.Path:
        return self.settings.datasets_dir.resolve() / dataset_id

    def manifest_path(self, dataset_id: str) -> pathlib.Path:
        return self.dataset_dir(dataset_id) / MANIFEST_FILE

    def remove_leftovers(self) -> int:
        """Removes what a crash left: upload temporaries and dataset folders with no
        row. Call once at server start-up, never while uploads are running (a job
        worker process must not call it). Returns how many entries were removed."""
        removed = 0
        for path in self.uploads_dir.iterdir():
            _remove(path)
            removed += 1
        known = self.records.ids()
        for path in self.settings.datasets_dir.iterdir():
            if _ID_PATTERN.fullmatch(path.name) and path.name not in known:
                _remove(path)
                removed += 1
        return removed

    # -- create --

    def begin_upload(self, meta: pb.UploadDatasetMetadata) -> Upload:
        validate_name(meta.name, "metadata.name")
        if meta.format not in pb.ArchiveFormat.values():
            raise InvalidArgument(f"metadata.format {meta.format} is not an ArchiveFormat value")
        limit = self.settings.max_upload_bytes
        if meta.size_bytes < 0:
            raise InvalidArgument(f"metadata.size_bytes must be >= 0 (0: unknown), got {meta.size_bytes}")
        if meta.size_bytes > limit:
            raise InvalidArgument(
                f"metadata.size_bytes {meta.size_bytes} is over the server's max_upload_bytes {limit} "
                "(TLSERVE_MAX_UPLOAD_BYTES); upload a smaller dataset"
            )
        if meta.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", meta.sha256):
            raise InvalidArgument("metadata.sha256 must be 64 hex digits (the archive's sha256) or empty")
        options = SplitConfig.from_proto(meta.split, "metadata.split")
        self._check_name_free(meta.name)
        return Upload(self, meta, options)

    def register(self, name: str, path: str, split: pb.SplitOptions) -> pb.Dataset:
        """Registers a directory under the data root; its files stay where they are."""
        validate_name(name)
        options = SplitConfig.from_proto(split)
        target = self._resolve_registered(path)
        self._check_name_free(name)
        files, dirs, ignored = self._walk(target)
        layout = plan_layout(files, dirs)
        read_root = target / layout.prefix if layout.prefix else target
        ingested = _ingest(read_root, layout, options, self.settings, extra_ignored=ignored)
        dataset_id = self._new_id()
        staging = self.uploads_dir / f"{dataset_id}.staging"
        try:
            staging.mkdir()
            return self._publish(dataset_id, name, path, ingested, manifest_root=read_root, staging=staging)
        except BaseException:
            _remove(staging)
            raise

    def _resolve_registered(self, path: str) -> pathlib.Path:
        if not path:
            raise InvalidArgument("path is empty; give a directory relative to the server's data root")
        pure = pathlib.PurePosixPath(path)
        if pure.is_absolute() or os.path.isabs(path):
            raise InvalidArgument(f"path {path!r} is absolute; give a directory relative to the server's data root")
        if ".." in pure.parts:
            raise InvalidArgument(f"path {path!r} contains '..'; give a directory inside the server's data root")
        root = self.settings.resolved_data_root
        if not root.is_dir():
            raise FailedPrecondition(
                "the server has no data root directory; the operator must create it or set TLSERVE_DATA_ROOT"
            )
        root = root.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise InvalidArgument(f"path {path!r} leads outside the server's data root (through a symbolic link)")
        if not target.exists():
            raise NotFound(f"directory {path!r} not found under the server's data root (TLSERVE_DATA_ROOT)")
        if not target.is_dir():
            raise InvalidArgument(f"path {path!r} is not a directory; give the dataset's folder")
        return target

    def _walk(self, target: pathlib.Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
        """Relative paths of regular files and directories under `target`; symbolic
        links are not followed (reported as ignored), nor are special files read."""
        files, dirs, ignored = [], [], []
        limit = self.settings.max_dataset_files
        for dirpath, dirnames, filenames in os.walk(target, followlinks=False):
            base = pathlib.Path(dirpath)
            rel_base = base.relative_to(target).as_posix()
            rel = (lambda n: n) if rel_base == "." else (lambda n: f"{rel_base}/{n}")
            keep = []
            for d in sorted(dirnames):
                if _is_junk(d):
                    continue
                if (base / d).is_symlink():
                    ignored.append((rel(d) + "/", "symbolic link; not followed"))
                    continue
                keep.append(d)
                dirs.append(rel(d))
            dirnames[:] = keep
            for f in filenames:
                if _is_junk(f):
                    continue
                try:
                    mode = os.lstat(base / f).st_mode
                except OSError as e:  # vanished or unreadable since the listing
                    ignored.append((rel(f), f"cannot be read: {e.strerror or e}"))
                    continue
                if stat.S_ISLNK(mode):
                    ignored.append((rel(f), "symbolic link; not followed"))
                elif not stat.S_ISREG(mode):
                    ignored.append((rel(f), "not a regular file"))
                else:
                    files.append(rel(f))
            if len(files) + len(dirs) > limit:
                raise InvalidArgument(
                    f"the directory has more than {limit} entries, the server's max_dataset_files "
                    "(TLSERVE_MAX_DATASET_FILES); register a smaller dataset"
                )
        return files, dirs, ignored

    def _new_id(self) -> str:
        while True:
            dataset_id = ID_PREFIX + uuid.uuid4().hex[:8]
            if not self.records.exists(dataset_id) and not (self.settings.datasets_dir / dataset_id).exists():
                return dataset_id

    def _check_name_free(self, name: str) -> None:
        taken = self.records.id_named(name)
        if taken:
            raise AlreadyExists(f"a dataset named {name!r} exists already ({taken}); choose another name "
                                "or delete it first")

    def _publish(self, dataset_id: str, name: str, source: str, ingested: _Ingested, *,
                 manifest_root: pathlib.Path, staging: pathlib.Path,
                 before_commit: Callable[[], None] = lambda: None) -> pb.Dataset:
        """Manifest into the staging folder, staging → HOME/datasets/<id>, then the row.
        If the row cannot be written the folder is removed again."""
        now = time.time()
        dataset = pb.Dataset()
        dataset.CopyFrom(ingested.dataset)
        dataset.id, dataset.name, dataset.source = dataset_id, name, source
        dataset.create_time.FromNanoseconds(int(now * 1e9))
        manifest = Manifest(
            id=dataset_id, name=name, root=manifest_root, class_names=tuple(ingested.class_names),
            splits={s: tuple(ingested.splits[s]) for s in SPLITS}, made_splits=ingested.made_splits,
        )
        final = self.dataset_dir(dataset_id)
        manifest.save(staging / MANIFEST_FILE)
        os.replace(staging, final)
        try:
            self.records.insert(dataset, now, f"{self.settings.datasets_dir.name}/{dataset_id}", before_commit)
        except BaseException:
            _remove(final)
            raise
        return dataset

    # -- read --

    def get(self, dataset: str) -> pb.Dataset:
        return self.records.get(dataset)

    def list(self, page_size: int, page_token: str) -> tuple[list[pb.Dataset], str]:
        """Newest first; pages neither skip nor repeat when datasets are added in between."""
        return self.records.list(page_size, page_token)

    def manifest(self, dataset: str) -> Manifest:
        return Manifest.load(self.manifest_path(self.records.get(dataset).id))

    # -- delete --

    def delete(self, dataset: str) -> None:
        """Removes the row, then HOME/datasets/<id> (uploaded files and the manifest;
        a registered directory under the data root is never touched)."""
        dataset_id = self.records.delete(dataset, _ACTIVE_JOB_STATES)
        _remove(self.dataset_dir(dataset_id))
