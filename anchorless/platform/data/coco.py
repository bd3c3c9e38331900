"""Read and validate a COCO instances JSON and its image root.

The one place COCO's conventions enter the code: ``bbox`` ``[x, y, w, h]`` becomes
xyxy, COCO category ids become contiguous labels ``0..C-1`` (in ascending id
order), and every record is checked. A problem that makes the data set unusable
raises :class:`DataError` with the file, the record and the problem; a problem a
user would want fixed quietly (a zero-size box, a box poking out of the image)
is repaired, counted by reason and reported.

Image files are checked here only for existence and a safe path; whether they
decode is checked by :func:`verify_image_bytes`, which the shard writers call on
the bytes they read anyway (decoding is the expensive part, so it runs in
parallel there).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image

from anchorless.errors import DataError

# Reasons under which boxes are dropped or clipped; they are the manifest's keys.
ZERO_SIZE_BOX = "zero_size_box"
NEGATIVE_SIZE_BOX = "negative_size_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
BOX_EXTENDS_OUTSIDE_IMAGE = "box_extends_outside_image"

# PIL refuses images above ~179 Mpx as a decompression bomb; COCO-style data
# sets never come near it, so a file that does is treated as unreadable.
Image.MAX_IMAGE_PIXELS = 179_000_000


@dataclass(frozen=True)
class Category:
    coco_id: int
    label: int
    name: str


@dataclass
class ImageRecord:
    """One image and its kept boxes (xyxy, pixels of the stored image)."""

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy
    labels: np.ndarray  # (N,) int32, contiguous
    iscrowd: np.ndarray  # (N,) bool
    areas: np.ndarray  # (N,) float32, COCO's `area` (segment area when given), for evaluation


@dataclass
class CocoDataset:
    annotations_path: Path
    annotations_sha256: str
    categories: list[Category]
    images: list[ImageRecord]
    dropped: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_boxes(self) -> int:
        return sum(len(record.labels) for record in self.images)


def load_coco(annotations: str | Path, images_root: str | Path) -> CocoDataset:
    """Read a COCO instances JSON, validate it against ``images_root`` and convert it.

    Images keep the JSON's order; images without annotations are kept (negatives).
    Raises :class:`DataError` on anything that makes the data set unusable.
    """
    annotations = Path(annotations)
    images_root = Path(images_root)
    try:
        raw_bytes = annotations.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{annotations}: no such annotations file") from None
    except OSError as exc:
        raise DataError(f"{annotations}: cannot read annotations file ({exc.strerror})") from None
    try:
        coco = json.loads(raw_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{annotations}: not valid JSON ({exc})") from None
    if not isinstance(coco, dict):
        raise DataError(f"{annotations}: expected a JSON object at the top level, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DataError(f"{annotations}: missing top-level key {key!r} (not a COCO instances file)")
        if not isinstance(coco[key], list):
            raise DataError(f"{annotations}: {key!r} must be a list, got {type(coco[key]).__name__}")
    if not images_root.is_dir():
        raise DataError(f"{images_root}: image root is not a directory")

    categories = _read_categories(annotations, coco["categories"])
    label_of = {category.coco_id: category.label for category in categories}
    images, index_of = _read_images(annotations, images_root, coco["images"])

    per_image: list[list[tuple[list[float], int, bool, float]]] = [[] for _ in images]
    dropped: Counter[str] = Counter()
    clipped: Counter[str] = Counter()
    for position, ann in enumerate(coco["annotations"]):
        record = _record_name("annotation", ann, position)
        if not isinstance(ann, dict):
            raise DataError(f"{annotations}: {record}: expected an object")
        image_id = ann.get("image_id")
        if image_id not in index_of:
            raise DataError(f"{annotations}: {record}: image_id {image_id!r} is not in 'images'")
        category_id = ann.get("category_id")
        if category_id not in label_of:
            raise DataError(f"{annotations}: {record}: category_id {category_id!r} is not in 'categories'")
        image = images[index_of[image_id]]
        x, y, w, h = _read_bbox(annotations, record, ann.get("bbox"))
        if w < 0 or h < 0:
            dropped[NEGATIVE_SIZE_BOX] += 1
            continue
        if w == 0 or h == 0:
            dropped[ZERO_SIZE_BOX] += 1
            continue
        x0, y0, x1, y1 = x, y, x + w, y + h
        cx0, cy0 = min(max(x0, 0.0), image.width), min(max(y0, 0.0), image.height)
        cx1, cy1 = min(max(x1, 0.0), image.width), min(max(y1, 0.0), image.height)
        if cx1 <= cx0 or cy1 <= cy0:
            dropped[BOX_OUTSIDE_IMAGE] += 1
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            clipped[BOX_EXTENDS_OUTSIDE_IMAGE] += 1
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1, True, False):
            raise DataError(f"{annotations}: {record}: iscrowd must be 0 or 1, got {iscrowd!r}")
        area = ann.get("area")
        if not _is_number(area) or not math.isfinite(area) or area < 0:
            area = (cx1 - cx0) * (cy1 - cy0)
        per_image[index_of[image_id]].append(([cx0, cy0, cx1, cy1], label_of[category_id], bool(iscrowd), float(area)))

    for image, boxes in zip(images, per_image):
        if boxes:
            image.boxes = np.asarray([b for b, _, _, _ in boxes], dtype=np.float32)
            image.labels = np.asarray([label for _, label, _, _ in boxes], dtype=np.int32)
            image.iscrowd = np.asarray([crowd for _, _, crowd, _ in boxes], dtype=bool)
            image.areas = np.asarray([area for _, _, _, area in boxes], dtype=np.float32)

    return CocoDataset(
        annotations_path=annotations,
        annotations_sha256=hashlib.sha256(raw_bytes).hexdigest(),
        categories=categories,
        images=images,
        dropped=dict(sorted(dropped.items())),
        clipped=dict(sorted(clipped.items())),
    )


def verify_image_bytes(data: bytes, record: ImageRecord) -> None:
    """Raise :class:`DataError` unless ``data`` decodes fully to the recorded size.

    The whole compressed stream is decoded (a truncated file fails only at its
    end), at 1/8 scale for JPEG, which reads every byte for a fraction of the cost.
    """
    where = f"{record.path} (image id {record.image_id})"
    try:
        with Image.open(BytesIO(data)) as image:
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    except Image.DecompressionBombError:
        raise DataError(f"{where}: image is too large to decode safely") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        problem = "not an image file" if "cannot identify" in str(exc) else f"unreadable or truncated image ({exc})"
        raise DataError(f"{where}: {problem}") from None
    if size != (record.width, record.height):
        raise DataError(
            f"{where}: image is {size[0]}x{size[1]} but the annotations say "
            f"{record.width}x{record.height}; boxes would be misplaced"
        )


def _read_categories(annotations: Path, raw: list[Any]) -> list[Category]:
    seen: dict[int, str] = {}
    for position, category in enumerate(raw):
        record = _record_name("category", category, position)
        if not isinstance(category, dict):
            raise DataError(f"{annotations}: {record}: expected an object")
        coco_id, name = category.get("id"), category.get("name")
        if not isinstance(coco_id, int) or isinstance(coco_id, bool):
            raise DataError(f"{annotations}: {record}: 'id' must be an integer, got {coco_id!r}")
        if not isinstance(name, str) or not name:
            raise DataError(f"{annotations}: {record}: 'name' must be a non-empty string, got {name!r}")
        if coco_id in seen:
            raise DataError(f"{annotations}: {record}: duplicate category id (also {seen[coco_id]!r})")
        seen[coco_id] = name
    if not seen:
        raise DataError(f"{annotations}: 'categories' is empty; a detector needs at least one class")
    return [Category(coco_id=coco_id, label=label, name=seen[coco_id]) for label, coco_id in enumerate(sorted(seen))]


def _read_images(annotations: Path, images_root: Path, raw: list[Any]) -> tuple[list[ImageRecord], dict[int, int]]:
    images: list[ImageRecord] = []
    index_of: dict[int, int] = {}
    for position, image in enumerate(raw):
        record = _record_name("image", image, position)
        if not isinstance(image, dict):
            raise DataError(f"{annotations}: {record}: expected an object")
        image_id = image.get("id")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise DataError(f"{annotations}: {record}: 'id' must be an integer, got {image_id!r}")
        if image_id in index_of:
            raise DataError(f"{annotations}: {record}: duplicate image id")
        width, height = image.get("width"), image.get("height")
        for key, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DataError(f"{annotations}: {record}: {key!r} must be a positive integer, got {value!r}")
        file_name = image.get("file_name")
        path = _safe_image_path(annotations, record, images_root, file_name)
        if not path.is_file():
            raise DataError(f"{path} ({record} in {annotations}): missing image file")
        index_of[image_id] = len(images)
        images.append(
            ImageRecord(
                image_id=image_id,
                file_name=file_name,
                path=path,
                width=width,
                height=height,
                boxes=np.zeros((0, 4), dtype=np.float32),
                labels=np.zeros((0,), dtype=np.int32),
                iscrowd=np.zeros((0,), dtype=bool),
                areas=np.zeros((0,), dtype=np.float32),
            )
        )
    return images, index_of


def _safe_image_path(annotations: Path, record: str, images_root: Path, file_name: Any) -> Path:
    """The image's path under the root; a name that could leave the root is refused."""
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{annotations}: {record}: 'file_name' must be a non-empty string, got {file_name!r}")
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or file_name.startswith(("/", "\\")):
        raise DataError(f"{annotations}: {record}: file_name {file_name!r} is absolute; it must be relative to the image root")
    if ".." in posix.parts or ".." in windows.parts:
        raise DataError(f"{annotations}: {record}: file_name {file_name!r} escapes the image root")
    return images_root / os.path.normpath(file_name)


def _read_bbox(annotations: Path, record: str, bbox: Any) -> tuple[float, float, float, float]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DataError(f"{annotations}: {record}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}")
    if not all(math.isfinite(v) for v in bbox):
        raise DataError(f"{annotations}: {record}: 'bbox' has a non-finite value: {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return x, y, w, h


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_name(kind: str, raw: Any, position: int) -> str:
    if isinstance(raw, dict) and "id" in raw:
        return f"{kind} id {raw['id']!r}"
    return f"{kind} #{position} (no id)"
