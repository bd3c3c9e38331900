"""Real-world image quirks, the same on every path: EXIF orientation, grayscale, CMYK, alpha."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from anchorless.errors import DataError
from anchorless.platform.data.images import decode_image_bytes
from anchorless.platform.data.pipeline import decode_and_transform
from anchorless.platform.data.shards import write_shards

ROTATE_90_CW = 6  # EXIF orientation: display the stored pixels turned 90 degrees clockwise


def _encoded(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _upright_picture() -> Image.Image:
    """30 wide, 40 high, dark, with a white square at x 4..12, y 24..36 (as a person sees it)."""
    pixels = np.full((40, 30, 3), 20, dtype=np.uint8)
    pixels[24:36, 4:12] = 255
    return Image.fromarray(pixels)


def _stored_turned(upright: Image.Image) -> bytes:
    """What a phone writes: pixels stored turned back, with the orientation that turns them upright."""
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90_CW
    return _encoded(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied_so_boxes_drawn_upright_stay_on_their_object(tmp_path, make_coco) -> None:
    def upright_size(coco):
        for image in coco["images"]:
            image.update(width=30, height=40)
        coco["annotations"] = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 24, 8, 12], "iscrowd": 0}]

    annotations, images = make_coco(upright_size, size=(30, 40))
    data = _stored_turned(_upright_picture())
    assert Image.open(io.BytesIO(data)).size == (40, 30)  # stored sideways
    (images / "img_1.jpg").write_bytes(data)
    manifest = write_shards(annotations, images, tmp_path / "out", progress=False)
    table = pq.read_table(tmp_path / "out" / manifest["shards"][0]["file"])
    row = decode_and_transform(table.slice(0, 1), image_size=40, max_boxes=4, augment=None, seed=0)
    x0, y0, x1, y1 = row["boxes"][0, 0].round().astype(int)  # 40 px letterbox of a 30x40 image: scale 1
    inside = row["image"][0][:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1]
    assert inside.min() > 200, "the box is not on the white square: orientation not applied"
    assert row["image"][0][:, :20, 15:28].max() < 60  # where the square would be without it
    assert decode_image_bytes(data, "turned").shape == (3, 40, 30)


def test_annotations_sized_like_the_stored_pixels_of_a_turned_image_are_refused_saying_why(tmp_path, make_coco) -> None:
    annotations, images = make_coco(size=(40, 30))
    (images / "img_1.jpg").write_bytes(_stored_turned(_upright_picture()))
    with pytest.raises(DataError, match=r"img_1\.jpg \(image id 1\): image is 30x40 \(its EXIF orientation turns the stored pixels"):
        write_shards(annotations, images, tmp_path / "out", progress=False)


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG")])
def test_grayscale_cmyk_palette_and_alpha_images_decode_to_the_same_rgb_as_pil(mode, fmt) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    data = _encoded(rgb.convert(mode), fmt)
    decoded = decode_image_bytes(data, mode).permute(1, 2, 0).numpy()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # alpha dropped, as PIL does
    assert decoded.shape == (30, 40, 3) and np.array_equal(decoded, expected)


def test_a_cmyk_jpeg_shards_and_streams_as_rgb(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    Image.new("RGB", (40, 30), (200, 40, 10)).convert("CMYK").save(images / "img_2.jpg", format="JPEG", quality=100)
    manifest = write_shards(annotations, images, tmp_path / "out", progress=False)
    table = pq.read_table(tmp_path / "out" / manifest["shards"][0]["file"])
    pixel = decode_and_transform(table.slice(1, 1), image_size=40, max_boxes=4, augment=None, seed=0)["image"][0, :, 10, 10]
    assert np.abs(pixel.astype(int) - [200, 40, 10]).max() <= 6
