"""Procedural image datasets for the demo, tests and benchmarks: no downloads.

Each class is a kind of shape (disc, square, triangle, ...) drawn at a random
position, size, rotation and colour on a noisy, textured background, so a
classifier has to learn shape, not colour or place. Two task families share
that visual world but not their classes:

- `SOURCE_SHAPES`: the large source task a model is first trained on;
- `TARGET_SHAPES`: a different set of shapes, for few-shot transfer.

A model that learned edges and outlines on the source task should need far
fewer target images than one trained from scratch: that is what the demo and
`bench/finetune.py` measure.

    write_image_folder(root, TARGET_SHAPES, images_per_class=5, size=64, seed=1)
    # root/<class>/<class>_000.png ...  (ImageFolder layout, no split folders)
"""

from __future__ import annotations

import math
import pathlib
import random
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFilter

SOURCE_SHAPES = ("disc", "square", "triangle", "cross", "bar", "ring")
TARGET_SHAPES = ("star", "diamond", "hexagon", "crescent")
SHAPES = SOURCE_SHAPES + TARGET_SHAPES


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + radius * math.cos(angle + 2 * math.pi * i / sides), cy + radius * math.sin(angle + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _star(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        a = angle + math.pi * i / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _rotated_rect(cx, cy, half_w, half_h, angle) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in ((-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h))]


def draw_shape(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One RGB image of `shape`, size × size pixels."""
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    # Background texture: a few faint random lines, so the shape is not the only edge.
    for _ in range(rng.randint(2, 5)):
        tint = tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in background)
        draw.line([(rng.uniform(0, size), rng.uniform(0, size)), (rng.uniform(0, size), rng.uniform(0, size))], fill=tint, width=max(1, size // 32))
    # A colour far enough from the background to be visible.
    while True:
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(colour, background)) > 200:
            break
    radius = rng.uniform(0.22, 0.36) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    width = max(2, int(radius * 0.3))
    if shape == "disc":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=width)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=colour)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, radius, 6, angle), fill=colour)
    elif shape == "diamond":
        points = _polygon(cx, cy, radius, 4, angle)
        # Squash one diagonal: a rhombus, not a square.
        draw.polygon([points[0], ((points[1][0] + cx) / 2, (points[1][1] + cy) / 2), points[2], ((points[3][0] + cx) / 2, (points[3][1] + cy) / 2)], fill=colour)
    elif shape == "cross":
        for a in (angle, angle + math.pi / 2):
            draw.polygon(_rotated_rect(cx, cy, radius, radius * 0.28, a), fill=colour)
    elif shape == "bar":
        draw.polygon(_rotated_rect(cx, cy, radius, radius * 0.3, angle), fill=colour)
    elif shape == "star":
        draw.polygon(_star(cx, cy, radius, angle), fill=colour)
    elif shape == "crescent":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        ox, oy = cx + radius * 0.5 * math.cos(angle), cy + radius * 0.5 * math.sin(angle)
        draw.ellipse([ox - radius * 0.85, oy - radius * 0.85, ox + radius * 0.85, oy + radius * 0.85], fill=background)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    # Sensor-like blur and noise.
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    noise = Image.effect_noise((size, size), rng.uniform(5, 25)).convert("RGB")
    return Image.blend(image, noise, 0.12)


def write_image_folder(
    root: pathlib.Path | str,
    classes: Sequence[str],
    images_per_class: int,
    *,
    size: int = 64,
    seed: int = 0,
    splits: dict[str, int] | None = None,
    image_format: str = "PNG",
) -> pathlib.Path:
    """Writes an ImageFolder tree and returns its root.

    Without `splits`: root/<class>/<class>_NNN.png, `images_per_class` each.
    With `splits` (e.g. {"train": 20, "val": 5, "test": 5}): root/<split>/<class>/...,
    that many per class in each split (`images_per_class` is then ignored).
    Same arguments, same pixels.
    """
    root = pathlib.Path(root)
    rng = random.Random(seed)
    extension = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[image_format.upper()]
    layout = {"": images_per_class} if splits is None else splits
    for split, count in layout.items():
        for shape in classes:
            directory = root / split / shape if split else root / shape
            directory.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_shape(shape, size, rng).save(directory / f"{shape}_{i:03d}.{extension}", format=image_format)
    return root
