"""Look at a shard directory before training on it.

Counts, a class histogram, box-size histograms (COCO's small/medium/large and a
finer log-scale one) and a PNG grid of random sample images with their boxes
and class names drawn. Statistics read only the small columns; the grid reads
the image bytes of the sampled rows only.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from anchorless.files import atomic_path
from anchorless.platform.data.drawing import class_color, draw_boxes, to_hwc_uint8
from anchorless.platform.data.images import decode_image_bytes
from anchorless.platform.data.shards import METADATA_COLUMNS, iter_shard_tables, read_manifest, resolve_location

COCO_SMALL, COCO_LARGE = 32**2, 96**2  # COCO's area thresholds, in pixels
SIDE_EDGES = [0, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # sqrt(box area), pixels; the last bin is open
TILE = 320  # grid tile width (and longest image side), pixels
CAPTION = 18  # caption strip above each image, pixels


def inspect_shards(
    shard_dir: str | os.PathLike[str], out_png: str | os.PathLike[str], *, num_samples: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Statistics of a shard directory, and a grid of ``num_samples`` random images written to ``out_png``.

    Returns a JSON-ready dict: ``num_images``, ``num_boxes``, ``num_crowd_boxes``,
    ``images_without_boxes``, ``boxes_per_image`` (min/mean/max), ``classes``
    (per label: name, COCO id, boxes, images), ``box_sizes_coco`` (small/medium/
    large by box area), ``box_side_histogram`` (``edges`` and ``counts`` of
    sqrt(box area) in pixels), ``image_sizes``, ``dropped``, ``clipped``,
    ``sample_image_ids`` and ``grid`` (the PNG path).
    """
    manifest = read_manifest(shard_dir)
    names = {c["label"]: c["name"] for c in manifest["categories"]}
    tables = list(iter_shard_tables(shard_dir, manifest, columns=METADATA_COLUMNS))
    table = pa.concat_tables(tables) if tables else None
    num_images = table.num_rows if table is not None else 0

    labels = _flat(table, "labels", np.int64)
    boxes = _flat(table, "boxes", np.float64).reshape(-1, 4)
    crowd = _flat(table, "iscrowd", bool)
    per_image = pc.list_value_length(table.column("labels")).to_numpy(zero_copy_only=False) if num_images else np.zeros(0)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    sides = np.sqrt(areas)
    side_counts = np.histogram(sides, bins=SIDE_EDGES + [math.inf])[0]

    images_with_label: Counter[int] = Counter()
    if num_images:
        for row_labels in table.column("labels").to_pylist():
            images_with_label.update(set(row_labels))
    box_counts = Counter(labels.tolist())
    sizes = Counter(zip(table.column("width").to_pylist(), table.column("height").to_pylist())) if num_images else Counter()

    sample_rows = _sample_rows(num_images, num_samples, seed)
    sample_ids = [int(table.column("image_id")[row].as_py()) for row in sample_rows] if num_images else []
    _draw_grid(shard_dir, manifest, sample_rows, names, Path(out_png))

    return {
        "shard_dir": os.fspath(shard_dir),
        "num_images": num_images,
        "num_boxes": int(len(labels)),
        "num_crowd_boxes": int(crowd.sum()),
        "images_without_boxes": int((per_image == 0).sum()),
        "boxes_per_image": {
            "min": int(per_image.min()) if num_images else 0,
            "mean": round(float(per_image.mean()), 2) if num_images else 0.0,
            "max": int(per_image.max()) if num_images else 0,
        },
        "classes": [
            {
                "label": label,
                "name": name,
                "coco_id": next(c["coco_id"] for c in manifest["categories"] if c["label"] == label),
                "boxes": box_counts.get(label, 0),
                "images": images_with_label.get(label, 0),
            }
            for label, name in names.items()
        ],
        "box_sizes_coco": {
            "small": int((areas < COCO_SMALL).sum()),
            "medium": int(((areas >= COCO_SMALL) & (areas < COCO_LARGE)).sum()),
            "large": int((areas >= COCO_LARGE).sum()),
        },
        "box_side_histogram": {"edges": SIDE_EDGES, "counts": side_counts.tolist()},
        "image_sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common(5)},
        "dropped": manifest["dropped"],
        "clipped": manifest["clipped"],
        "sample_image_ids": sample_ids,
        "grid": os.fspath(out_png),
    }


def format_inspection(report: dict[str, Any]) -> str:
    """The report as a few readable lines with bar charts."""
    lines = [
        f"{report['shard_dir']}: {report['num_images']} images, {report['num_boxes']} boxes "
        f"({report['num_crowd_boxes']} crowd), {report['images_without_boxes']} images without boxes",
        "boxes per image: min {min}, mean {mean}, max {max}".format(**report["boxes_per_image"]),
        "image sizes: " + ", ".join(f"{size} ({n})" for size, n in report["image_sizes"].items()),
        "classes (boxes, images):",
    ]
    most = max([c["boxes"] for c in report["classes"]] + [1])
    width = max([len(c["name"]) for c in report["classes"]] + [4])
    for c in report["classes"]:
        lines.append(f"  {c['label']:>3} {c['name']:<{width}} {c['boxes']:>8} {c['images']:>7}  {_bar(c['boxes'], most)}")
    coco = report["box_sizes_coco"]
    lines.append(f"box sizes (COCO, by box area): small {coco['small']}, medium {coco['medium']}, large {coco['large']}")
    lines.append("box side sqrt(area), pixels:")
    edges, counts = report["box_side_histogram"]["edges"], report["box_side_histogram"]["counts"]
    most = max(counts + [1])
    for i, count in enumerate(counts):
        label = f"{edges[i]}-{edges[i + 1]}" if i + 1 < len(edges) else f">={edges[i]}"
        lines.append(f"  {label:>9} {count:>8}  {_bar(count, most)}")
    for kind in ("dropped", "clipped"):
        counts_by_reason = report[kind]
        text = ", ".join(f"{r}={n}" for r, n in counts_by_reason.items()) if counts_by_reason else "none"
        lines.append(f"{kind} at ingest: {text}")
    return "\n".join(lines)


def _bar(value: int, most: int, width: int = 40) -> str:
    return "#" * int(round(width * value / most)) if most else ""


def _flat(table: pa.Table | None, column: str, dtype: type) -> np.ndarray:
    if table is None or table.num_rows == 0:
        return np.zeros(0, dtype=dtype)
    return pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False).astype(dtype)


def _sample_rows(num_images: int, num_samples: int, seed: int) -> list[int]:
    if num_samples <= 0 or num_images == 0:
        return []
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_images, size=min(num_samples, num_images), replace=False).tolist())


def _draw_grid(shard_dir, manifest: dict[str, Any], rows: list[int], names: dict[int, str], out_png: Path) -> None:
    """Tiles of the sampled images with boxes and class names, written atomically as PNG."""
    tiles = [_tile(row, names) for row in _read_rows(shard_dir, manifest, rows)]
    columns = max(1, math.ceil(math.sqrt(len(tiles)))) if tiles else 1
    grid_rows = max(1, math.ceil(len(tiles) / columns))
    tile_h = max([tile.height for tile in tiles] + [CAPTION])
    grid = Image.new("RGB", (columns * TILE, grid_rows * tile_h), (40, 40, 40))
    for index, tile in enumerate(tiles):
        grid.paste(tile, ((index % columns) * TILE, (index // columns) * tile_h))
    with atomic_path(out_png) as tmp:
        grid.save(tmp, format="PNG")


def _read_rows(shard_dir, manifest: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
    """The given global row numbers (in manifest order), image bytes included."""
    filesystem, path = resolve_location(shard_dir)
    import pyarrow.parquet as pq

    out: list[dict[str, Any]] = []
    start = 0
    for shard in manifest["shards"]:
        end = start + shard["num_images"]
        wanted = [row - start for row in rows if start <= row < end]
        if wanted:
            table = pq.read_table(f"{path}/{shard['file']}", filesystem=filesystem)
            out.extend(table.take(pa.array(wanted)).to_pylist())
        start = end
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile(row: dict[str, Any], names: dict[int, str]) -> Image.Image:
    """One sampled image, fitted to the tile width, its boxes drawn in class colours (crowd
    boxes thin), under a caption with its id, size and box count."""
    pixels = decode_image_bytes(row["image"], f"image id {row['image_id']} (shard image bytes)", max_pixels=None)
    image = Image.fromarray(to_hwc_uint8(pixels))
    factor = TILE / max(image.width, image.height)
    image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BILINEAR)
    drawn = np.asarray(image)
    boxes = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4) * factor
    labels, crowd = np.asarray(row["labels"], dtype=np.int64), np.asarray(row["iscrowd"], dtype=bool)
    for is_crowd, width in ((True, 1), (False, 2)):
        chosen = np.flatnonzero(crowd == is_crowd)
        texts = [names.get(int(labels[i]), str(labels[i])) + (" (crowd)" if is_crowd else "") for i in chosen]
        colors = [class_color(int(labels[i])) for i in chosen]
        drawn = draw_boxes(drawn, boxes[chosen], texts=texts, colors=colors, width=width)
    tile = Image.new("RGB", (TILE, image.height + CAPTION), (40, 40, 40))
    tile.paste(Image.fromarray(drawn), (0, CAPTION))
    count = len(row["labels"])
    caption = f"id {row['image_id']}  {row['width']}x{row['height']}  {count} box{'' if count == 1 else 'es'}"
    ImageDraw.Draw(tile).text((4, 3), caption, fill=(230, 230, 230), font=_font(12))
    return tile
