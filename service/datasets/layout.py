"""Which file is which class and split: `plan_layout` reads a tree of paths (an
archive's entries or a registered folder) as class folders, optionally under
train/val/test folders."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from tlserve.service.datasets.common import _SPLIT_FOLDERS, IMAGE_EXTENSIONS, _is_image_name
from tlserve.service.errors import InvalidArgument

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
