"""The synthetic data set: COCO layout, valid boxes, determinism, negatives."""

import json

from PIL import Image

from anchorless.platform.data.synth import CATEGORIES, generate_synthetic_coco


def test_synthetic_set_is_valid_coco_with_boxes_inside_images(tmp_path):
    files = generate_synthetic_coco(tmp_path, num_images=40, size=160, seed=3, progress=False)
    assert set(files) == {"train", "val"}
    train = json.loads(files["train"].read_text())
    val = json.loads(files["val"].read_text())
    assert len(train["images"]) == 32 and len(val["images"]) == 8
    assert train["categories"] == CATEGORIES
    for coco in (train, val):
        ids = {image["id"] for image in coco["images"]}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert ann["image_id"] in ids
            assert w >= 6 - 0.01 and h >= 6 - 0.01
            assert 0 <= x and 0 <= y and x + w <= 160 + 0.01 and y + h <= 160 + 0.01
    image = Image.open(tmp_path / "images" / train["images"][0]["file_name"])
    assert image.size == (160, 160) and image.mode == "RGB"


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", num_images=10, seed=1, progress=False)
    b = generate_synthetic_coco(tmp_path / "b", num_images=10, seed=1, progress=False)
    c = generate_synthetic_coco(tmp_path / "c", num_images=10, seed=2, progress=False)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    for name in ("synth_000000.jpg", "synth_000009.jpg"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()


def test_every_class_and_some_empty_images_appear(tmp_path):
    files = generate_synthetic_coco(tmp_path, num_images=200, size=96, seed=0, progress=False)
    coco = json.loads(files["train"].read_text())
    used = {ann["category_id"] for ann in coco["annotations"]}
    assert used == {1, 2, 3}
    with_boxes = {ann["image_id"] for ann in coco["annotations"]}
    assert 0 < len(coco["images"]) - len(with_boxes) < 0.2 * len(coco["images"])
