"""Archives: the format sniffed from the bytes, every entry's name and kind checked
before anything is extracted (no `..`, absolute paths, links or devices; entry,
unpacked-size and read caps), and the wanted entries extracted, none past the size
it declared."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import stat
import struct
import tarfile
import zipfile
import zlib

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.datasets.common import _COPY_BYTES, MAX_EXPANSION_RATIO, UNPACKED_SIZE_FACTOR, _disk_error
from tlserve.service.errors import InvalidArgument

# tarfile reads a pax or GNU long-name header body in one read(); a gzip of zeros can
# declare gigabytes of it. No honest header comes near 16 MiB.
_MAX_TAR_READ_BYTES = 16 << 20


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


@dataclasses.dataclass(frozen=True)
class _UnpackLimit:
    """The most bytes an archive may unpack to: MAX_EXPANSION_RATIO times its own
    size (what stops a bomb, however small) and UNPACKED_SIZE_FACTOR times the
    server's max_upload_bytes (what bounds the disk a large archive takes)."""

    archive_bytes: int
    max_upload_bytes: int

    @property
    def _by_ratio(self) -> int:
        return MAX_EXPANSION_RATIO * self.archive_bytes

    @property
    def _cap(self) -> int:
        return UNPACKED_SIZE_FACTOR * self.max_upload_bytes

    @property
    def max_bytes(self) -> int:
        return min(self._by_ratio, self._cap)

    def refusal(self) -> InvalidArgument:
        """The error for an archive over `max_bytes`, naming the limit that binds."""
        if self._by_ratio < self._cap:
            return InvalidArgument(
                f"the archive unpacks to more than {self.max_bytes} bytes, over the limit of {MAX_EXPANSION_RATIO} "
                f"unpacked bytes per archive byte ({MAX_EXPANSION_RATIO} x its {self.archive_bytes} bytes); "
                "image files are compressed already, so an image archive unpacks to about its own size and "
                "this one is refused as a zip bomb; store the images as JPEG or PNG"
            )
        return InvalidArgument(
            f"the archive unpacks to more than {self.max_bytes} bytes ({UNPACKED_SIZE_FACTOR} x the server's "
            "max_upload_bytes, TLSERVE_MAX_UPLOAD_BYTES); upload a smaller dataset"
        )


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

    def __init__(self, path: pathlib.Path, fmt: int, max_entries: int, limit: _UnpackLimit) -> None:
        self.path, self.fmt = path, fmt
        self.max_entries, self.limit = max_entries, limit

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
        """The entry list, checked: names, kinds, count, and the sizes the entries
        declare against `limit` (for a sparse tar member, the size it unpacks to)."""
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
            if total > self.limit.max_bytes:
                raise self.limit.refusal()
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

    def extract(self, entries: _Entries, wanted: dict[str, str], dest: pathlib.Path) -> None:
        """Writes the chosen files (entry path from `scan` → path under `dest`).
        Only regular files and directories are made. The bytes really written are
        counted and no entry may pass the size it declared to `scan`, so the total
        stays under the limit the scan checked whatever the decompressor yields."""

        def write(rel: str, src) -> None:
            declared, written = entries.files[rel], 0
            target = dest / wanted[rel]
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise _disk_error(e, f"extracting archive entry {rel!r}") from None
            with os.fdopen(fd, "wb") as out:
                while block := src.read(_COPY_BYTES):
                    written += len(block)
                    if written > declared:
                        raise InvalidArgument(
                            f"archive entry {rel!r} unpacks to more than the {declared} bytes its header declares; "
                            "the archive is corrupt or forged"
                        )
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
                            write(rel, src)
        else:
            tf, closers = self._open_tar()
            try:
                for member in tf:
                    rel = _entry_path(member.name)
                    if rel in wanted and member.isreg():
                        write(rel, tf.extractfile(member))
            finally:
                tf.close()
                for c in closers:
                    c.close()


# Errors the archive libraries raise for a truncated or malformed archive.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
                   gzip.BadGzipFile, struct.error, NotImplementedError, UnicodeDecodeError, ValueError)
