"""COCO ingest: conversion, repairs that are counted, and refusals that name the record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from anchorless.platform.data.coco import Category, ImageRecord, load_coco, verify_image_bytes
from anchorless.errors import DataError


def test_categories_become_contiguous_labels_in_coco_id_order(make_coco) -> None:
    annotations, images = make_coco()
    dataset = load_coco(annotations, images)
    assert dataset.categories == [Category(coco_id=3, label=0, name="three"), Category(coco_id=7, label=1, name="seven")]


def test_bbox_xywh_becomes_xyxy_with_labels_crowd_and_area(make_coco) -> None:
    annotations, images = make_coco()
    first, second, third = load_coco(annotations, images).images
    assert first.boxes.tolist() == [[2, 3, 12, 11], [20, 5, 35, 25]]
    assert first.labels.tolist() == [1, 0] and first.iscrowd.tolist() == [False, False]
    assert second.boxes.tolist() == [[0, 0, 40, 30], [5.5, 6.25, 10, 10]]
    assert second.iscrowd.tolist() == [True, False]
    assert second.areas.tolist() == [1000.0, pytest.approx(4.5 * 3.75)]  # missing area: the box's
    assert third.boxes.shape == (0, 4)  # an image without boxes is kept as a negative


def test_source_json_sha256_is_recorded(make_coco) -> None:
    import hashlib

    annotations, images = make_coco()
    assert load_coco(annotations, images).annotations_sha256 == hashlib.sha256(annotations.read_bytes()).hexdigest()


def test_zero_and_negative_size_boxes_are_dropped_and_counted(make_coco) -> None:
    def edit(coco):
        coco["annotations"][0]["bbox"] = [5, 5, 0, 0]
        coco["annotations"][1]["bbox"] = [5, 5, 4, -1]

    dataset = load_coco(*make_coco(edit))
    assert dataset.dropped == {"negative_size_box": 1, "zero_size_box": 1}
    assert dataset.num_boxes == 2


def test_box_extending_outside_the_image_is_clipped_and_counted(make_coco) -> None:
    def edit(coco):
        coco["annotations"][0]["bbox"] = [-4, 20, 10, 20]  # 40x30 image: clipped left and bottom
        coco["annotations"][1]["bbox"] = [50, 5, 10, 10]  # entirely outside: nothing left to keep

    dataset = load_coco(*make_coco(edit))
    assert dataset.images[0].boxes.tolist() == [[0, 20, 6, 30]]
    assert dataset.clipped == {"box_extends_outside_image": 1}
    assert dataset.dropped == {"box_outside_image": 1}


def test_bccd_splits_match_the_readme_and_drop_one_zero_size_box_in_train_and_val(bccd: Path) -> None:
    expected = {"train": (205, 2805, 1), "val": (87, 1138, 1), "test": (72, 945, 0)}
    for split, (num_images, num_boxes, zero_size) in expected.items():
        dataset = load_coco(bccd / "annotations" / f"instances_{split}.json", bccd / "images")
        assert len(dataset.images) == num_images
        assert dataset.num_boxes + zero_size == num_boxes
        assert dataset.dropped == ({"zero_size_box": zero_size} if zero_size else {})
        assert [c.name for c in dataset.categories] == ["RBC", "WBC", "Platelets"]


# --- refusals: each names the file, the record and the problem (write_shards tests add
# --- "and leaves no partial output" for the same cases) --------------------------------------


def _refusal(make_coco, edit) -> str:
    with pytest.raises(DataError) as info:
        load_coco(*make_coco(edit))
    return str(info.value)


def test_unknown_category_is_refused_naming_the_annotation(make_coco) -> None:
    message = _refusal(make_coco, lambda coco: coco["annotations"][2].update(category_id=99))
    assert re.search(r"instances\.json: annotation id 12: category_id 99 is not in 'categories'", message)


def test_bbox_that_is_not_four_numbers_is_refused(make_coco) -> None:
    message = _refusal(make_coco, lambda coco: coco["annotations"][0].update(bbox=[1, 2, 3]))
    assert "annotation id 10: 'bbox' must be [x, y, width, height]" in message


def test_image_without_width_is_refused(make_coco) -> None:
    message = _refusal(make_coco, lambda coco: coco["images"][1].pop("width"))
    assert "image id 2: 'width' must be a positive integer" in message


def test_duplicate_category_id_is_refused(make_coco) -> None:
    message = _refusal(make_coco, lambda coco: coco["categories"].append({"id": 7, "name": "again"}))
    assert "category id 7: duplicate category id" in message


def _record(tmp_path: Path, data: bytes, size=(40, 30)) -> ImageRecord:
    path = tmp_path / "x.jpg"
    return ImageRecord(1, "x.jpg", path, size[0], size[1], np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros(0))


def test_image_whose_size_differs_from_the_json_is_refused(make_coco, tmp_path) -> None:
    annotations, images = make_coco()
    data = (images / "img_1.jpg").read_bytes()
    with pytest.raises(DataError, match=r"x\.jpg \(image id 1\): image is 40x30 but the annotations say 64x30"):
        verify_image_bytes(data, _record(tmp_path, data, size=(64, 30)))


def test_non_json_annotations_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "instances.json"
    bad.write_text(json.dumps({"images": []})[:-3])
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"instances\.json: not valid JSON"):
        load_coco(bad, tmp_path / "images")
