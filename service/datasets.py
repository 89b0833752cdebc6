"""Dataset ingestion: uploaded archives and registered directories become validated,
split, manifest-backed datasets that the training engine can read.

Two sources. `Datasets.begin_upload` receives a .zip, .tar or .tar.gz stream
(`Upload.write` per chunk, `Upload.finish` at the end): the archive's entry list is
checked first (paths, entry types, counts, declared sizes), and only then are the
image files extracted into HOME/datasets/<id>/files. `Datasets.register` points at a
directory under the server's data root and leaves the files where they are. Both
then share one pipeline: work out the layout (one folder per class, optionally under
train/ val/ test/ folders, a single wrapping folder stripped), check every image
(sha256, header size against `max_image_pixels` before any decoding, then a decode),
split stratified by class with a seed where split folders are missing, and publish:
the manifest (`service.manifest`) is written first, then the `datasets` row, so a row
always has a manifest. A rejected dataset leaves no row, no files and no temporary.

    datasets = Datasets(settings, store)
    upload = datasets.begin_upload(metadata)
    for chunk in chunks:
        upload.write(chunk)
    dataset = upload.finish()                       # blocking: run it in a thread
    datasets.register("flowers", "flowers/v2", pb.SplitOptions(seed=1))

Decisions worth knowing (see the constants below for the numbers):
- Split sizes per class: val and test each get round-half-up(n × fraction), at
  least 1 while the class can spare it, and train always keeps at least 1 image;
  when a class is too small, test gives way first, then val. 5 images → 3/1/1,
  3 → 1/1/1, 2 → 1/1/0, 1 → 1/0/0. Identical files (same sha256) in one class are
  kept in the same split, so generated splits never leak a duplicate.
- Zip/tar bombs: the declared uncompressed sizes of all entries together may not
  exceed `UNPACKED_SIZE_FACTOR` × max_upload_bytes, single tar header reads are
  capped, and extraction counts the bytes it really writes.
- Warnings: at most `WARNINGS_PER_KIND` per kind, then one summary warning of
  that kind whose `detail` gives the number left out.
- Hidden entries (a path component starting with '.') and macOS `__MACOSX/`
  folders are skipped silently; other non-image files are skipped with an
  IGNORED warning.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import gzip
import hashlib
import json
import math
import os
import pathlib
import random
import re
import shutil
import sqlite3
import stat
import statistics
import struct
import tarfile
import threading
import time
import uuid
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable

from PIL import Image

from client.tlserve.v1 import tlserve_pb2 as pb
from service.config import Settings
from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from service.store import paging
from service.manifest import SPLITS, Manifest
from service.store.metadata import MetadataStore

ID_PREFIX = "ds-"
_ID_PATTERN = re.compile(r"ds-[0-9a-f]{8}")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# Only these PIL plugins may parse user files: an unrestricted Image.open would
# also try formats such as EPS, whose load() runs Ghostscript.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
DEFAULT_FRACTION = 0.15
WARNINGS_PER_KIND = 100
# Image formats are compressed already, so a real image archive unpacks to about its
# own size; 4x leaves room for BMPs and still refuses a bomb long before the disk fills.
UNPACKED_SIZE_FACTOR = 4
# tarfile reads a pax or GNU long-name header body in one read(); a gzip of zeros can
# declare gigabytes of it. No honest header comes near 16 MiB.
_MAX_TAR_READ_BYTES = 16 << 20
_COPY_BYTES = 1 << 20
UPLOADS_DIR = ".uploads"
MANIFEST_FILE = "manifest.json"
# Folder names that mean a split (compared in lower case); common exports use "valid".
_SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_SPLIT_ENUM = {"train": pb.SPLIT_TRAIN, "val": pb.SPLIT_VAL, "test": pb.SPLIT_TEST}
# tlserve.v1.JobState values of jobs that still read their dataset.
_ACTIVE_JOB_STATES = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
_FORMAT_NAMES = {pb.ARCHIVE_FORMAT_ZIP: "zip", pb.ARCHIVE_FORMAT_TAR: "tar", pb.ARCHIVE_FORMAT_TAR_GZ: "tar.gz"}


# --- Names, options, small pure helpers ---------------------------------------------


def validate_name(name: str, field: str = "name") -> None:
    if not _NAME_PATTERN.fullmatch(name or ""):
        raise InvalidArgument(
            f"{field} {name!r} is not a valid dataset name: use 1-64 letters, digits, '.', '_' or '-'"
        )
    if _ID_PATTERN.fullmatch(name):
        # get/delete accept an id or a name; a name shaped like an id would be ambiguous.
        raise InvalidArgument(f"{field} {name!r} looks like a dataset id (ds-xxxxxxxx); choose another name")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    val_fraction: float
    test_fraction: float
    seed: int

    @classmethod
    def from_proto(cls, split: pb.SplitOptions | None, field: str = "split") -> SplitConfig:
        split = split if split is not None else pb.SplitOptions()
        val = split.val_fraction or DEFAULT_FRACTION
        test = split.test_fraction or DEFAULT_FRACTION
        for fname, value in (("val_fraction", val), ("test_fraction", test)):
            if not 0 < value < 1 or math.isnan(value):
                raise InvalidArgument(f"{field}.{fname} must be in (0, 1) (0 means {DEFAULT_FRACTION}), got {value}")
        if val + test >= 1:
            raise InvalidArgument(
                f"{field}.val_fraction + {field}.test_fraction must be below 1 to leave images for training, "
                f"got {val} + {test}"
            )
        return cls(val, test, split.seed)


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) image counts for one class of n images; a fraction of 0
    means that split is not made here. See the module docstring for the rule."""

    def round_half_up(x: float) -> int:
        # 1e-9: 10 × 0.15 is 1.4999999999999998 in binary floating point.
        return math.floor(x + 0.5 + 1e-9)

    val = max(round_half_up(n * val_fraction), 1) if val_fraction > 0 else 0
    test = max(round_half_up(n * test_fraction), 1) if test_fraction > 0 else 0
    # Train keeps at least one image; test gives way before val (val drives early stopping).
    while n - val - test < 1 and test > 0:
        test -= 1
    while n - val - test < 1 and val > 0:
        val -= 1
    return n - val - test, val, test


def _is_junk(component: str) -> bool:
    # Hidden files (.DS_Store, ._AppleDouble, .git) and the macOS resource-fork folder.
    return component.startswith(".") or component == "__MACOSX"


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _not_found(dataset: str) -> str:
    return f"dataset {dataset!r} not found; ListDatasets (tlserve datasets list) shows the datasets there are"


def _disk_error(e: OSError, what: str) -> Exception:
    """Disk full is the server's limit; a name the file system refuses is the archive's fault."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"the server ran out of disk space while {what}; free space or upload less")
    return InvalidArgument(f"{what}: {e.strerror or e}")


# --- Layout: which file is which class and split ------------------------------------


@dataclasses.dataclass
class _Item:
    display: str  # path as the user knows it (inside the archive or the registered directory)
    rel: str  # path relative to the manifest root (the wrapping folder stripped)
    split: str | None  # split folder it came from, None without split folders
    class_name: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    size_bytes: int = 0


@dataclasses.dataclass
class _Layout:
    prefix: str  # wrapping folder(s) stripped, "" or "a/b/"
    split_folders: dict[str, str]  # split → folder name as found; empty: no split folders
    class_names: list[str]  # sorted; index = label
    items: list[_Item]  # files that may be images, not checked yet
    ignored: list[tuple[str, str]]  # (display path, reason)


def _parents(path: str) -> Iterable[str]:
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def plan_layout(files: Iterable[str], dirs: Iterable[str] = ()) -> _Layout:
    """Decides classes and splits from relative POSIX paths alone (nothing is read).

    `files` are regular files, `dirs` directories (empty ones count: an empty class
    folder is a class with no image). Junk entries must be filtered out already.
    """
    files = sorted(files)
    all_dirs = set(dirs)
    for f in files:
        all_dirs.update(_parents(f))

    # Strip wrapping folders: while everything sits in one folder that is not a
    # split folder and holds folders of its own (so a lone class folder is kept).
    prefix = ""
    while True:
        depth = prefix.count("/")
        children = {p.split("/")[depth] for p in (*files, *all_dirs) if p.startswith(prefix) and p != prefix[:-1]}
        if len(children) != 1:
            break
        (only,) = children
        candidate = prefix + only
        has_subdir = any(d.startswith(candidate + "/") for d in all_dirs)
        if candidate not in all_dirs or only.lower() in _SPLIT_FOLDERS or not has_subdir:
            break
        prefix = candidate + "/"

    def strip(p: str) -> str:
        return p[len(prefix):]

    top_dirs = {strip(d) for d in all_dirs if d.startswith(prefix) and "/" not in strip(d) and strip(d)}
    split_folders: dict[str, str] = {}
    for folder in sorted(top_dirs):
        split = _SPLIT_FOLDERS.get(folder.lower())
        if split is None:
            continue
        if split in split_folders:
            raise InvalidArgument(
                f"the dataset has both {split_folders[split]}/ and {folder}/ as {split} split folders; keep one"
            )
        split_folders[split] = folder
    folder_to_split = {folder: split for split, folder in split_folders.items()}

    classes: set[str] = set()
    items: list[_Item] = []
    ignored: list[tuple[str, str]] = []
    if split_folders:
        if "train" not in split_folders:
            found = ", ".join(f + "/" for f in sorted(folder_to_split))
            raise InvalidArgument(
                f"the dataset has split folders ({found}) but no train/ folder; add train/<class>/<image> "
                "or remove the split folders to have tlserve split the data"
            )
        for d in all_dirs:
            parts = strip(d).split("/") if d.startswith(prefix) else []
            if len(parts) >= 2 and parts[0] in folder_to_split:
                classes.add(parts[1])
        for f in files:
            parts = strip(f).split("/")
            if parts[0] not in folder_to_split:
                ignored.append((f, "outside the split folders train/, val/, test/"))
            elif len(parts) == 2:
                ignored.append((f, f"not inside a class folder (expected {parts[0]}/<class>/<image>)"))
            elif not _is_image_name(f):
                ignored.append((f, "not an image (accepted: " + " ".join(sorted(IMAGE_EXTENSIONS)) + ")"))
            else:
                items.append(_Item(f, strip(f), folder_to_split[parts[0]], parts[1]))
    else:
        classes = set(top_dirs)
        for f in files:
            parts = strip(f).split("/")
            if len(parts) == 1:
                ignored.append((f, "not inside a class folder (expected <class>/<image>)"))
            elif not _is_image_name(f):
                ignored.append((f, "not an image (accepted: " + " ".join(sorted(IMAGE_EXTENSIONS)) + ")"))
            else:
                items.append(_Item(f, strip(f), None, parts[0]))

    if len(classes) < 2:
        where = "train/<class>/" if split_folders else "<class>/"
        found = f"found {len(classes)}" + (f" ({', '.join(sorted(classes))})" if classes else "")
        raise InvalidArgument(
            f"a dataset needs at least 2 classes, {found}: put each class's images in its own folder ({where})"
        )
    return _Layout(prefix, split_folders, sorted(classes), items, ignored)


# --- Image checks --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Checked:
    sha256: str = ""
    width: int = 0
    height: int = 0
    size_bytes: int = 0
    problem: str = ""  # set: corrupt or unreadable, skipped
    too_large: str = ""  # set: over the pixel limit, the dataset is refused


def check_image(path: pathlib.Path, max_pixels: int) -> _Checked:
    """Hashes one file and checks it decodes, reading its size from the header
    before any pixel data is decoded. Never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        return _Checked(problem=f"cannot be opened: {e.strerror or e}")
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _Checked(problem="not a regular file")
        digest = hashlib.sha256()
        try:
            while block := f.read(_COPY_BYTES):
                digest.update(block)
        except OSError as e:
            return _Checked(problem=f"cannot be read: {e.strerror or e}")
        sha, size = digest.hexdigest(), st.st_size
        try:
            f.seek(0)
            # Lazy open parses the header only. PIL's own decompression-bomb check runs
            # here too: its error (or its warning, when warnings are errors) means the
            # image is far over any sane limit, so it refuses the dataset like ours does.
            with Image.open(f, formats=_PIL_FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    return _Checked(
                        sha, width, height, size,
                        too_large=f"{width}x{height} = {width * height} pixels",
                    )
                im.verify()  # PNG: every chunk CRC; cheap, no decoding
            f.seek(0)
            with Image.open(f, formats=_PIL_FORMATS) as im:
                # JPEG decodes at 1/8 scale via DCT scaling: a truncated or broken
                # stream still fails, at a fraction of the cost of a full decode.
                im.draft(None, (max(1, width // 8), max(1, height // 8)))
                im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return _Checked(sha, 0, 0, size, too_large=f"refused by the image decoder's bomb check ({e})")
        except Exception as e:  # noqa: BLE001 - any failure of a decoder on user bytes means "corrupt"
            return _Checked(sha, 0, 0, size, problem=f"not a decodable image ({type(e).__name__}: {e})")
    return _Checked(sha, width, height, size)


# --- The shared pipeline: checked layout → splits, warnings, Dataset, manifest --------


class _Warnings:
    """Collects warnings, keeping the first WARNINGS_PER_KIND of each kind."""

    def __init__(self) -> None:
        self._by_kind: dict[int, list[pb.DatasetWarning]] = defaultdict(list)
        self._counts: dict[int, int] = defaultdict(int)

    def add(self, kind: int, path: str, detail: str = "", other_path: str = "") -> None:
        self._counts[kind] += 1
        if len(self._by_kind[kind]) < WARNINGS_PER_KIND:
            self._by_kind[kind].append(pb.DatasetWarning(kind=kind, path=path, other_path=other_path, detail=detail))

    def to_proto(self) -> list[pb.DatasetWarning]:
        out = []
        for kind in sorted(self._by_kind):
            out.extend(self._by_kind[kind])
            left_out = self._counts[kind] - len(self._by_kind[kind])
            if left_out:
                name = pb.DatasetWarning.Kind.Name(kind).removeprefix("KIND_").lower()
                out.append(pb.DatasetWarning(
                    kind=kind,
                    detail=f"{left_out} more {name} warnings not listed ({self._counts[kind]} in all)",
                ))
        return out


@dataclasses.dataclass
class _Ingested:
    dataset: pb.Dataset  # without id, name, create_time, source
    splits: dict[str, list[tuple[str, int]]]
    class_names: list[str]
    made_splits: tuple[str, ...]  # the splits tlserve drew from the training images


def _ingest(read_root: pathlib.Path, layout: _Layout, options: SplitConfig, settings: Settings,
            extra_ignored: Iterable[tuple[str, str]] = ()) -> _Ingested:
    warnings = _Warnings()
    for path, reason in sorted([*layout.ignored, *extra_ignored]):
        warnings.add(pb.DatasetWarning.KIND_IGNORED, path, reason)

    # One thread: measured on 2 cores, a thread pool was slower for 10k 32 px PNGs
    # (2.5 s serial vs 5 s; per-file Python work holds the GIL) and no faster for
    # 384 px JPEGs or PNGs, whose decoding is the cost.
    usable: list[_Item] = []
    for item in layout.items:
        result = check_image(read_root / item.rel, settings.max_image_pixels)
        if result.too_large:
            raise InvalidArgument(
                f"image {item.display} is {result.too_large}, over the server's max_image_pixels "
                f"{settings.max_image_pixels} (TLSERVE_MAX_IMAGE_PIXELS); downscale it or remove it"
            )
        if result.problem:
            warnings.add(pb.DatasetWarning.KIND_CORRUPT, item.display, result.problem)
            continue
        item.sha256, item.width, item.height, item.size_bytes = (
            result.sha256, result.width, result.height, result.size_bytes)
        usable.append(item)

    # Every class needs an image to train on.
    train_source = "train" if layout.split_folders else None
    have = {item.class_name for item in usable if item.split == train_source}
    empty = [c for c in layout.class_names if c not in have]
    if empty:
        where = f"in {layout.split_folders['train']}/" if layout.split_folders else "in its folder"
        names = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise InvalidArgument(
            f"{'class' if len(empty) == 1 else 'classes'} {names} {'has' if len(empty) == 1 else 'have'} "
            f"no usable image {where} (corrupt and non-image files are skipped); add images or remove the folder"
        )

    made = _assign_splits(usable, layout, options)
    label = {name: i for i, name in enumerate(layout.class_names)}

    # Duplicates by content: the first file of a group (train first, then by path) is
    # the reference; a copy in the same split is a duplicate, in another split a leak.
    order = {s: i for i, s in enumerate(SPLITS)}
    groups: dict[str, list[_Item]] = defaultdict(list)
    for item in usable:
        groups[item.sha256].append(item)
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda it: (order[it.split], it.display))
        ref = group[0]
        for item in group[1:]:
            labels = "" if item.class_name == ref.class_name else f"; labelled {item.class_name} and {ref.class_name}"
            if item.split == ref.split:
                warnings.add(pb.DatasetWarning.KIND_DUPLICATE, item.display,
                             f"same content as {ref.display}{labels}", ref.display)
            else:
                warnings.add(pb.DatasetWarning.KIND_LEAKAGE, item.display,
                             f"in {item.split}, same content as {ref.display} in {ref.split}{labels}", ref.display)

    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for item in sorted(usable, key=lambda it: (label[it.class_name], it.rel)):
        splits[item.split].append((item.rel, label[item.class_name]))

    summaries = []
    for s in SPLITS:
        counts = dict.fromkeys(layout.class_names, 0)
        for _, lab in splits[s]:
            counts[layout.class_names[lab]] += 1
        summaries.append(pb.SplitSummary(split=_SPLIT_ENUM[s], image_count=len(splits[s]), class_counts=counts))

    widths = [it.width for it in usable]
    heights = [it.height for it in usable]
    dataset = pb.Dataset(
        class_names=layout.class_names,
        splits=summaries,
        generated_splits=bool(made),
        image_count=len(usable),
        size_bytes=sum(it.size_bytes for it in usable),
        # median_low: a size some image really has, never a half pixel.
        image_sizes=pb.ImageSizeStats(
            min_width=min(widths), max_width=max(widths), min_height=min(heights), max_height=max(heights),
            median_width=statistics.median_low(widths), median_height=statistics.median_low(heights),
        ),
        warnings=warnings.to_proto(),
    )
    return _Ingested(dataset, splits, layout.class_names, made)


def _assign_splits(usable: list[_Item], layout: _Layout, options: SplitConfig) -> tuple[str, ...]:
    """Sets `split` on every item; returns the splits tlserve made (drawn from the
    training pool), in SPLITS order; empty when the archive's folders gave them all."""
    if layout.split_folders:
        to_make = [s for s in ("val", "test") if s not in layout.split_folders]
        pool = [it for it in usable if it.split == "train"]
    else:
        to_make = ["val", "test"]
        pool = usable
    if not to_make:
        return ()
    by_class: dict[str, dict[str, list[_Item]]] = defaultdict(lambda: defaultdict(list))
    for item in pool:
        by_class[item.class_name][item.sha256].append(item)
    val_f = options.val_fraction if "val" in to_make else 0.0
    test_f = options.test_fraction if "test" in to_make else 0.0
    for class_name in sorted(by_class):
        # Groups of identical files move together, in path order before the shuffle.
        groups = sorted(by_class[class_name].values(), key=lambda g: min(it.rel for it in g))
        # Seeded per class (str seeds hash with sha512: stable across runs and
        # platforms), so adding a class does not reshuffle the others.
        random.Random(f"{options.seed}/{class_name}").shuffle(groups)
        _, n_val, n_test = split_sizes(len(groups), val_f, test_f)
        for i, group in enumerate(groups):
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            for item in group:
                item.split = split
    return tuple(to_make)


# --- Archives --------------------------------------------------------------------------


def sniff_format(path: pathlib.Path) -> int:
    """The archive format from its first bytes, or ARCHIVE_FORMAT_UNSPECIFIED."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return pb.ARCHIVE_FORMAT_ZIP
    if head.startswith(b"\x1f\x8b"):
        return pb.ARCHIVE_FORMAT_TAR_GZ
    if head[257:262] == b"ustar":
        return pb.ARCHIVE_FORMAT_TAR
    return pb.ARCHIVE_FORMAT_UNSPECIFIED


def _entry_path(name: str) -> str:
    """An archive entry's name as a safe relative path, or InvalidArgument."""
    if "\\" in name:
        raise InvalidArgument(f"archive entry {name!r} contains a backslash; use '/' as the path separator")
    if name.startswith("/"):
        raise InvalidArgument(f"archive entry {name!r} is an absolute path; entries must be relative")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"archive entry {name!r} contains '..'; entries must stay inside the archive")
    return "/".join(parts)


@dataclasses.dataclass
class _Entries:
    files: dict[str, int]  # safe relative path → declared size
    dirs: set[str]


class _CappedReads:
    """A file-like view that refuses any single read larger than a cap (see
    _MAX_TAR_READ_BYTES); tarfile needs only read, seek and tell."""

    def __init__(self, raw, cap: int) -> None:
        self._raw, self._cap = raw, cap

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._cap:
            raise InvalidArgument(f"the tar archive has a header over {self._cap} bytes; it is not a dataset archive")
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


class _Archive:
    """Read access to an uploaded archive, in two passes: `scan` checks the entry
    list, `extract` writes chosen regular files. Nothing is extracted by the scan."""

    def __init__(self, path: pathlib.Path, fmt: int, max_entries: int, max_unpacked_bytes: int) -> None:
        self.path, self.fmt = path, fmt
        self.max_entries, self.max_unpacked_bytes = max_entries, max_unpacked_bytes

    def _open_tar(self) -> tuple[tarfile.TarFile, list]:
        raw = open(self.path, "rb")
        closers = [raw]
        stream = raw
        if self.fmt == pb.ARCHIVE_FORMAT_TAR_GZ:
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
            closers.insert(0, stream)
        tf = tarfile.open(fileobj=_CappedReads(stream, _MAX_TAR_READ_BYTES), mode="r:")
        return tf, closers

    def scan(self) -> _Entries:
        entries = _Entries({}, set())
        total = 0
        count = 0

        def add(name: str, kind: str, size: int) -> None:
            nonlocal total, count
            count += 1
            if count > self.max_entries:
                raise InvalidArgument(
                    f"the archive has more than {self.max_entries} entries, the server's max_dataset_files "
                    "(TLSERVE_MAX_DATASET_FILES); split the dataset or ask for a higher limit"
                )
            path = _entry_path(name)
            if not path:
                return  # the archive's own root, "./"
            if kind == "dir":
                entries.dirs.add(path)
                return
            if kind != "file":
                raise InvalidArgument(
                    f"archive entry {name!r} is a {kind}; only regular files and directories are accepted"
                )
            if path in entries.files:
                raise InvalidArgument(f"the archive lists {name!r} twice; each path may appear once")
            total += size
            if total > self.max_unpacked_bytes:
                raise InvalidArgument(
                    f"the archive unpacks to more than {self.max_unpacked_bytes} bytes ({UNPACKED_SIZE_FACTOR} x the "
                    "server's max_upload_bytes, TLSERVE_MAX_UPLOAD_BYTES); upload a smaller dataset"
                )
            entries.files[path] = size

        if self.fmt == pb.ARCHIVE_FORMAT_ZIP:
            with zipfile.ZipFile(self.path) as zf:
                for info in zf.infolist():
                    add(info.filename, self._zip_kind(info), info.file_size)
        else:
            tf, closers = self._open_tar()
            try:
                # Iterate, don't getmembers(): the limits above stop a huge archive early.
                for member in tf:
                    add(member.name, self._tar_kind(member), member.size)
            finally:
                tf.close()
                for c in closers:
                    c.close()
        return entries

    @staticmethod
    def _zip_kind(info: zipfile.ZipInfo) -> str:
        if info.flag_bits & 0x1:
            return "encrypted file"
        mode = info.external_attr >> 16
        # Only Unix-made zips carry a file type in the high bits, and not all of them
        # (Python's writestr sets permissions only): no type bits means "not said".
        if info.create_system == 3 and stat.S_IFMT(mode):
            if stat.S_ISLNK(mode):
                return "symbolic link"
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return "special file"
        return "dir" if info.is_dir() else "file"

    @staticmethod
    def _tar_kind(member: tarfile.TarInfo) -> str:
        if member.isreg():
            return "file"
        if member.isdir():
            return "dir"
        if member.issym():
            return "symbolic link"
        if member.islnk():
            return "hard link"
        if member.ischr() or member.isblk():
            return "device"
        return "special file"

    def extract(self, wanted: dict[str, str], dest: pathlib.Path) -> None:
        """Writes the chosen files (entry path from `scan` → path under `dest`).
        Only regular files and directories are made; bytes written are counted."""
        budget = [self.max_unpacked_bytes]

        def write(rel: str, src) -> None:
            target = dest / rel
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise _disk_error(e, f"extracting archive entry {rel!r}") from None
            with os.fdopen(fd, "wb") as out:
                while block := src.read(_COPY_BYTES):
                    budget[0] -= len(block)
                    if budget[0] < 0:
                        raise InvalidArgument(f"archive entry {rel!r} unpacks to more than it declares")
                    try:
                        out.write(block)
                    except OSError as e:
                        raise _disk_error(e, f"extracting archive entry {rel!r}") from None

        if self.fmt == pb.ARCHIVE_FORMAT_ZIP:
            with zipfile.ZipFile(self.path) as zf:
                for info in zf.infolist():
                    rel = _entry_path(info.filename)
                    if rel in wanted and not info.is_dir():
                        with zf.open(info) as src:
                            write(wanted[rel], src)
        else:
            tf, closers = self._open_tar()
            try:
                for member in tf:
                    rel = _entry_path(member.name)
                    if rel in wanted and member.isreg():
                        write(wanted[rel], tf.extractfile(member))
            finally:
                tf.close()
                for c in closers:
                    c.close()


# Errors the archive libraries raise for a truncated or malformed archive.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
                   gzip.BadGzipFile, struct.error, NotImplementedError, UnicodeDecodeError, ValueError)


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
            self._part, fmt, settings.max_dataset_files, UNPACKED_SIZE_FACTOR * settings.max_upload_bytes
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
            archive.extract({item.display: item.rel for item in layout.items}, files_dir)
        except _ARCHIVE_ERRORS as e:
            raise InvalidArgument(
                f"the {fmt_name} archive is truncated or malformed ({type(e).__name__}: {e}); "
                "check the file and upload it again"
            ) from None
        _remove(self._part)  # the extracted files are all we need now; free the disk
        self._check_cancelled()
        ingested = _ingest(files_dir, layout, self._options, settings)
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


# --- The domain object -------------------------------------------------------------------


class Datasets:
    """Datasets: upload, register, get, list, delete, and the manifest for training."""

    def __init__(self, settings: Settings, store: MetadataStore) -> None:
        self.settings = settings
        self.store = store
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
        known = {r["id"] for r in self.store.query("SELECT id FROM datasets")}
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
            taken = self.store.query("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,))
            if not taken and not (self.settings.datasets_dir / dataset_id).exists():
                return dataset_id

    def _check_name_free(self, name: str) -> None:
        rows = self.store.query("SELECT id FROM datasets WHERE name = ?", (name,))
        if rows:
            raise AlreadyExists(f"a dataset named {name!r} exists already ({rows[0]['id']}); choose another name "
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
            with self.store.transaction() as conn:
                before_commit()
                conn.execute(
                    "INSERT INTO datasets (id, name, create_time, path, proto) VALUES (?, ?, ?, ?, ?)",
                    (dataset_id, name, now, f"{self.settings.datasets_dir.name}/{dataset_id}",
                     dataset.SerializeToString()),
                )
        except sqlite3.IntegrityError:
            _remove(final)
            raise AlreadyExists(f"a dataset named {name!r} was created meanwhile; choose another name") from None
        except BaseException:
            _remove(final)
            raise
        return dataset

    # -- read --

    def _row(self, dataset: str):
        if not dataset:
            raise InvalidArgument("dataset is empty; give a dataset id (ds-...) or name")
        rows = self.store.query("SELECT * FROM datasets WHERE id = ? OR name = ?", (dataset, dataset))
        if not rows:
            raise NotFound(_not_found(dataset))
        return rows[0]

    def get(self, dataset: str) -> pb.Dataset:
        return pb.Dataset.FromString(self._row(dataset)["proto"])

    def list(self, page_size: int, page_token: str) -> tuple[list[pb.Dataset], str]:
        """Newest first. The token is the (create_time, id) of the last row sent, so
        pages neither skip nor repeat when datasets are added in between."""
        size = paging.page_size(page_size)
        if page_token:
            try:
                after_time, after_id = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after_time, after_id = float(after_time), str(after_id)
            except (ValueError, TypeError, binascii.Error):
                raise InvalidArgument(
                    "page_token is not one this server returned; start again with an empty page_token"
                ) from None
            rows = self.store.query(
                "SELECT id, create_time, proto FROM datasets WHERE create_time < ? OR (create_time = ? AND id < ?) "
                "ORDER BY create_time DESC, id DESC LIMIT ?", (after_time, after_time, after_id, size + 1))
        else:
            rows = self.store.query(
                "SELECT id, create_time, proto FROM datasets ORDER BY create_time DESC, id DESC LIMIT ?", (size + 1,))
        page = rows[:size]
        token = ""
        if len(rows) > size:
            last = page[-1]
            token = base64.urlsafe_b64encode(json.dumps([last["create_time"], last["id"]]).encode()).decode()
        return [pb.Dataset.FromString(r["proto"]) for r in page], token

    def manifest(self, dataset: str) -> Manifest:
        return Manifest.load(self.manifest_path(self._row(dataset)["id"]))

    # -- delete --

    def delete(self, dataset: str) -> None:
        """Removes the row, then HOME/datasets/<id> (uploaded files and the manifest;
        a registered directory under the data root is never touched)."""
        with self.store.transaction() as conn:
            # Inside the write transaction: no job can be queued on it between check and delete.
            row = conn.execute(
                "SELECT id, name FROM datasets WHERE id = ? OR name = ?", (dataset, dataset)
            ).fetchone()
            if row is None:
                raise NotFound(_not_found(dataset))
            marks = ",".join("?" * len(_ACTIVE_JOB_STATES))
            jobs = conn.execute(
                f"SELECT id FROM jobs WHERE dataset_id IN (?, ?) AND state IN ({marks}) ORDER BY create_time",
                (row["id"], row["name"], *_ACTIVE_JOB_STATES),
            ).fetchall()
            if jobs:
                ids = ", ".join(j["id"] for j in jobs[:5]) + (" ..." if len(jobs) > 5 else "")
                raise FailedPrecondition(
                    f"dataset {row['name']} ({row['id']}) is used by queued or running job(s) {ids}; "
                    "cancel them (CancelJob) or wait for them to finish, then delete it"
                )
            conn.execute("DELETE FROM datasets WHERE id = ?", (row["id"],))
        _remove(self.dataset_dir(row["id"]))
