"""The pixel bound of `data shard` on every decoder: an image whose header declares too many
pixels is refused before a pixel is decoded (predict, the served models, the ONNX server)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from anchorless.errors import DataError
from anchorless.platform.data.coco import DEFAULT_MAX_IMAGE_PIXELS
from anchorless.platform.data.images import decode_image_array, decode_image_bytes, read_image

HUGE = (20_000, 12_000)  # 240 Mpx: 720 MB once decoded


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is rewritten to declare ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header (IHDR) declaring ``width`` x ``height`` RGB, with no pixel data worth the name."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def no_decoding(monkeypatch):
    """Any decoding (torchvision's or PIL's) fails the test: the bound must refuse first."""
    import torchvision.io

    def decoded(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(torchvision.io, "decode_image", decoded)
    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)


@pytest.mark.parametrize("claiming", [jpeg_claiming, png_claiming])
def test_an_image_declaring_more_pixels_than_the_shard_bound_is_refused_before_decoding(claiming, no_decoding, tmp_path):
    data = claiming(*HUGE)
    refused = rf"image is 20000x12000 = 240,000,000 pixels, above the limit of {DEFAULT_MAX_IMAGE_PIXELS:,}.*not decoded"
    with pytest.raises(DataError, match=rf"input row 0: {refused}"):
        decode_image_bytes(data, "input row 0")  # the torch pyfunc's decoder
    with pytest.raises(DataError, match=rf"input row 1: {refused}"):
        decode_image_array(data, "input row 1")  # the ONNX server's
    with pytest.raises(DataError, match=rf"image id 7: {refused}"):
        decode_image_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), "image id 7")  # a tensor of bytes
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(data)
    with pytest.raises(DataError, match=rf"upload\.jpg: {refused}"):
        read_image(upload)  # anchorless predict's


def test_the_bound_counts_pixels_as_the_shard_check_does_and_can_be_set_or_skipped():
    buffer = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    with pytest.raises(DataError, match="40x30 = 1,200 pixels, above the limit of 1,199"):
        decode_image_bytes(data, "small", max_pixels=40 * 30 - 1)
    with pytest.raises(DataError, match="40x30 = 1,200 pixels, above the limit of 1,199"):
        decode_image_array(data, "small", max_pixels=40 * 30 - 1)
    assert decode_image_bytes(data, "small", max_pixels=40 * 30).shape == (3, 30, 40)
    assert decode_image_array(data, "small", max_pixels=None).shape == (30, 40, 3)  # bytes checked before (shards)
