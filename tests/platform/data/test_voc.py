"""Pascal VOC ingest: the same records as COCO's, VOC's own refusals, and raccoon as real data."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from anchorless.errors import DataError
from anchorless.platform.data.shards import shard_dataset, write_shards
from anchorless.platform.data.voc import XML_SIZE_DIFFERS, load_voc
from tests.platform.conftest import write_jpeg


def voc_xml(file_name: str, objects: list[dict[str, Any]], size: tuple[int, int] | None = (40, 30)) -> str:
    """An annotation as LabelImg writes it (``<path>`` of the annotator's disk included)."""
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    body = "".join(
        f"<object><name>{o['name']}</name><difficult>{o.get('difficult', 0)}</difficult>"
        f"<bndbox><xmin>{o['box'][0]}</xmin><ymin>{o['box'][1]}</ymin><xmax>{o['box'][2]}</xmax><ymax>{o['box'][3]}</ymax></bndbox></object>"
        for o in objects
    )
    return f"<annotation><folder>images</folder><filename>{file_name}</filename><path>/Users/me/{file_name}</path>{size_xml}{body}</annotation>"


@pytest.fixture
def voc(tmp_path: Path):
    """Three 40x30 images: two cats and a dog on 1, a difficult dog on 2, nothing on 3."""
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    objects = {
        "a": [{"name": "cat", "box": (2, 3, 12, 11)}, {"name": "dog", "box": (20, 5, 35, 25)}, {"name": "cat", "box": (5.5, 6.25, 10, 10)}],
        "b": [{"name": "dog", "box": (0, 0, 40, 30), "difficult": 1}],
        "c": [],
    }
    for seed, (stem, found) in enumerate(objects.items()):
        write_jpeg(root / "JPEGImages" / f"{stem}.jpg", 40, 30, seed=seed)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", found))
    return root


def test_objects_become_xyxy_boxes_with_classes_sorted_by_name_and_ids_in_file_order(voc) -> None:
    dataset = load_voc(voc / "Annotations", voc / "JPEGImages")
    assert [(c.coco_id, c.label, c.name) for c in dataset.categories] == [(1, 0, "cat"), (2, 1, "dog")]
    first, second, third = dataset.images
    assert [(r.image_id, r.file_name, r.width, r.height) for r in dataset.images] == [
        (1, "a.jpg", 40, 30), (2, "b.jpg", 40, 30), (3, "c.jpg", 40, 30)
    ]
    assert first.boxes.tolist() == [[2, 3, 12, 11], [20, 5, 35, 25], [5.5, 6.25, 10, 10]]
    assert first.labels.tolist() == [0, 1, 0] and first.areas.tolist() == [80, 300, pytest.approx(4.5 * 3.75)]
    assert third.boxes.shape == (0, 4)
    assert dataset.source_format == "voc" and len(dataset.annotations_sha256) == 64


def test_difficult_objects_become_crowd_boxes_that_training_leaves_out_and_evaluation_ignores(voc) -> None:
    second = load_voc(voc / "Annotations", voc / "JPEGImages").images[1]
    assert second.iscrowd.tolist() == [True]


def test_a_names_file_fixes_the_class_order_and_an_unknown_class_is_refused(voc, tmp_path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\nbird\n")
    dataset = load_voc(voc / "Annotations", voc / "JPEGImages", names=names)
    assert [c.name for c in dataset.categories] == ["dog", "cat", "bird"]
    assert dataset.images[0].labels.tolist() == [1, 0, 1]
    names.write_text("dog\n")
    with pytest.raises(DataError, match=r"a\.xml: object #1: class 'cat' is not in the class names \(dog\)"):
        load_voc(voc / "Annotations", voc / "JPEGImages", names=names)


def test_a_split_takes_its_images_in_its_order_and_keeps_the_whole_folders_classes(voc, tmp_path) -> None:
    split = tmp_path / "val.txt"
    split.write_text("c\n\nb  # hard one\n")
    dataset = load_voc(voc / "Annotations", voc / "JPEGImages", split=split)
    assert [(r.image_id, r.file_name) for r in dataset.images] == [(1, "c.jpg"), (2, "b.jpg")]
    assert [c.name for c in dataset.categories] == ["cat", "dog"]  # cat is not in this split, still label 0


def test_the_images_real_size_wins_over_an_xml_size_that_disagrees_and_is_counted(voc) -> None:
    (voc / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", [{"name": "cat", "box": (2, 3, 38, 28)}], size=(400, 300)))
    dataset = load_voc(voc / "Annotations", voc / "JPEGImages")
    assert (dataset.images[0].width, dataset.images[0].height) == (40, 30)
    assert dataset.corrected == {XML_SIZE_DIFFERS: 1}


def test_zero_size_boxes_are_dropped_and_boxes_poking_out_are_clipped_and_counted(voc) -> None:
    boxes = [{"name": "cat", "box": (5, 5, 5, 9)}, {"name": "cat", "box": (30, 20, 50, 40)}, {"name": "dog", "box": (50, 5, 60, 9)}]
    (voc / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", boxes))
    dataset = load_voc(voc / "Annotations", voc / "JPEGImages")
    assert dataset.images[0].boxes.tolist() == [[30, 20, 40, 30]]
    assert dataset.dropped == {"box_outside_image": 1, "zero_size_box": 1}
    assert dataset.clipped == {"box_extends_outside_image": 1}


def test_the_image_is_found_by_the_xml_stem_when_filename_is_wrong(voc) -> None:
    (voc / "Annotations" / "a.xml").write_text(voc_xml("IMG_0001.JPG", []))
    assert load_voc(voc / "Annotations", voc / "JPEGImages").images[0].file_name == "a.jpg"


BAD_VOC = [
    ("malformed xml", "a.xml", "<annotation><object>", r"a\.xml: malformed XML \(no element found: line 1, column 20\)"),
    ("not voc", "a.xml", "<coco/>", r"a\.xml: root element is <coco>, expected <annotation>"),
    ("no bndbox", "a.xml", "<annotation><filename>a.jpg</filename><object><name>cat</name></object></annotation>", r"a\.xml: object #1 \(cat\): no <bndbox>"),
    ("no name", "a.xml", "<annotation><object><name> </name></object></annotation>", r"a\.xml: object #1: no <name>"),
    ("text coordinate", "a.xml", voc_xml("a.jpg", [{"name": "cat", "box": (1, 2, "ten", 9)}]), r"a\.xml: object #1 \(cat\): <xmax> must be a number, got 'ten'"),
    ("difficult 2", "a.xml", voc_xml("a.jpg", [{"name": "cat", "box": (1, 2, 3, 4), "difficult": 2}]), r"<difficult> must be 0 or 1, got '2'"),
    ("two xml one image", "c.xml", voc_xml("a.jpg", []), r"c\.xml: names image 'a\.jpg', which a\.xml names too"),
    ("filename escapes", "a.xml", voc_xml("../secret.jpg", []), r"a\.xml: <filename>: file_name '\.\./secret\.jpg' escapes the image root"),
]


@pytest.mark.parametrize("case, name, text, pattern", BAD_VOC, ids=[case[0] for case in BAD_VOC])
def test_bad_voc_input_is_refused_naming_file_object_and_problem(voc, case, name, text, pattern) -> None:
    (voc / "Annotations" / name).write_text(text)
    with pytest.raises(DataError) as info:
        load_voc(voc / "Annotations", voc / "JPEGImages")
    assert re.search(pattern, str(info.value)), str(info.value)


def test_a_split_naming_a_missing_annotation_is_refused_with_its_line(voc, tmp_path) -> None:
    split = tmp_path / "train.txt"
    split.write_text("a\nzebra\n")
    with pytest.raises(DataError, match=r"train\.txt: line 2: no annotation file .*zebra\.xml"):
        load_voc(voc / "Annotations", voc / "JPEGImages", split=split)


def test_a_missing_image_is_listed_as_a_bad_image_and_skipping_it_drops_its_boxes(voc, tmp_path) -> None:
    os.remove(voc / "JPEGImages" / "b.jpg")
    with pytest.raises(DataError, match=r"b\.jpg \(image id 2, b\.xml\): missing image file"):
        shard_dataset(lambda: load_voc(voc / "Annotations", voc / "JPEGImages"), tmp_path / "out", workers=1, progress=False)
    manifest = shard_dataset(
        lambda: load_voc(voc / "Annotations", voc / "JPEGImages"), tmp_path / "out", workers=1, progress=False, skip_bad_images=True
    )
    assert manifest["num_images"] == 2 and manifest["dropped"] == {"image_skipped": 1}
    assert [(s["file_name"], s["image_id"]) for s in manifest["skipped_images"]] == [("b.jpg", 2)]


def test_raccoon_from_voc_with_its_own_splits_gives_the_shards_of_its_coco_json(raccoon, tmp_path) -> None:
    for split, (num_images, num_boxes) in {"train": (160, 173), "val": (40, 44)}.items():
        from_voc = shard_dataset(
            lambda: load_voc(raccoon / "annotations", raccoon / "images", split=raccoon / "splits" / f"{split}.txt"),
            tmp_path / f"voc-{split}", workers=2, progress=False,
        )  # fmt: skip
        from_coco = write_shards(raccoon / "coco" / f"instances_{split}.json", raccoon / "images", tmp_path / f"coco-{split}", workers=2, progress=False)
        assert (from_voc["num_images"], from_voc["num_boxes"]) == (num_images, num_boxes)
        assert from_voc["source"]["format"] == "voc" and from_coco["source"]["format"] == "coco"
        assert {k: v for k, v in from_voc.items() if k != "source"} == {k: v for k, v in from_coco.items() if k != "source"}
        for shard in from_voc["shards"]:
            assert (tmp_path / f"voc-{split}" / shard["file"]).read_bytes() == (tmp_path / f"coco-{split}" / shard["file"]).read_bytes()


def test_the_command_line_shards_a_voc_folder_and_says_which_flags_a_format_needs(voc, tmp_path, capsys) -> None:
    from anchorless.jobs.cli import main

    with pytest.raises(SystemExit, match=r"--format yolo: needs --labels and --names"):
        main(["data", "shard", "--format", "yolo", "--images", str(voc / "JPEGImages"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"--format voc: --labels belongs to another format"):
        main(["data", "shard", "--format", "voc", "--annotations", str(voc / "Annotations"), "--labels", "x",
              "--images", str(voc / "JPEGImages"), "--out", str(tmp_path / "x")])  # fmt: skip
    code = main(["data", "shard", "--format", "voc", "--annotations", str(voc / "Annotations"),
                 "--images", str(voc / "JPEGImages"), "--out", str(tmp_path / "out"), "--workers", "1"])  # fmt: skip
    assert code == 0
    assert "3 images, 4 boxes in 1 shard(s) (source voc Annotations" in capsys.readouterr().out
