"""YOLO label folders: the same shards as COCO for the same data, and YOLO's own refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from anchorless.errors import DataError
from anchorless.platform.data.labels import read_class_names
from anchorless.platform.data.shards import shard_dataset, write_shards
from anchorless.platform.data.synth import CATEGORIES, generate_synthetic_coco
from anchorless.platform.data.yolo import load_yolo
from tests.platform.conftest import write_jpeg, write_yolo_labels


@pytest.fixture
def yolo(tmp_path: Path):
    """Two 40x30 images under images/, their labels under labels/, names in data.yaml."""
    root = tmp_path / "yolo"
    for seed, stem in enumerate(("a", "b")):
        write_jpeg(root / "images" / f"{stem}.jpg", 40, 30, seed=seed)
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n\n0 0.25 0.2 0.1 0.2\n")
    (root / "labels" / "b.txt").write_text("")
    (root / "data.yaml").write_text("path: .\ntrain: images\nnames:\n  0: cat\n  1: dog\n")
    return root


def _load(root: Path):
    return load_yolo(root / "labels", root / "images", root / "data.yaml")


def test_normalised_centre_boxes_become_pixel_xyxy_with_classes_from_data_yaml(yolo) -> None:
    dataset = _load(yolo)
    assert [(c.coco_id, c.label, c.name) for c in dataset.categories] == [(1, 0, "cat"), (2, 1, "dog")]
    first, second = dataset.images
    assert (first.image_id, first.file_name, first.width, first.height) == (1, "a.jpg", 40, 30)
    assert first.boxes.tolist() == [[10, 7.5, 30, 22.5], [8, 3, 12, 9]]
    assert first.labels.tolist() == [1, 0] and first.iscrowd.tolist() == [False, False]
    assert second.boxes.shape == (0, 4)
    assert dataset.source_format == "yolo"


def test_class_names_read_from_a_yaml_list_or_a_plain_names_file(tmp_path) -> None:
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    (tmp_path / "classes.names").write_text("cat\n\ndog\n")
    assert read_class_names(tmp_path / "data.yaml") == read_class_names(tmp_path / "classes.names") == ["cat", "dog"]
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    with pytest.raises(DataError, match=r"twice\.txt: class name 'cat' is listed twice \(ids 0 and 1\)"):
        read_class_names(tmp_path / "twice.txt")


def test_an_image_without_a_label_file_is_a_negative(yolo) -> None:
    (yolo / "labels" / "b.txt").unlink()
    assert _load(yolo).images[1].boxes.shape == (0, 4)


def test_zero_size_boxes_are_dropped_and_boxes_poking_out_are_clipped_and_counted(yolo) -> None:
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0 0.2\n0 0.9 0.5 0.4 0.2\n")
    dataset = _load(yolo)
    assert dataset.images[0].boxes.tolist() == [[28, 12, 40, 18]]
    assert dataset.dropped == {"zero_size_box": 1} and dataset.clipped == {"box_extends_outside_image": 1}


BAD_LINES = [
    ("four fields", "0 0.5 0.5 0.2\n", r"a\.txt: line 1: expected 5 fields 'class cx cy w h', got 4"),
    ("polygon", "0 0.1 0.1 0.2 0.1 0.2 0.2\n", r"a\.txt: line 1: expected 5 fields .*got 7 \(a segmentation polygon\? only boxes are read\)"),
    ("pixels", "0 0.5 0.5 0.2 0.2\n1 20 15 10 10\n", r"a\.txt: line 2: cx cy w h must be normalised to 0-1, got 20 15 10 10 \(pixels\?\)"),
    ("negative", "0 0.5 -0.1 0.2 0.2\n", r"a\.txt: line 1: cx cy w h must be normalised to 0-1"),
    ("class past names", "2 0.5 0.5 0.2 0.2\n", r"a\.txt: line 1: class id 2 is past the 2 names in .*data\.yaml"),
    ("class not an integer", "dog 0.5 0.5 0.2 0.2\n", r"a\.txt: line 1: class id must be an integer, got 'dog'"),
    ("text value", "0 0.5 0.5 wide 0.2\n", r"a\.txt: line 1: cx cy w h must be numbers"),
]


@pytest.mark.parametrize("case, text, pattern", BAD_LINES, ids=[case[0] for case in BAD_LINES])
def test_a_bad_label_line_is_refused_naming_file_line_and_problem(yolo, case, text, pattern) -> None:
    (yolo / "labels" / "a.txt").write_text(text)
    with pytest.raises(DataError) as info:
        _load(yolo)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_two_images_with_one_stem_are_refused_as_duplicate_file_names(yolo) -> None:
    write_jpeg(yolo / "images" / "a.png", 40, 30)
    with pytest.raises(DataError, match=r"a\.png: duplicate file name: a\.jpg has the same stem"):
        _load(yolo)


def test_a_label_file_without_its_image_is_a_bad_image(yolo, tmp_path) -> None:
    (yolo / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"ghost\.txt: label file without an image"):
        shard_dataset(lambda: _load(yolo), tmp_path / "out", workers=1, progress=False)
    manifest = shard_dataset(lambda: _load(yolo), tmp_path / "out", workers=1, progress=False, skip_bad_images=True)
    assert manifest["num_images"] == 2 and [s["file_name"] for s in manifest["skipped_images"]] == ["ghost.txt"]


def test_the_synthetic_set_as_yolo_labels_gives_the_shards_of_its_coco_json(tmp_path) -> None:
    """The same images and boxes from both formats. YOLO has no ``area``: the COCO side leaves it
    out too, and both take the box's area, as COCO ingest does for a missing ``area``."""
    files = generate_synthetic_coco(tmp_path / "synth", num_images=24, size=64, seed=3, val_fraction=0.25, progress=False)
    coco = json.loads(files["train"].read_text())
    for ann in coco["annotations"]:
        del ann["area"]
    files["train"].write_text(json.dumps(coco))
    write_yolo_labels(coco, tmp_path / "labels")
    (tmp_path / "images_train").mkdir()
    for image in coco["images"]:  # YOLO reads every image of its folder: the train split's only
        (tmp_path / "images_train" / image["file_name"]).symlink_to(tmp_path / "synth" / "images" / image["file_name"])
    (tmp_path / "names.txt").write_text("".join(f"{c['name']}\n" for c in CATEGORIES))

    from_coco = write_shards(files["train"], tmp_path / "synth" / "images", tmp_path / "coco", target_shard_mb=0.01, workers=1, progress=False)
    from_yolo = shard_dataset(
        lambda: load_yolo(tmp_path / "labels", tmp_path / "images_train", tmp_path / "names.txt"),
        tmp_path / "yolo", target_shard_mb=0.01, workers=1, progress=False,
    )  # fmt: skip
    assert from_coco["num_images"] == 18 and from_coco["num_boxes"] > 30 and len(from_coco["shards"]) > 1
    assert {k: v for k, v in from_yolo.items() if k != "source"} == {k: v for k, v in from_coco.items() if k != "source"}
    for shard in from_coco["shards"]:
        assert (tmp_path / "yolo" / shard["file"]).read_bytes() == (tmp_path / "coco" / shard["file"]).read_bytes()
