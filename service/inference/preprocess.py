"""Images in, model inputs out: decoding and preprocessing for prediction.

A `Preprocessor` is built once per loaded model from the preprocessing stored with
it (resize the shorter side, centre-crop, scale to [0, 1], normalise) and the
artifact's input layout, and turns the images of one request into one array:

    prep = Preprocessor(model.preprocessing, layout="float_nchw")
    batch = prep.prepare(request.images, max_pixels=settings.max_image_pixels)  # (N, 3, S, S) float32

It produces the pixels `service.training.data.eval_transform` (what the model was
evaluated with) produces, exactly (a test checks it): the same PIL resize of the
shorter side (torchvision rounds the long side down), the same centre-crop
offsets, then in numpy `x * 1/(255 std) - mean/std` with the constants
precomputed per model. One shortcut, JPEG draft mode: libjpeg decodes at 1/2, 1/4
or 1/8 scale (DCT scaling) when the reduced image keeps its shorter side at least
`DRAFT_MARGIN` (4) × the resize target, and the resize maps the reduced image onto
the original's geometry. Measured on 14 real photographs (6 JPEGs 640×427 …
1411×1411, 8 PNG photos re-encoded as JPEG q90) for a 32-px model (resize 36): mean
abs difference vs a full decode 0.15 grey level, max 3, 99th percentile 1,
decode + preprocess 2× faster (40 vs 81 ms for the 14); a margin of 2 was 2.6×
faster but up to 8 grey levels off (mean 1.06 on a progressive 4:2:2 JPEG). A
12-MP (4032×3024) JPEG for a 224-px model (resize 256) decodes at 1/2: 173 → 50 ms,
mean 0.08, max 1 grey level (at 32 px: 1/8, 162 → 19 ms). Smaller photos at 224 px
are not drafted.

Image inputs are validated here and failures are `InvalidArgument` naming the
image: undecodable bytes, a header over `max_pixels` (read from the header before
any pixel is decoded; PIL's own decompression-bomb check is bypassed so its message
never comes first), and tensors of the wrong shape, dtype or byte length. EXIF
orientation is not applied, as in training (`Image.open(...).convert("RGB")`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.errors import InvalidArgument
from tlserve.service.images import check_size

# Draft (DCT-scaled JPEG decoding) only while the reduced image's shorter side stays
# at least this many times the resize target, so the resize still averages ≥ 4×4
# decoded pixels per output pixel (the measurements above chose 4 over 2 and 3).
DRAFT_MARGIN = 4.0

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

# Formats accepted for `ImageInput.encoded`, by their magic bytes. The plugin classes
# are used directly: `Image.open` would run PIL's decompression-bomb check (a
# process-wide limit and a message about DOS attacks) before ours.
_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


def _image_class(data: bytes) -> type[ImageFile.ImageFile] | None:
    if data.startswith(_JPEG):
        return JpegImagePlugin.JpegImageFile
    if data.startswith(_PNG):
        return PngImagePlugin.PngImageFile
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WebPImagePlugin.WebPImageFile
    return None


def open_image(data: bytes, where: str, max_pixels: int) -> ImageFile.ImageFile:
    """Parses the header of a JPEG, PNG or WebP file (no pixels decoded yet) and
    refuses an image over `max_pixels`."""
    cls = _image_class(data)
    if cls is None:
        raise InvalidArgument(
            f"{where}: cannot decode {len(data)} bytes: not a JPEG, PNG or WebP file"
            + (" (the data is empty)" if not data else "")
        )
    try:
        image = cls(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any decoder failure on user bytes is the user's
        raise InvalidArgument(f"{where}: cannot decode the {cls.format} header: {e}") from None
    check_size(*image.size, where, max_pixels)
    return image


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(resize) of the shorter side; the
    longer side is rounded down, as `torchvision.transforms.functional` does."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_offsets(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of torchvision's CenterCrop(crop) in a width×height image."""
    if width < crop or height < crop:
        raise InvalidArgument(f"the resized image {width}x{height} is smaller than the crop {crop}")  # a broken record
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


class Preprocessor:
    """Prepares images for one model: `layout` "float_nchw" gives normalised
    (N, 3, S, S) float32, "uint8_nhwc" gives (N, S, S, 3) RGB uint8 (the graph
    normalises)."""

    def __init__(self, preprocessing: pb.Preprocessing, layout: str = "float_nchw", *, draft: bool = True) -> None:
        if layout not in ("float_nchw", "uint8_nhwc"):
            raise ValueError(f"layout must be float_nchw or uint8_nhwc, not {layout!r}")
        if preprocessing.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {preprocessing.interpolation!r}")
        self.layout = layout
        self.resize = int(preprocessing.resize_size)
        self.crop = int(preprocessing.crop_size)
        self.resample = _RESAMPLE[preprocessing.interpolation]
        self.draft = draft
        mean = np.asarray(preprocessing.mean, dtype=np.float64)
        std = np.asarray(preprocessing.std, dtype=np.float64)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        # (x / 255 - mean) / std  ==  x * scale + bias, per channel, shaped (3, 1, 1) for CHW.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(3, 1, 1)
        self._bias = (-mean / std).astype(np.float32).reshape(3, 1, 1)
        s = self.crop
        self.sample_shape = (3, s, s) if layout == "float_nchw" else (s, s, 3)
        self.dtype = np.dtype(np.float32) if layout == "float_nchw" else np.dtype(np.uint8)

    # -- whole requests --------------------------------------------------------------

    def is_prepared(self, image: pb.ImageInput) -> bool:
        """Whether an input needs no decoding or resizing (a tensor already of the model's
        size): cheap enough to prepare on the event loop."""
        if image.WhichOneof("data") != "tensor":
            return False
        shape = tuple(image.tensor.shape)
        s = self.crop
        return shape == (s, s, 3) and image.tensor.dtype == pb.DATA_TYPE_UINT8 or (
            shape == (3, s, s) and image.tensor.dtype == pb.DATA_TYPE_FLOAT32
        )

    def pixels(self, images: Sequence[pb.ImageInput]) -> np.ndarray | None:
        """(N, S, S, 3) uint8 when every image is a uint8 RGB tensor of exactly the
        model's size (the clients' fast path), without converting anything: a view of
        the request's bytes for one image. None otherwise (`prepare` then says what is
        wrong with which image). `collate` normalises these later, in the compute thread."""
        s = self.crop
        size = s * s * 3
        buffers = []
        for image in images:
            tensor = image.tensor
            if (image.WhichOneof("data") != "tensor" or tensor.dtype != pb.DATA_TYPE_UINT8
                    or tuple(tensor.shape) != (s, s, 3)):
                return None
            data = tensor.data  # each read of a bytes field is a copy: read it once
            if len(data) != size:
                return None
            buffers.append(data)
        if len(buffers) == 1:
            return np.frombuffer(buffers[0], dtype=np.uint8).reshape(1, s, s, 3)
        return np.stack([np.frombuffer(data, dtype=np.uint8).reshape(s, s, 3) for data in buffers])

    def collate(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """One model input batch from the arrays of several requests, in order: each
        either already the model's input, (n, *sample_shape) of its dtype, or (for a
        float model) pixels from `pixels`, (n, S, S, 3) uint8, normalised here."""
        if all(a.dtype == self.dtype and a.shape[1:] == self.sample_shape for a in arrays):
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        out = np.empty((sum(len(a) for a in arrays), *self.sample_shape), dtype=self.dtype)
        offset = 0
        for a in arrays:
            part = out[offset : offset + len(a)]
            if a.dtype == self.dtype and a.shape[1:] == self.sample_shape:
                part[...] = a
            elif self.layout == "float_nchw" and a.dtype == _UINT8 and a.shape[1:] == (self.crop, self.crop, 3):
                # (n, S, S, 3) → (n, 3, S, S), then x * scale + bias in float32, in place.
                np.multiply(a.transpose(0, 3, 1, 2), self._scale, out=part, dtype=np.float32)
                part += self._bias
            else:
                raise ValueError(f"cannot collate {a.dtype} {a.shape[1:]} into {self.dtype} {self.sample_shape}")
            offset += len(a)
        return out

    def prepare(self, images: Sequence[pb.ImageInput], max_pixels: int) -> np.ndarray:
        """(N, *sample_shape) for the images of one request, in order."""
        out = np.empty((len(images), *self.sample_shape), dtype=self.dtype)
        for i, image in enumerate(images):
            self.prepare_one(image, f"images[{i}]", max_pixels, out=out[i])
        return out

    def prepare_one(self, image: pb.ImageInput, where: str, max_pixels: int, *, out: np.ndarray) -> None:
        kind = image.WhichOneof("data")
        if kind == "encoded":
            self.from_pixels(self.decode(image.encoded, where, max_pixels), out=out)
        elif kind == "tensor":
            self._from_tensor(image.tensor, where, max_pixels, out=out)
        else:
            raise InvalidArgument(f"{where}: empty image: set encoded (JPEG/PNG/WebP bytes) or tensor")

    # -- steps -------------------------------------------------------------------------

    def decode(self, data: bytes, where: str, max_pixels: int) -> np.ndarray:
        """Encoded bytes → the (S, S, 3) uint8 crop the model takes."""
        image = open_image(data, where, max_pixels)
        try:
            with image:
                width, height = image.size
                source: tuple[float, float, float, float] | None = None  # the whole image
                if self.draft and image.format == "JPEG":
                    # Ask for a reduced size that keeps the shorter side ≥ DRAFT_MARGIN × resize;
                    # draft() picks the largest DCT scale (1, 2, 4, 8) that still covers it and
                    # returns where the original image lies in the reduced one.
                    k = min(1.0, DRAFT_MARGIN * self.resize / min(width, height))
                    drafted = image.draft(None, (math.ceil(width * k), math.ceil(height * k)))
                    if drafted is not None and image.size != (width, height):
                        source = drafted[1]
                rgb = image.convert("RGB")  # decodes; palette, greyscale, RGBA, CMYK → RGB as in training
                return self._resize_and_crop(rgb, width, height, source)
        except InvalidArgument:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt stream fails here
            raise InvalidArgument(f"{where}: cannot decode the {image.format} image: {type(e).__name__}: {e}") from None

    def _resize_and_crop(self, rgb: Image.Image, width: int, height: int, source=None) -> np.ndarray:
        """The centre crop of `rgb` resized as a width×height image would be: (S, S, 3).
        `source` is where that image lies in `rgb` when it was decoded reduced."""
        size = resized_size(width, height, self.resize)
        resized = rgb.resize(size, self.resample, box=source)
        left, top = crop_offsets(*size, self.crop)
        return np.asarray(resized)[top : top + self.crop, left : left + self.crop]  # a view: no copy

    def from_pixels(self, pixels: np.ndarray, *, out: np.ndarray) -> None:
        """(S, S, 3) uint8 RGB → one model sample written into `out`."""
        if self.layout == "uint8_nhwc":
            out[...] = pixels
            return
        # (S, S, 3) → (3, S, S), then x * scale + bias in float32, in place.
        np.multiply(pixels.transpose(2, 0, 1), self._scale, out=out, dtype=np.float32)
        out += self._bias

    def resize_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Any (H, W, 3) uint8 → the (S, S, 3) crop, as for a decoded image."""
        height, width = pixels.shape[:2]
        return self._resize_and_crop(Image.fromarray(pixels, "RGB"), width, height)

    def _from_tensor(self, tensor: pb.Tensor, where: str, max_pixels: int, *, out: np.ndarray) -> None:
        shape = tuple(tensor.shape)
        dtype = _TENSOR_DTYPES.get(tensor.dtype)
        s = self.crop
        is_pixels = dtype is _UINT8 and len(shape) == 3 and shape[2] == 3 and shape[0] > 0 and shape[1] > 0
        is_normalised = dtype is _FLOAT32 and shape == (3, s, s)
        if not (is_pixels or is_normalised):
            raise InvalidArgument(f"{where}: {_describe(tensor)}, {self._expected()}")
        if is_pixels:
            check_size(shape[1], shape[0], where, max_pixels)
        size = math.prod(shape) * dtype.itemsize
        if len(tensor.data) != size:
            raise InvalidArgument(
                f"{where}: tensor data is {len(tensor.data)} bytes, {_describe(tensor)} needs {size}; {self._expected()}"
            )
        array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
        if is_normalised:
            if self.layout == "float_nchw":
                out[...] = array
            else:  # a uint8 graph: undo the normalisation (lossless up to rounding)
                pixels = (array * (255.0 * self.std.reshape(3, 1, 1)) + 255.0 * self.mean.reshape(3, 1, 1))
                out[...] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            return
        if shape[:2] != (s, s):  # any size: resized and cropped like a decoded image
            array = self.resize_pixels(array)
        self.from_pixels(array, out=out)

    def _expected(self) -> str:
        return f"expected uint8 (H, W, 3) RGB or float32 (3, {self.crop}, {self.crop}) normalised"


_UINT8, _FLOAT32 = np.dtype(np.uint8), np.dtype("<f4")
_TENSOR_DTYPES = {pb.DATA_TYPE_UINT8: _UINT8, pb.DATA_TYPE_FLOAT32: _FLOAT32}


def _describe(tensor: pb.Tensor) -> str:
    """"got float16 (3, 32, 32)": a tensor's dtype and shape as the error messages say them."""
    name = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else str(tensor.dtype)
    return f"got {name.removeprefix('DATA_TYPE_').lower()} {tuple(int(d) for d in tensor.shape)}"
