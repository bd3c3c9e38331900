"""Read and validate a YOLO label folder (the Ultralytics layout) into the records COCO ingest makes.

Each image ``IMAGES/a/b.jpg`` has its labels in ``LABELS/a/b.txt``, one object a line:
``class cx cy w h`` with the centre and size normalised to 0-1 by the upright image's
width and height. Classes are named by a ``data.yaml`` (``names``) or a names file; class
``i`` becomes label ``i`` and COCO category id ``i + 1``. Image ids are 1..N in the order
of the images' sorted relative paths.

An image without a label file is a negative (Ultralytics reads it so too; counted in the
log). A label file without an image is a bad image, listed with the unreadable ones.
Polygon (segmentation) lines are refused: they have more than five fields.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from anchorless.errors import DataError
from anchorless.platform.data.coco import BadImage, CocoDataset, ImageRecord, add_repaired_boxes, new_record
from anchorless.platform.data.labels import (
    IMAGE_SUFFIXES,
    categories_from_names,
    digest_files,
    image_size_or_bad,
    read_class_names,
)

log = logging.getLogger(__name__)

# LabelImg writes the class list beside the labels under this name; it is not a label file.
LABELIMG_CLASSES_FILE = "classes.txt"


def load_yolo(
    labels_dir: str | Path, images_dir: str | Path, names: str | Path, *, progress: bool = False
) -> CocoDataset:
    """Read YOLO labels under ``labels_dir`` for the images under ``images_dir``; ``names`` names the classes.

    Raises :class:`DataError` naming the file, the line and the problem on anything that makes
    the data set unusable; missing or unreadable images are listed as bad images.
    """
    labels_dir, images_dir, names = Path(labels_dir), Path(images_dir), Path(names)
    for folder, what in ((labels_dir, "label folder"), (images_dir, "image folder")):
        if not folder.is_dir():
            raise DataError(f"{folder}: {what} is not a directory")
    categories = categories_from_names(read_class_names(names))
    image_paths = sorted(
        (path for path in images_dir.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()),
        key=lambda path: path.relative_to(images_dir).as_posix(),
    )
    image_of_label: dict[Path, Path] = {}
    for path in image_paths:
        label_path = labels_dir / path.relative_to(images_dir).with_suffix(".txt")
        if label_path in image_of_label:
            other = image_of_label[label_path].relative_to(images_dir)
            raise DataError(
                f"{path}: duplicate file name: {other} has the same stem, so both would read labels from {label_path}"
            )
        image_of_label[label_path] = path
    label_files = sorted(
        path for path in labels_dir.rglob("*.txt")
        if path.is_file() and path.name != LABELIMG_CLASSES_FILE and path.resolve() != names.resolve()
    )  # fmt: skip

    images: list[ImageRecord] = []
    bad = [
        BadImage(path.relative_to(labels_dir).as_posix(), None, f"{path}: label file without an image under {images_dir}")
        for path in label_files
        if path not in image_of_label
    ]
    dropped: Counter[str] = Counter()
    clipped: Counter[str] = Counter()
    without_labels = 0
    for image_id, (label_path, image_path) in enumerate(
        tqdm(image_of_label.items(), desc="yolo", unit="img", disable=not progress), start=1
    ):
        file_name = image_path.relative_to(images_dir).as_posix()
        lines = _read_lines(label_path, len(categories), names) if label_path.is_file() else []
        without_labels += not label_path.is_file()
        size = image_size_or_bad(image_path, file_name, image_id, f"{image_path} (image id {image_id})")
        if isinstance(size, BadImage):
            bad.append(BadImage(size.file_name, size.image_id, size.message, num_boxes=len(lines)))
            continue
        width, height = size
        record = new_record(image_id, file_name, image_path, width, height)
        corners = [
            (((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height), label, False)
            for label, cx, cy, w, h in lines
        ]
        add_repaired_boxes(record, corners, dropped, clipped)
        images.append(record)
    if without_labels:
        log.info("%s: %d image(s) have no label file and are kept as negatives", labels_dir, without_labels)

    read = [path for path in image_of_label if path.is_file()] + [names]
    return CocoDataset(
        annotations_path=labels_dir,
        annotations_sha256=digest_files(read, labels_dir),
        categories=categories,
        images=images,
        dropped=dict(sorted(dropped.items())),
        clipped=dict(sorted(clipped.items())),
        bad_images=bad,
        source_format="yolo",
    )


def _read_lines(path: Path, num_classes: int, names: Path) -> list[tuple[int, float, float, float, float]]:
    """``(class, cx, cy, w, h)`` of every line; a wrong line is an error naming file and line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read label file ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}: line {number}"
        if len(fields) != 5:
            raise DataError(
                f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}"
                + (" (a segmentation polygon? only boxes are read)" if len(fields) > 5 else "")
            )
        try:
            label = int(fields[0])
        except ValueError:
            raise DataError(f"{where}: class id must be an integer, got {fields[0]!r}") from None
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: class id {label} is past the {num_classes} names in {names}")
        try:
            values = [float(value) for value in fields[1:]]
        except ValueError:
            raise DataError(f"{where}: cx cy w h must be numbers, got {' '.join(fields[1:])!r}") from None
        if not all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in values):
            raise DataError(f"{where}: cx cy w h must be normalised to 0-1, got {' '.join(fields[1:])} (pixels?)")
        rows.append((label, *values))
    return rows
