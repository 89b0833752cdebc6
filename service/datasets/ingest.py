"""The shared pipeline: every image checked (`check_image`: format, size, pixels),
duplicates and junk turned into warnings, splits drawn where the data has none,
and the result ready to become a Dataset and its manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import random
import stat
import statistics
from collections import defaultdict
from collections.abc import Iterable

from PIL import Image

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.config import Settings
from tlserve.service.datasets.common import _COPY_BYTES, _SPLIT_ENUM, WARNINGS_PER_KIND, SplitConfig, split_sizes
from tlserve.service.datasets.layout import _Item, _Layout
from tlserve.service.errors import InvalidArgument
from tlserve.service.images import MAX_ASPECT_RATIO, PIL_FORMATS, too_elongated
from tlserve.service.manifest import SPLITS

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
            with Image.open(f, formats=PIL_FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    return _Checked(
                        sha, width, height, size,
                        too_large=f"{width}x{height} = {width * height} pixels",
                    )
                if too_elongated(width, height):
                    # Resized by its short side for training, a thin strip becomes huge.
                    return _Checked(sha, 0, 0, size, problem=(
                        f"{width}x{height} is longer than {MAX_ASPECT_RATIO} times its width or height"))
                im.verify()  # PNG: every chunk CRC; cheap, no decoding
            f.seek(0)
            with Image.open(f, formats=PIL_FORMATS) as im:
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
