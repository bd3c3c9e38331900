"""The torch-free letterbox and decoder (what the ONNX server uses) give the pixels of the torch ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from anchorless.errors import DataError
from anchorless.platform.data.images import PAD_VALUE, decode_image_array, decode_image_bytes, letterbox_array
from anchorless.platform.data.transforms import Sample, eval_transform, letterbox_images

# Up- and downscales, odd ratios, one-pixel sides, a size already square.
SHAPES = [(48, 80), (90, 40), (333, 517), (20, 30), (31, 97), (1, 1), (1, 300), (300, 1), (64, 64), (129, 511), (700, 650)]


def _eval_letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    sample = eval_transform(Sample.create(tensor, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)), size)
    return sample.image.numpy(), sample.scale


@pytest.mark.parametrize("size", [64, 416])
def test_letterbox_array_gives_the_evaluation_letterbox_bit_for_bit(size):
    rng = np.random.default_rng(size)
    shapes = SHAPES + [tuple(int(v) for v in rng.integers(1, 900, 2)) for _ in range(12)]
    for height, width in shapes:
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for image in (noise, np.cumsum(noise, axis=1, dtype=np.uint8)):  # sharp and smooth content
            got, scale = letterbox_array(image, size)
            want, want_scale = _eval_letterbox(image, size)
            assert got.shape == (3, size, size) and got.dtype == np.uint8
            assert np.array_equal(got, want), (height, width, size, int(np.abs(got.astype(int) - want).max()))
            assert scale == want_scale


def test_predict_letterboxes_through_letterbox_array_with_grey_padding_bottom_right():
    image = torch.full((3, 30, 60), 200, dtype=torch.uint8)
    batch, scales = letterbox_images([image], 64)
    assert batch.shape == (1, 3, 64, 64) and scales == [64 / 60]
    assert (batch[0, :, :32, :] == 200).all() and (batch[0, :, 32:, :] == PAD_VALUE).all()


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG")])
def test_decode_image_array_gives_the_decoders_pixels(mode, fmt):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    data = _encoded(rgb.convert(mode), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    assert np.array_equal(decode_image_array(data, "x"), decode_image_bytes(data, "x").permute(1, 2, 0).numpy())


def test_decode_image_array_turns_an_exif_rotated_photo_upright_like_the_decoder():
    exif = Image.Exif()
    exif[0x0112] = 6  # display turned 90 degrees clockwise
    stored = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    data = _encoded(stored, "JPEG", exif=exif.tobytes(), quality=95)
    upright = decode_image_array(data, "turned")
    assert upright.shape == (40, 30, 3)
    assert np.array_equal(upright, decode_image_bytes(data, "turned").permute(1, 2, 0).numpy())


def test_bytes_that_are_no_image_are_a_clear_error_naming_the_input():
    with pytest.raises(DataError, match="input row 3: cannot decode image"):
        decode_image_array(b"plain text", "input row 3")
    with pytest.raises(DataError, match="input row 0: empty, no image bytes"):
        decode_image_array(b"", "input row 0")
