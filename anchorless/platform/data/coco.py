"""Read and validate a COCO instances JSON and its image root; the records every source becomes.

The one place COCO's conventions enter the code: ``bbox`` ``[x, y, w, h]`` becomes
xyxy, COCO category ids become contiguous labels ``0..C-1`` (in ascending id
order), and every record is checked. A problem that makes the data set unusable
raises :class:`DataError` with the file, the record and the problem; a problem a
user would want fixed quietly (a zero-size box, a box poking out of the image)
is repaired, counted by reason and reported. The VOC and YOLO readers (``voc``,
``yolo``) produce the same :class:`CocoDataset` through the same box repairs, so
the same data gives the same shards whatever its source.

Ids must fit the shards' int64 columns; an image's header must declare at most
``max_image_pixels`` pixels, checked before any pixel is decoded (a decompression bomb
is a bad image, never a warning).

Images are taken as they are displayed: EXIF orientation applied, so boxes drawn
on the upright picture (as annotation tools show it) stay on their objects, and
the recorded width/height are the upright ones.

Image files are checked here only for existence and a safe path; a missing one is
a :class:`BadImage`, listed with those that fail to decode. A file name stored on disk
in another Unicode normal form than the JSON's (NFD on disk, NFC in the JSON: what
macOS and some archivers write) is found, and counted under ``corrected``. Whether an image
decodes is checked by :func:`verify_image_bytes`, which the shard writers call on
the bytes they read anyway (decoding is the expensive part, so it runs in
parallel there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

import numpy as np
from PIL import Image

from anchorless.errors import DataError

# Reasons under which boxes are dropped or clipped; they are the manifest's keys.
ZERO_SIZE_BOX = "zero_size_box"
NEGATIVE_SIZE_BOX = "negative_size_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
BOX_EXTENDS_OUTSIDE_IMAGE = "box_extends_outside_image"
# Boxes of an image left out with --skip-bad-images.
IMAGE_SKIPPED = "image_skipped"

# EXIF orientations that turn the picture by 90 degrees: the upright size is the stored one transposed.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112

# File names found on disk in another Unicode normal form than the annotations': a `corrected` key.
FILE_NAME_UNICODE_FORM = "file_name_unicode_form"

# Pixels an image's header may declare: 100 Mpx (10,000 x 10,000) is far beyond any
# detection data set's pictures and far below what would exhaust a shard writer's memory
# (3 bytes a pixel decoded). Checked on the header, before decoding (`--max-image-pixels`).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# PIL's own decompression-bomb ceiling stays as a second line (it refuses above twice this
# on open); its warning below that is silenced where our limit is checked instead.
Image.MAX_IMAGE_PIXELS = 179_000_000
# The shards' id and size columns: int64 ids, int32 widths and heights.
MAX_ID = 2**63 - 1
MIN_ID = -(2**63)
MAX_SIDE = 2**31 - 1

Box = tuple[float, float, float, float]  # xyxy, pixels


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


@dataclass(frozen=True)
class BadImage:
    """An image that cannot go into the shards: missing, unreadable, truncated, the wrong size."""

    file_name: str
    image_id: int | None
    message: str  # the whole line for people: path, record, problem
    num_boxes: int = 0  # its annotated boxes, dropped with it when bad images are skipped

    def manifest_entry(self) -> dict[str, Any]:
        return {"file_name": self.file_name, "image_id": self.image_id, "problem": self.message}


@dataclass
class CocoDataset:
    """A validated data set in COCO's terms, whatever its source format.

    ``annotations_path`` is the source's annotation file or folder and ``annotations_sha256``
    its checksum (a digest over the files for folder formats); ``corrected`` counts values
    of the source that were replaced by what the images say (VOC's ``<size>``).
    """

    annotations_path: Path
    annotations_sha256: str
    categories: list[Category]
    images: list[ImageRecord]
    dropped: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, int] = field(default_factory=dict)
    bad_images: list[BadImage] = field(default_factory=list)
    corrected: dict[str, int] = field(default_factory=dict)
    source_format: str = "coco"

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
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and a number of more than 4300 digits
        raise DataError(f"{annotations}: not valid JSON ({exc})") from None
    except RecursionError:
        raise DataError(f"{annotations}: not valid COCO JSON (nested too deeply to read)") from None
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
    images, index_of, missing_ids = _read_images(annotations, images_root, coco["images"])

    per_image: list[list[tuple[Box, int, bool, float]]] = [[] for _ in images]
    dropped: Counter[str] = Counter()
    clipped: Counter[str] = Counter()
    annotation_ids: set[int] = set()
    for position, ann in enumerate(coco["annotations"]):
        record = _record_name("annotation", ann, position)
        if not isinstance(ann, dict):
            raise DataError(f"{annotations}: {record}: expected an object")
        if "id" in ann:  # not stored (evaluation numbers boxes itself), but a broken one is a broken file
            annotation_id = _read_id(annotations, record, "id", ann["id"])
            if annotation_id in annotation_ids:
                raise DataError(f"{annotations}: {record}: duplicate annotation id")
            annotation_ids.add(annotation_id)
        image_id = ann.get("image_id")
        if not _is_integer(image_id) or image_id not in index_of:
            raise DataError(f"{annotations}: {record}: image_id {image_id!r} is not in 'images'")
        category_id = ann.get("category_id")
        if not _is_integer(category_id) or category_id not in label_of:
            raise DataError(f"{annotations}: {record}: category_id {category_id!r} is not in 'categories'")
        image = images[index_of[image_id]]
        x, y, w, h = _read_bbox(annotations, record, ann.get("bbox"))
        box = repair_box(x, y, x + w, y + h, image.width, image.height, dropped, clipped)
        if box is None:
            continue
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1, True, False):
            raise DataError(f"{annotations}: {record}: iscrowd must be 0 or 1, got {iscrowd!r}")
        area = ann.get("area")
        if not _is_number(area) or not math.isfinite(area) or area < 0 or area > _FLOAT32_MAX:
            area = box_area(box)  # as if absent: the shards hold it as float32
        per_image[index_of[image_id]].append((box, label_of[category_id], bool(iscrowd), float(area)))

    for image, boxes in zip(images, per_image):
        set_boxes(image, boxes)
    missing = [image for image in images if image.image_id in missing_ids]
    renamed = sum(image.path != images_root / os.path.normpath(image.file_name) for image in images)
    return CocoDataset(
        annotations_path=annotations,
        annotations_sha256=hashlib.sha256(raw_bytes).hexdigest(),
        categories=categories,
        images=[image for image in images if image.image_id not in missing_ids],
        dropped=dict(sorted(dropped.items())),
        clipped=dict(sorted(clipped.items())),
        bad_images=[
            BadImage(
                image.file_name,
                image.image_id,
                f"{image.path} (image id {image.image_id} in {annotations}): missing image file",
                num_boxes=len(image.labels),
            )
            for image in missing
        ],
        corrected={FILE_NAME_UNICODE_FORM: renamed} if renamed else {},
    )


def repair_box(
    x0: float, y0: float, x1: float, y1: float, width: int, height: int, dropped: Counter[str], clipped: Counter[str]
) -> Box | None:
    """An xyxy box clipped to the image, or None when nothing of it is left; either is counted by reason.

    Every source goes through this, so a box is kept, clipped or dropped the same way whatever its format.
    """
    if x1 < x0 or y1 < y0:
        dropped[NEGATIVE_SIZE_BOX] += 1
        return None
    if x1 == x0 or y1 == y0:
        dropped[ZERO_SIZE_BOX] += 1
        return None
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 <= cx0 or cy1 <= cy0:
        dropped[BOX_OUTSIDE_IMAGE] += 1
        return None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        clipped[BOX_EXTENDS_OUTSIDE_IMAGE] += 1
    return cx0, cy0, cx1, cy1


def box_area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def set_boxes(image: ImageRecord, boxes: list[tuple[Box, int, bool, float]]) -> None:
    """Store ``(xyxy, label, iscrowd, area)`` tuples as the record's arrays (an empty list keeps it a negative)."""
    if boxes:
        image.boxes = np.asarray([list(b) for b, _, _, _ in boxes], dtype=np.float32)
        image.labels = np.asarray([label for _, label, _, _ in boxes], dtype=np.int32)
        image.iscrowd = np.asarray([crowd for _, _, crowd, _ in boxes], dtype=bool)
        image.areas = np.asarray([area for _, _, _, area in boxes], dtype=np.float32)


def add_repaired_boxes(
    image: ImageRecord, boxes: list[tuple[Box, int, bool]], dropped: Counter[str], clipped: Counter[str]
) -> None:
    """Set ``(xyxy, label, iscrowd)`` boxes of a source without areas (VOC, YOLO) on ``image``:
    each repaired by :func:`repair_box`, its area the kept box's, as COCO ingest takes a missing one."""
    kept = []
    for (x0, y0, x1, y1), label, crowd in boxes:
        box = repair_box(x0, y0, x1, y1, image.width, image.height, dropped, clipped)
        if box is not None:
            kept.append((box, label, crowd, box_area(box)))
    set_boxes(image, kept)


def new_record(image_id: int, file_name: str, path: Path, width: int, height: int) -> ImageRecord:
    """An image without boxes yet."""
    return ImageRecord(
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


def verify_image_bytes(data: bytes, record: ImageRecord, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Raise :class:`DataError` unless ``data`` decodes fully to the recorded (upright) size.

    The header's size is checked against ``max_pixels`` before anything is decoded. The
    whole compressed stream is decoded (a truncated file fails only at its end), at 1/8
    scale for JPEG, which reads every byte for a fraction of the cost.
    """
    where = f"{record.path} (image id {record.image_id})"
    try:
        with _open_image(BytesIO(data)) as image:
            stored = image.size
            check_pixels(stored, max_pixels, where)
            upright = upright_size(image)
            image.draft("RGB", (max(1, stored[0] // 8), max(1, stored[1] // 8)))
            image.load()
    except Image.DecompressionBombError:
        raise DataError(f"{where}: image is too large to decode safely (above {2 * Image.MAX_IMAGE_PIXELS:,} pixels); not decoded") from None
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        problem = "not an image file" if "cannot identify" in str(exc) else f"unreadable or truncated image ({exc})"
        raise DataError(f"{where}: {problem}") from None
    if upright != (record.width, record.height):
        turned = " (its EXIF orientation turns the stored pixels; sizes and boxes are taken upright)" if upright != stored else ""
        raise DataError(
            f"{where}: image is {upright[0]}x{upright[1]}{turned} but the annotations say "
            f"{record.width}x{record.height}; boxes would be misplaced"
        )


@contextlib.contextmanager
def _open_image(source: Any) -> Iterator[Image.Image]:
    """``Image.open`` without PIL's decompression-bomb warning: :func:`check_pixels` decides, and refuses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(source)
    with image:
        yield image


def check_pixels(size: tuple[int, int], max_pixels: int, where: str) -> None:
    """A :class:`DataError` for an image whose header declares more than ``max_pixels`` pixels."""
    width, height = size
    if width * height > max_pixels:
        raise DataError(
            f"{where}: image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(a decompression bomb, or raise --max-image-pixels); not decoded"
        )


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The size of ``image`` as displayed: EXIF orientations 5-8 swap width and height."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a damaged EXIF block: the pixels still decode, so take them as stored
        orientation = None
    width, height = image.size
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def read_image_size(path: Path, where: str) -> tuple[int, int]:
    """The upright size from the image's header (the pixels are checked when shards are written)."""
    try:
        with _open_image(path) as image:
            return upright_size(image)
    except FileNotFoundError:
        raise DataError(f"{where}: missing image file") from None
    except Image.DecompressionBombError:
        raise DataError(f"{where}: image is too large to decode safely") from None
    except Exception as exc:
        problem = "not an image file" if "cannot identify" in str(exc) else f"unreadable image ({exc})"
        raise DataError(f"{where}: {problem}") from None


def _read_categories(annotations: Path, raw: list[Any]) -> list[Category]:
    seen: dict[int, str] = {}
    for position, category in enumerate(raw):
        record = _record_name("category", category, position)
        if not isinstance(category, dict):
            raise DataError(f"{annotations}: {record}: expected an object")
        coco_id, name = _read_id(annotations, record, "id", category.get("id")), category.get("name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{annotations}: {record}: 'name' must be a non-empty string, got {name!r}")
        _check_text(annotations, record, "name", name)
        if coco_id in seen:
            raise DataError(f"{annotations}: {record}: duplicate category id (also {seen[coco_id]!r})")
        seen[coco_id] = name
    if not seen:
        raise DataError(f"{annotations}: 'categories' is empty; a detector needs at least one class")
    return [Category(coco_id=coco_id, label=label, name=seen[coco_id]) for label, coco_id in enumerate(sorted(seen))]


def _read_images(
    annotations: Path, images_root: Path, raw: list[Any]
) -> tuple[list[ImageRecord], dict[int, int], set[int]]:
    """The image records, their index by id, and the ids whose file is missing (listed as bad images)."""
    images: list[ImageRecord] = []
    index_of: dict[int, int] = {}
    missing: set[int] = set()
    id_of_file: dict[str, int] = {}
    finder = _UnicodeFormFinder(images_root)
    for position, image in enumerate(raw):
        record = _record_name("image", image, position)
        if not isinstance(image, dict):
            raise DataError(f"{annotations}: {record}: expected an object")
        image_id = _read_id(annotations, record, "id", image.get("id"))
        if image_id in index_of:
            raise DataError(f"{annotations}: {record}: duplicate image id")
        width, height = image.get("width"), image.get("height")
        for key, value in (("width", width), ("height", height)):
            if not _is_integer(value) or value <= 0:
                raise DataError(f"{annotations}: {record}: {key!r} must be a positive integer, got {value!r}")
            if value > MAX_SIDE:
                raise DataError(f"{annotations}: {record}: {key!r} is {value}, beyond any image (at most {MAX_SIDE})")
        file_name = image.get("file_name")
        path = safe_image_path(annotations, record, images_root, file_name)
        key = unicodedata.normalize("NFC", os.path.normpath(file_name))
        if key in id_of_file:
            raise DataError(
                f"{annotations}: {record}: file_name {file_name!r} is also image id {id_of_file[key]}'s; "
                "one file cannot be two images"
            )
        id_of_file[key] = image_id
        found = finder.find(path)
        if found is None:
            missing.add(image_id)
        else:
            path = found
        index_of[image_id] = len(images)
        images.append(new_record(image_id, file_name, path, width, height))
    return images, index_of, missing


def safe_image_path(annotations: Path, record: str, images_root: Path, file_name: Any) -> Path:
    """The image's path under the root; a name that could leave the root is refused.

    ``annotations`` (the file naming the image) and ``record`` (its entry there) go into the message.
    """
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{annotations}: {record}: 'file_name' must be a non-empty string, got {file_name!r}")
    _check_text(annotations, record, "file_name", file_name)
    if "\x00" in file_name:
        raise DataError(f"{annotations}: {record}: file_name {file_name!r} holds a NUL character")
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


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _read_id(annotations: Path, record: str, key: str, value: Any) -> int:
    """An id that the shards' int64 columns (and pycocotools' arrays) can hold."""
    if not _is_integer(value):
        raise DataError(f"{annotations}: {record}: {key!r} must be an integer, got {value!r}")
    if not MIN_ID <= value <= MAX_ID:
        raise DataError(f"{annotations}: {record}: {key!r} {value} does not fit in 64 bits (at most {MAX_ID})")
    return value


def _check_text(annotations: Path, record: str, key: str, text: str) -> None:
    """JSON can spell lone surrogates (\\ud800) that no file system, Parquet or MLflow can store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{annotations}: {record}: {key!r} {text!r} is not valid Unicode (a lone surrogate)") from None


class _UnicodeFormFinder:
    """A file by its path, or by the same path in another Unicode normal form (NFD on disk,
    NFC in the JSON, or the reverse); each directory is listed once, and only on a miss."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[Path, dict[str, str]] = {}

    def find(self, path: Path) -> Path | None:
        if os.path.isfile(path):  # os.path, not Path: a name too long for the file system is a miss, not a crash
            return path
        found = self.root
        for part in path.relative_to(self.root).parts:
            if os.path.exists(found / part):
                found = found / part
                continue
            actual = self._listing(found).get(unicodedata.normalize("NFC", part))
            if actual is None:
                return None
            found = found / actual
        return found if os.path.isfile(found) else None

    def _listing(self, directory: Path) -> dict[str, str]:
        if directory not in self._listings:
            try:
                names = os.listdir(directory)
            except OSError:
                names = []
            self._listings[directory] = {unicodedata.normalize("NFC", name): name for name in names}
        return self._listings[directory]


def _record_name(kind: str, raw: Any, position: int) -> str:
    if isinstance(raw, dict) and "id" in raw:
        return f"{kind} id {raw['id']!r}"
    return f"{kind} #{position} (no id)"
