"""Inputs a user can get wrong, tried as a user would: each ends in a clear error naming the
file, the record and the problem (and nothing written), or in shards with the repair counted."""

from __future__ import annotations

import json
import os
import re
import unicodedata
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anchorless.errors import DataError
from anchorless.jobs.cli import main
from anchorless.platform.data.coco import FILE_NAME_UNICODE_FORM, ImageRecord, verify_image_bytes
from anchorless.platform.data.shards import read_manifest, write_shards

BEYOND_64_BITS = 2**64 + 1


def _leftovers(parent: Path) -> list[str]:
    return sorted(name for name in os.listdir(parent) if name.startswith(("out", ".out")))


def _refusal(tmp_path: Path, make_coco, edit, *, workers: int = 1, **options) -> str:
    annotations, images = make_coco(edit)
    with pytest.raises(DataError) as info:
        write_shards(annotations, images, tmp_path / "out", progress=False, workers=workers, **options)
    assert _leftovers(tmp_path) == []
    return str(info.value)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda c: c["images"][0].update(id=BEYOND_64_BITS), rf"image id {BEYOND_64_BITS}: 'id' {BEYOND_64_BITS} does not fit in 64 bits"),
        (
            lambda c: c["annotations"][2].update(id=-BEYOND_64_BITS),
            rf"annotation id -{BEYOND_64_BITS}: 'id' -{BEYOND_64_BITS} does not fit in 64 bits",
        ),
        (lambda c: c["categories"][0].update(id=BEYOND_64_BITS), rf"category id {BEYOND_64_BITS}: 'id' {BEYOND_64_BITS} does not fit"),
        (lambda c: c["images"][1].update(width=2**40), r"image id 2: 'width' is 1099511627776, beyond any image"),
        (lambda c: c["annotations"][1].update(id=10), r"annotation id 10: duplicate annotation id"),
        (lambda c: c["annotations"][0].update(image_id=[1]), r"annotation id 10: image_id \[1\] is not in 'images'"),
        (lambda c: c["annotations"][0].update(category_id={"id": 7}), r"annotation id 10: category_id \{'id': 7\} is not in"),
        (lambda c: c["images"][0].update(file_name="img\x00.jpg"), r"image id 1: file_name 'img\\x00\.jpg' holds a NUL"),
        (lambda c: c["images"][0].update(file_name="\ud800.jpg"), r"image id 1: 'file_name' '\\ud800\.jpg' is not valid Unicode"),
        (lambda c: c["categories"][1].update(name="x\udfff"), r"category id 3: 'name' 'x\\udfff' is not valid Unicode"),
    ],
    ids=["image-id", "annotation-id", "category-id", "width", "duplicate-annotation", "list-image-id",
         "dict-category-id", "nul-file-name", "surrogate-file-name", "surrogate-category"],
)  # fmt: skip
def test_ids_and_names_the_shards_cannot_hold_are_refused_naming_the_record(tmp_path, make_coco, edit, pattern) -> None:
    message = _refusal(tmp_path, make_coco, edit)
    assert re.search(r"instances\.json: " + pattern, message), message


def test_an_empty_images_list_is_refused_not_sharded_into_an_empty_data_set(tmp_path, make_coco, capsys) -> None:
    annotations, images = make_coco(lambda c: (c.update(images=[], annotations=[])))
    code = main(["data", "shard", "--annotations", str(annotations), "--images", str(images), "--out", str(tmp_path / "out")])
    assert code == 2
    assert re.search(r"error: .*instances\.json: no images \(an empty split\); nothing was written", capsys.readouterr().err)
    assert _leftovers(tmp_path) == []


def test_a_split_whose_every_image_is_bad_is_refused_even_when_skipping(tmp_path, make_coco) -> None:
    def break_all(coco):
        coco["images"] = coco["images"][:2]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] <= 2]

    annotations, images = make_coco(break_all)
    for name in ("img_1.jpg", "img_2.jpg"):
        (images / name).write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"instances\.json: all 2 images are bad, none left to shard") as info:
        write_shards(annotations, images, tmp_path / "out", progress=False, workers=1, skip_bad_images=True)
    assert "img_1.jpg (image id 1): not an image file" in str(info.value)
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A 20,000 x 10,000 PNG (200 Mpx) of 24 kB: zeros compress to almost nothing."""
    buffer = BytesIO()
    Image.new("1", (20_000, 10_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_decompression_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(tmp_path, bomb_png, monkeypatch) -> None:
    from PIL import ImageFile

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    record = ImageRecord(1, "bomb.png", tmp_path / "bomb.png", 20_000, 10_000, *(np.zeros(0),) * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not PIL's warning: our refusal
        with pytest.raises(DataError, match=r"bomb\.png \(image id 1\): image is 20000x10000 = 200,000,000 pixels, above the limit of 100,000,000"):
            verify_image_bytes(bomb_png, record)


def test_the_pixel_limit_is_configurable_and_a_bomb_is_a_bad_image_of_the_shard_run(tmp_path, make_coco, bomb_png) -> None:
    message = _refusal(tmp_path, make_coco, None, max_image_pixels=40 * 30 - 1)  # the 40x30 images are one pixel too many
    assert "3 bad images" in message and "above the limit of 1,199" in message
    annotations, images = make_coco()
    (images / "img_3.jpg").write_bytes(bomb_png)
    manifest = write_shards(annotations, images, tmp_path / "out", progress=False, workers=1, skip_bad_images=True)
    assert manifest["num_images"] == 2
    assert "200,000,000 pixels, above the limit" in manifest["skipped_images"][0]["problem"]


def test_a_file_name_stored_on_disk_in_another_unicode_form_is_found_and_counted(tmp_path, make_coco) -> None:
    composed = unicodedata.normalize("NFC", "caf\u00e9/\u00e9t\u00e9.jpg")  # what the JSON says

    def rename(coco):
        coco["images"][0]["file_name"] = composed

    annotations, images = make_coco(rename)
    decomposed = images / unicodedata.normalize("NFD", composed)  # what the disk holds (macOS, some archivers)
    decomposed.parent.mkdir()
    (images / "img_1.jpg").rename(decomposed)
    assert not (images / composed).exists()
    manifest = write_shards(annotations, images, tmp_path / "out", progress=False, workers=1)
    assert manifest["num_images"] == 3 and manifest["skipped_images"] == []
    assert manifest["corrected"] == {FILE_NAME_UNICODE_FORM: 1}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == read_manifest(tmp_path / "out")
