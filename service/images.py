"""What this server accepts as an image, in one place: the formats PIL may parse
from user files, and the size limits checked from a header before any pixel is
decoded. Ingestion, training and Predict all use these."""

from __future__ import annotations

from tlserve.service.errors import InvalidArgument

# Only these PIL plugins may parse user files: an unrestricted Image.open would
# also try formats such as EPS, whose load() runs Ghostscript.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")

# The longest side over the shortest: beyond it an image is refused before decoding.
# The resize scales the shorter side to the model's resize target, so a 1 x 200,000
# strip (0.2 MP, well under any pixel cap) would become 36 x 7.2 M pixels for a 32-px
# model (7.5 s and 2.6 GB measured); with this cap the resized image is at most
# MAX_ASPECT_RATIO x resize² pixels (256 x 8192 for a 224-px model, 6 MB).
# Panoramas from phones are about 4:1 to 10:1.
MAX_ASPECT_RATIO = 32


def too_elongated(width: int, height: int) -> bool:
    return max(width, height) > MAX_ASPECT_RATIO * min(width, height)


def check_size(width: int, height: int, where: str, max_pixels: int) -> None:
    """Refuses an image over `max_pixels` or longer than MAX_ASPECT_RATIO times its
    width or height, before any work on its pixels."""
    if width * height > max_pixels:
        raise InvalidArgument(
            f"{where}: {width}x{height} = {width * height} pixels is over the server's max_image_pixels "
            f"{max_pixels} (TLSERVE_MAX_IMAGE_PIXELS); downscale the image"
        )
    if too_elongated(width, height):
        raise InvalidArgument(
            f"{where}: {width}x{height} is longer than {MAX_ASPECT_RATIO} times its width or height, the most "
            "this server accepts; crop the image"
        )
