"""Image bytes to pixels, and pixels to the network's square, the same way everywhere.

:func:`decode_image_bytes` is the project's decoder (the data pipeline's shards, prediction on
files, the MLflow model's inputs). :func:`letterbox_array` is the letterbox of prediction and
of the served models, pixel for pixel the evaluation letterbox
(:func:`~anchorless.platform.data.transforms.eval_transform`).

The module imports no torch: the ONNX model server decodes with :func:`decode_image_array` and
letterboxes with :func:`letterbox_array` on numpy alone, so serving an ONNX graph needs neither
torch nor torchvision.

Every decoder here reads the image's header first and refuses one declaring more than
:data:`~anchorless.platform.data.coco.DEFAULT_MAX_IMAGE_PIXELS` pixels (the bound ``data
shard`` applies, :func:`~anchorless.platform.data.coco.check_pixels`) before any pixel is
decoded: an upload to a served model cannot make it allocate gigabytes.
"""

from __future__ import annotations

import math
import os
import warnings
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from anchorless.errors import DataError
from anchorless.platform.data.coco import DEFAULT_MAX_IMAGE_PIXELS, check_pixels

if TYPE_CHECKING:
    import torch

PAD_VALUE = 114  # mid-grey: close to the data mean, so padding is near zero once normalised


# --- decoding ----------------------------------------------------------------------------------


def decode_image_bytes(
    data: bytes | torch.Tensor, name: str, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Encoded image bytes (or a uint8 tensor of them) → (3, H, W) uint8 RGB, upright.

    The one decoder of the project (shards in the data pipeline, prediction on files, the
    MLflow model's inputs), so every path sees the same pixels: EXIF orientation applied
    (annotations are drawn on the upright picture), grayscale and CMYK converted to RGB,
    an alpha channel dropped. An image whose header declares more than ``max_pixels``
    pixels is refused before decoding (:func:`check_image_header`); None skips the check,
    for bytes already checked (shards are, when written).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_image

    if max_pixels is not None:
        check_image_header(data if isinstance(data, bytes) else data.numpy(), name, max_pixels)
    encoded = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError):
        pass
    # torchvision decodes JPEG/PNG/GIF/WebP; PIL covers the rest (BMP, TIFF, ...).
    raw = data if isinstance(data, bytes) else encoded.numpy().tobytes()
    return torch.from_numpy(decode_image_array(raw, name, max_pixels=None)).permute(2, 0, 1).contiguous()


def decode_image_array(data: bytes, name: str, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes → (H, W, 3) uint8 RGB, upright, with PIL alone (no torch).

    The same pixels as :func:`decode_image_bytes` (both use libjpeg-turbo and zlib; the
    tests hold them equal on JPEG, PNG, grayscale, palette, alpha and EXIF-turned images),
    and the same bound on the pixels, checked before decoding.
    """
    from PIL import ImageOps

    with _open_encoded(data, name) as image:
        if max_pixels is not None:
            check_pixels(image.size, max_pixels, name)  # the header's size: nothing is decoded yet
        try:
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{name}: cannot decode image ({exc})") from None
    return rgb.copy()  # writable, as torch.from_numpy wants


def check_image_header(data: bytes | np.ndarray, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """A :class:`DataError` for encoded bytes whose header declares more than ``max_pixels``
    pixels, or that no decoder here can read; only the header is read, nothing is decoded."""
    with _open_encoded(data, name) as image:
        size = image.size  # PIL opens lazily: the header only
    check_pixels(size, max_pixels, name)


def _open_encoded(data: bytes | np.ndarray, name: str):
    """PIL's lazy ``Image.open`` on encoded bytes; :class:`DataError` where it finds no image.

    PIL's decompression-bomb warning is silenced: :func:`check_pixels` is the bound, and
    PIL's own ceiling (twice its limit) stays an error as a second line."""
    from PIL import Image, UnidentifiedImageError

    if not len(data):
        raise DataError(f"{name}: empty, no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name}: image is too large to decode safely ({exc}); not decoded") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """An image file → (3, H, W) uint8 RGB; a clear error naming a missing or unreadable file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise DataError(f"{path}: empty file")
    return decode_image_bytes(data, str(path))


# --- the letterbox -----------------------------------------------------------------------------


def letterbox_factor(height: int, width: int, size: int, scale_factor: float = 1.0) -> float:
    """Network pixels per original pixel: the long side becomes ``size * scale_factor``."""
    return size * scale_factor / max(height, width)


def resized_shape(height: int, width: int, factor: float, size: int) -> tuple[int, int]:
    """(height, width) of an image resized by ``factor``, rounded, at least 1 and at most ``size``."""
    return min(size, max(1, int(round(height * factor)))), min(size, max(1, int(round(width * factor))))


def letterbox_array(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 RGB → the (3, size, size) uint8 letterbox and its scale (network px per original px).

    Resized keeping the aspect so the long side is ``size`` (:func:`resize_antialiased`), at
    the top-left, padded bottom and right with :data:`PAD_VALUE`: what
    :func:`~anchorless.platform.data.transforms.eval_transform` gives, without torch.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"letterbox: expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    factor = letterbox_factor(height, width, size)
    new_h, new_w = resized_shape(height, width, factor, size)
    resized = resize_antialiased(image, new_h, new_w)
    out = np.full((3, size, size), PAD_VALUE, dtype=np.uint8)
    out[:, :new_h, :new_w] = resized.transpose(2, 0, 1)
    return out, float(factor)


def resize_antialiased(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 → (height, width, C) uint8: torch's antialiased bilinear resize of uint8
    images (what torchvision's ``resize(..., antialias=True)`` does to the evaluation images),
    bit for bit.

    Written out because no torch-free library gives these pixels: Pillow has the same filter
    but rounds its fixed-point weights at 22 bits where torch chooses at most 15, so a
    quarter of the pixels can differ by one, enough to move a detector's scores. Separable:
    the width first, then the height, each pass rounded back to uint8, as torch does.
    """
    out = image
    if width != image.shape[1]:
        out = _resample_axis(out, width, axis=1)
    if height != image.shape[0]:
        out = _resample_axis(out, height, axis=0)
    return out


def _resample_axis(image: np.ndarray, out_size: int, *, axis: int) -> np.ndarray:
    starts, weights, precision = _antialias_weights(image.shape[axis], out_size)
    last = image.shape[axis] - 1
    # (O,) source index per tap; the weights past an output's window are 0, so clipping is harmless.
    shape = (1, out_size, 1) if axis == 1 else (out_size, 1, 1)
    accumulated = np.full(
        (image.shape[0], out_size, image.shape[2]) if axis == 1 else (out_size, *image.shape[1:]),
        1 << (precision - 1),  # + one half, so the shift below rounds
        dtype=np.int32,  # enough: the weights are positive and sum to at most 2**22, times 255
    )
    for tap in range(weights.shape[1]):
        pixels = np.take(image, np.minimum(starts + tap, last), axis=axis)
        accumulated += pixels * weights[:, tap].reshape(shape)
    return np.clip(accumulated >> precision, 0, 255).astype(np.uint8)


def _antialias_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis of torch's uint8 antialiased bilinear resize (align_corners False): the first
    source index of each output (O,), its fixed-point weights (O, taps) and their precision in bits.

    As ``_compute_indices_min_size_weights_aa`` and ``_compute_index_ranges_int16_weights``
    (ATen's UpSampleKernel.cpp) compute them: a triangle filter widened by the downscale,
    weights normalised in float64, then scaled to int16 at the largest precision at which
    twice the largest weight still fits.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # the triangle's half-width (1) times the downscale
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)  # (O,)
    starts = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C++ casts truncate
    counts = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - starts, 0, taps)
    offsets = np.arange(taps)  # (T,)
    distance = ((starts[:, None] + offsets) - center[:, None] + 0.5) * inverse  # (O, T)
    weights = np.where(offsets < counts[:, None], np.maximum(1.0 - np.abs(distance), 0.0), 0.0)
    totals = np.cumsum(weights, axis=1)[:, -1:]  # summed in order, as the C++ loop does
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals != 0)
    largest = float(weights.max())
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return starts, fixed, precision
