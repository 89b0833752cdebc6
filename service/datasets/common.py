"""Dataset names and ids, split options, limits, and the small helpers every part
of ingestion shares."""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import pathlib
import re
import shutil

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.errors import InvalidArgument, ResourceExhausted

ID_PREFIX = "ds-"
_ID_PATTERN = re.compile(r"ds-[0-9a-f]{8}")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
DEFAULT_FRACTION = 0.15
WARNINGS_PER_KIND = 100
# What an archive may unpack to: at most MAX_EXPANSION_RATIO times its own size, and
# never more than UNPACKED_SIZE_FACTOR x max_upload_bytes. Image formats are compressed
# already, so a real image archive unpacks to about its own size (a zip of BMP photos
# to a few times it), while zeros deflate about 1000:1: a 2.8 MB bomb makes 2.8 GB,
# ten times more than 100:1 allows. The cap bounds the disk a large archive may take.
MAX_EXPANSION_RATIO = 100
UNPACKED_SIZE_FACTOR = 4
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
    # A letter or digit first, as for model names: "." and ".." are path components.
    if not _NAME_PATTERN.fullmatch(name or "") or not name[0].isalnum():
        raise InvalidArgument(
            f"{field} {name!r} is not a valid dataset name: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
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


def _disk_error(e: OSError, what: str) -> Exception:
    """Disk full is the server's limit; a name the file system refuses is the archive's fault."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"the server ran out of disk space while {what}; free space or upload less")
    return InvalidArgument(f"{what}: {e.strerror or e}")
