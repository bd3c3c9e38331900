"""Parquet shards + manifest: contents, repairs, refusals, atomicity, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from anchorless.errors import DataError
from anchorless.platform.data import shards as shards_module
from anchorless.platform.data.shards import (
    _move_into_place,
    coco_ground_truth,
    format_manifest_summary,
    read_manifest,
    write_shards,
)


def _leftovers(parent: Path) -> list[str]:
    """Anything a failed run may have left: the output or a temporary sibling."""
    return sorted(name for name in os.listdir(parent) if name.startswith(("out", ".out")))


def _truncate(images: Path) -> None:
    data = (images / "img_2.jpg").read_bytes()
    (images / "img_2.jpg").write_bytes(data[: len(data) // 2])


# (case, edit of the COCO dict, edit of the image folder, expected message pattern)
BAD_INPUTS = [
    ("malformed json", "truncate-json", None, r"instances\.json: not valid JSON"),
    ("no images key", lambda c: c.pop("images"), None, r"instances\.json: missing top-level key 'images'"),
    ("no annotations key", lambda c: c.pop("annotations"), None, r"instances\.json: missing top-level key 'annotations'"),
    ("no categories key", lambda c: c.pop("categories"), None, r"instances\.json: missing top-level key 'categories'"),
    ("duplicate image id", lambda c: c["images"][2].update(id=1), None, r"instances\.json: image id 1: duplicate image id"),
    (
        "unknown image",
        lambda c: c["annotations"][1].update(image_id=42),
        None,
        r"instances\.json: annotation id 11: image_id 42 is not in 'images'",
    ),
    (
        "unknown category",
        lambda c: c["annotations"][3].update(category_id=5),
        None,
        r"instances\.json: annotation id 13: category_id 5 is not in 'categories'",
    ),
    (
        "file_name with ..",
        lambda c: c["images"][0].update(file_name="../img_1.jpg"),
        None,
        r"instances\.json: image id 1: file_name '\.\./img_1\.jpg' escapes the image root",
    ),
    (
        "file_name with .. inside",
        lambda c: c["images"][0].update(file_name="sub/../../secret.jpg"),
        None,
        r"image id 1: file_name 'sub/\.\./\.\./secret\.jpg' escapes the image root",
    ),
    (
        "absolute file_name",
        lambda c: c["images"][1].update(file_name="/etc/passwd"),
        None,
        r"instances\.json: image id 2: file_name '/etc/passwd' is absolute",
    ),
    (
        "missing image file",
        None,
        lambda images: (images / "img_3.jpg").unlink(),
        r"img_3\.jpg \(image id 3 in .*instances\.json\): missing image file",
    ),
    ("truncated image", None, _truncate, r"img_2\.jpg \(image id 2\): unreadable or truncated image"),
    (
        "not an image",
        None,
        lambda images: (images / "img_1.jpg").write_text("this is not a JPEG"),
        r"img_1\.jpg \(image id 1\): not an image file",
    ),
]


@pytest.mark.parametrize("case, edit_coco, edit_images, pattern", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_refused_with_file_record_and_problem_and_leaves_no_output(
    tmp_path, make_coco, case, edit_coco, edit_images, pattern
) -> None:
    annotations, images = make_coco(edit_coco if callable(edit_coco) else None)
    if edit_coco == "truncate-json":
        annotations.write_text(annotations.read_text()[:-10])
    if edit_images is not None:
        edit_images(images)
    out_parent = tmp_path / "shards"
    out_parent.mkdir()
    # one image per shard, so image checks run in the writer processes of the pool
    with pytest.raises(DataError) as info:
        write_shards(annotations, images, out_parent / "out", target_shard_mb=1e-6, workers=2, progress=False)
    message = str(info.value)
    assert re.search(pattern, message), message
    assert "\n" not in message
    assert _leftovers(out_parent) == []


def test_a_failed_rerun_keeps_the_previous_shards(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    out = tmp_path / "out"
    write_shards(annotations, images, out, progress=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    (images / "img_2.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="img_2.jpg"):
        write_shards(annotations, images, out, progress=False)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert _leftovers(tmp_path) == ["out"]


def test_refuses_to_replace_a_directory_that_is_not_a_shard_directory(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"out: exists and is not a shard directory \(no manifest\.json\)"):
        write_shards(annotations, images, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_manifest_records_categories_counts_checksums_and_repairs(tmp_path, make_coco) -> None:
    def edit(coco):
        coco["annotations"].append({"id": 14, "image_id": 3, "category_id": 7, "bbox": [1, 1, 0, 5]})
        coco["annotations"].append({"id": 15, "image_id": 3, "category_id": 3, "bbox": [30, 20, 20, 20]})

    annotations, images = make_coco(edit)
    out = tmp_path / "out"
    manifest = write_shards(annotations, images, out, target_shard_mb=1e-6, workers=1, progress=False)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["categories"] == [
        {"label": 0, "coco_id": 3, "name": "three"},
        {"label": 1, "coco_id": 7, "name": "seven"},
    ]
    assert manifest["num_images"] == 3 and manifest["num_boxes"] == 5 and manifest["num_crowd_boxes"] == 1
    assert manifest["dropped"] == {"zero_size_box": 1}
    assert manifest["clipped"] == {"box_extends_outside_image": 1}
    assert manifest["source"] == {
        "format": "coco",
        "annotations": "instances.json",
        "sha256": hashlib.sha256(annotations.read_bytes()).hexdigest(),
    }
    assert [(s["num_images"], s["num_boxes"]) for s in manifest["shards"]] == [(1, 2), (1, 2), (1, 1)]
    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    summary = format_manifest_summary(manifest, out)
    assert "3 images, 5 boxes in 3 shard(s)" in summary and "dropped boxes: zero_size_box=1" in summary


def test_rows_hold_the_stored_bytes_and_flat_xyxy_boxes(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    manifest = write_shards(annotations, images, tmp_path / "out", progress=False)
    table = pq.read_table(tmp_path / "out" / manifest["shards"][0]["file"])
    rows = table.to_pylist()
    assert [row["image_id"] for row in rows] == [1, 2, 3]
    assert rows[0]["image"] == (images / "img_1.jpg").read_bytes()  # not re-encoded
    assert rows[0]["boxes"] == [2, 3, 12, 11, 20, 5, 35, 25] and rows[0]["labels"] == [1, 0]
    assert rows[1]["iscrowd"] == [True, False]
    assert rows[2]["boxes"] == [] and (rows[2]["width"], rows[2]["height"]) == (40, 30)


def test_rerun_gives_byte_identical_shards_and_manifest(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    first = write_shards(annotations, images, tmp_path / "a", target_shard_mb=1e-6, workers=2, progress=False)
    second = write_shards(annotations, images, tmp_path / "b", target_shard_mb=1e-6, workers=1, progress=False)
    assert first == second
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and len(names) == 4
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # writing over an earlier shard directory replaces it with the same bytes
    third = write_shards(annotations, images, tmp_path / "a", target_shard_mb=1e-6, progress=False)
    assert third == first and sorted(os.listdir(tmp_path / "a")) == names


def test_verify_names_a_shard_whose_bytes_changed(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    out = tmp_path / "out"
    manifest = write_shards(annotations, images, out, target_shard_mb=1e-6, workers=1, progress=False)
    assert read_manifest(out, verify=True) == manifest
    victim = out / manifest["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {manifest['shards'][1]['file']} has sha256 .* corrupt"):
        read_manifest(out, verify=True)


def test_reading_a_directory_without_manifest_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match=r"manifest\.json: no manifest; not a shard directory"):
        read_manifest(tmp_path)


def test_coco_ground_truth_rebuilds_the_source_annotations(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    write_shards(annotations, images, tmp_path / "out", target_shard_mb=1e-6, workers=1, progress=False)
    source = json.loads(annotations.read_text())
    truth = coco_ground_truth(tmp_path / "out")
    assert truth["images"] == source["images"]
    assert truth["categories"] == [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    rebuilt = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"], a["area"]) for a in truth["annotations"]]
    expected = [
        (a["image_id"], a["category_id"], [float(v) for v in a["bbox"]], a["iscrowd"], float(a.get("area", a["bbox"][2] * a["bbox"][3])))
        for a in source["annotations"]
    ]
    assert rebuilt == expected
    assert [a["id"] for a in truth["annotations"]] == [1, 2, 3, 4]
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = truth
    coco.createIndex()
    assert len(coco.getAnnIds()) == 4


def test_output_uri_goes_through_pyarrow_filesystems(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    uri = f"file://{tmp_path / 'out'}"
    manifest = write_shards(annotations, images, uri, progress=False)
    assert read_manifest(uri, verify=True) == manifest
    assert coco_ground_truth(uri)["images"][0]["id"] == 1


def test_object_store_placement_moves_shards_then_writes_the_manifest_last(tmp_path, monkeypatch) -> None:
    # SubTreeFileSystem is not a LocalFileSystem, so this takes the object-store path.
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "shard-00000.parquet").write_text("new shard")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("old")
    (tmp_path / "out" / "shard-00009.parquet").write_text("stale")
    written = []
    original = shards_module._write_bytes

    def spy(filesystem, path, data):
        written.append((path, sorted(os.listdir(tmp_path / "out"))))
        original(filesystem, path, data)

    monkeypatch.setattr(shards_module, "_write_bytes", spy)
    _move_into_place(store, "tmp", "out", "s3://bucket/out", b"new manifest")
    assert written == [("out/manifest.json", ["shard-00000.parquet"])]  # every shard in place before it
    assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", "shard-00000.parquet"]
    assert (tmp_path / "out" / "manifest.json").read_text() == "new manifest"
    assert not (tmp_path / "tmp").exists()


def test_bccd_shards_drop_the_two_zero_size_boxes_and_keep_every_image(tmp_path, bccd: Path) -> None:
    expected = {"train": (205, 2805, 1), "val": (87, 1138, 1), "test": (72, 945, 0)}
    for split, (num_images, boxes_in_json, zero_size) in expected.items():
        manifest = write_shards(
            bccd / "annotations" / f"instances_{split}.json", bccd / "images", tmp_path / split, workers=2, progress=False
        )
        assert manifest["num_images"] == num_images
        assert manifest["num_boxes"] == boxes_in_json - zero_size
        assert manifest["dropped"] == ({"zero_size_box": zero_size} if zero_size else {})
        assert manifest["clipped"] == {}
        assert sum(shard["num_images"] for shard in manifest["shards"]) == num_images


def _break_three_images(images: Path) -> None:
    (images / "img_1.jpg").write_text("this is not a JPEG")
    _truncate(images)  # img_2
    (images / "img_3.jpg").unlink()


def test_every_bad_image_is_listed_in_one_error_and_nothing_is_written(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    _break_three_images(images)
    with pytest.raises(DataError) as info:
        write_shards(annotations, images, tmp_path / "out", target_shard_mb=1e-6, workers=2, progress=False)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("3 bad images; nothing was written (--skip-bad-images")
    assert re.search(r"img_3\.jpg \(image id 3 in .*instances\.json\): missing image file", lines[1])
    assert re.search(r"img_1\.jpg \(image id 1\): not an image file", lines[2])
    assert re.search(r"img_2\.jpg \(image id 2\): unreadable or truncated image", lines[3])
    assert _leftovers(tmp_path) == []


def test_skipping_bad_images_leaves_them_out_counts_their_boxes_and_lists_them_in_the_manifest(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    _truncate(images)  # img_2: two boxes, one of them crowd
    (images / "img_3.jpg").unlink()
    manifest = write_shards(annotations, images, tmp_path / "out", workers=1, progress=False, skip_bad_images=True)
    assert (manifest["num_images"], manifest["num_boxes"], manifest["num_crowd_boxes"]) == (1, 2, 0)
    assert manifest["dropped"] == {"image_skipped": 2}
    assert [(s["file_name"], s["image_id"]) for s in manifest["skipped_images"]] == [("img_3.jpg", 3), ("img_2.jpg", 2)]
    assert "missing image file" in manifest["skipped_images"][0]["problem"]
    assert [row["image_id"] for row in pq.read_table(tmp_path / "out" / manifest["shards"][0]["file"]).to_pylist()] == [1]
    assert "skipped images: 2" in format_manifest_summary(manifest, tmp_path / "out")


def test_two_images_naming_one_file_are_refused(tmp_path, make_coco) -> None:
    annotations, images = make_coco(lambda coco: coco["images"][2].update(file_name="img_1.jpg"))
    with pytest.raises(DataError, match=r"image id 3: file_name 'img_1\.jpg' is also image id 1's"):
        write_shards(annotations, images, tmp_path / "out", progress=False)
