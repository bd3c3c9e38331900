"""`anchorless data inspect`: the numbers and the picture."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from anchorless.platform.data.drawing import PALETTE
from anchorless.platform.data.inspect import CAPTION, TILE, format_inspection, inspect_shards
from anchorless.platform.data.shards import write_shards


def test_inspect_counts_classes_sizes_and_draws_boxes_in_class_colours(tmp_path, make_coco) -> None:
    annotations, images = make_coco()
    write_shards(annotations, images, tmp_path / "out", target_shard_mb=1e-6, workers=1, progress=False)
    report = inspect_shards(tmp_path / "out", tmp_path / "grid.png", num_samples=16, seed=0)

    assert report["num_images"] == 3 and report["num_boxes"] == 4 and report["num_crowd_boxes"] == 1
    assert report["images_without_boxes"] == 1
    assert report["boxes_per_image"] == {"min": 0, "mean": 1.33, "max": 2}
    assert report["classes"] == [
        {"label": 0, "name": "three", "coco_id": 3, "boxes": 2, "images": 2},
        {"label": 1, "name": "seven", "coco_id": 7, "boxes": 2, "images": 2},
    ]
    # box areas 80, 300, 1200, 16.875: all below 32^2 except the 40x30 crowd box
    assert report["box_sizes_coco"] == {"small": 3, "medium": 1, "large": 0}
    assert report["box_side_histogram"]["counts"][:5] == [0, 1, 1, 1, 1]  # sides 4.1, 8.9, 17.3, 34.6
    assert report["image_sizes"] == {"40x30": 3}
    assert report["sample_image_ids"] == [1, 2, 3]

    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    tile_h = CAPTION + 30 * TILE // 40
    assert grid.size == (2 * TILE, 2 * tile_h)  # 3 tiles -> 2x2 grid
    factor = TILE / 40
    # image 1, box [2, 3, 12, 11] of label 1: its left edge is drawn in label 1's colour
    x, y = int(2 * factor), int(7 * factor) + CAPTION
    assert grid.getpixel((x, y)) == PALETTE[1]
    # image 1, box [20, 5, 35, 25] of label 0: its right edge in label 0's colour
    x, y = int(35 * factor) - 1, int(15 * factor) + CAPTION
    assert grid.getpixel((x, y)) == PALETTE[0]

    text = format_inspection(report)
    assert "3 images, 4 boxes (1 crowd), 1 images without boxes" in text
    assert "three" in text and "seven" in text and "small 3, medium 1, large 0" in text


def test_inspect_on_bccd_matches_the_manifest(tmp_path, bccd: Path) -> None:
    manifest = write_shards(bccd / "annotations" / "instances_val.json", bccd / "images", tmp_path / "val", progress=False)
    report = inspect_shards(tmp_path / "val", tmp_path / "val.png", num_samples=4, seed=1)
    assert report["num_images"] == 87 and report["num_boxes"] == manifest["num_boxes"] == 1137
    assert sum(c["boxes"] for c in report["classes"]) == 1137
    assert sum(report["box_sizes_coco"].values()) == 1137
    assert report["dropped"] == {"zero_size_box": 1}
    assert len(report["sample_image_ids"]) == 4
    assert Image.open(tmp_path / "val.png").size == (2 * TILE, 2 * (CAPTION + 240))
