"""Image bytes to pixels, decoded the same way everywhere: the data pipeline's shards,
prediction on files and the MLflow model's encoded inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from anchorless.errors import DataError


def decode_image_bytes(data: bytes | torch.Tensor, name: str) -> torch.Tensor:
    """Encoded image bytes (or a uint8 tensor of them) → (3, H, W) uint8 RGB, upright.

    The one decoder of the project (shards in the data pipeline, prediction on files, the
    MLflow model's inputs), so every path sees the same pixels: EXIF orientation applied
    (annotations are drawn on the upright picture), grayscale and CMYK converted to RGB,
    an alpha channel dropped.
    """
    from torchvision.io import ImageReadMode, decode_image

    encoded = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError):
        pass
    # torchvision decodes JPEG/PNG/GIF/WebP; PIL covers the rest (BMP, TIFF, ...).
    from io import BytesIO

    from PIL import Image, ImageOps, UnidentifiedImageError

    raw = data if isinstance(data, bytes) else encoded.numpy().tobytes()
    try:
        with Image.open(BytesIO(raw)) as image:
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


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
