"""Read and validate a Pascal VOC data set (one XML per image) into the records COCO ingest makes.

Conventions, where VOC leaves a choice:

* Corners (``xmin ymin xmax ymax``) are taken as pixel coordinates, as LabelImg and CVAT
  write them: a box is ``[xmin, ymin, xmax, ymax]`` in xyxy, ``w = xmax - xmin`` (the
  1-based devkit reading would move every box by one pixel).
* ``<difficult>1</difficult>`` becomes COCO's ``iscrowd``: the box is left out of training
  targets, and evaluation ignores detections on it instead of counting them wrong, which
  is what VOC's own evaluation does with difficult objects.
* The image's real (upright) size wins over an XML ``<size>`` that disagrees; each such
  file is counted (``corrected.xml_size_differs_from_image`` in the manifest) and logged.
* Classes come from ``names`` (a names file or YOLO ``data.yaml``) when given, in that
  order; otherwise from every XML in the annotation folder (not only the split's), sorted,
  so that splits sharded separately get the same category table. Category ids are 1..C.
* Image ids are 1..N in the order of the split file, or of the sorted XML names.
* The image is ``<filename>`` under the image folder, else the XML's stem with an image
  suffix; the XML's ``<path>`` names the annotator's own disk and is ignored.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from anchorless.errors import DataError
from anchorless.platform.data.coco import (
    BadImage,
    Box,
    CocoDataset,
    ImageRecord,
    add_repaired_boxes,
    new_record,
    safe_image_path,
)
from anchorless.platform.data.labels import (
    IMAGE_SUFFIXES,
    categories_from_names,
    digest_files,
    image_size_or_bad,
    read_class_names,
)

log = logging.getLogger(__name__)

XML_SIZE_DIFFERS = "xml_size_differs_from_image"


def load_voc(
    annotations_dir: str | Path,
    images_dir: str | Path,
    *,
    split: str | Path | None = None,
    names: str | Path | None = None,
    progress: bool = False,
) -> CocoDataset:
    """Read a VOC annotation folder (``split``: a file of image stems, one a line) against ``images_dir``.

    Raises :class:`DataError` naming the file, the object and the problem on anything that
    makes the data set unusable; missing or unreadable images are listed as bad images.
    """
    annotations_dir, images_dir = Path(annotations_dir), Path(images_dir)
    for folder, what in ((annotations_dir, "annotation folder"), (images_dir, "image folder")):
        if not folder.is_dir():
            raise DataError(f"{folder}: {what} is not a directory")
    every_xml = sorted(annotations_dir.glob("*.xml"))
    xml_files = _split_files(Path(split), annotations_dir) if split is not None else every_xml
    if not xml_files:
        raise DataError(f"{annotations_dir}: no .xml annotation files")
    parsed = {path: _parse(path) for path in (xml_files if names is not None else every_xml)}
    if names is not None:
        categories = categories_from_names(read_class_names(names))
    else:
        found = {_object_name(path, index, obj) for path in every_xml for index, obj in enumerate(parsed[path].iter("object"))}
        if not found:
            raise DataError(f"{annotations_dir}: no <object> in any XML file; a detector needs at least one class")
        categories = categories_from_names(sorted(found))
    label_of = {category.name: category.label for category in categories}

    images: list[ImageRecord] = []
    bad: list[BadImage] = []
    dropped: Counter[str] = Counter()
    clipped: Counter[str] = Counter()
    corrected: Counter[str] = Counter()
    xml_of_image: dict[Path, Path] = {}
    for image_id, xml_path in enumerate(tqdm(xml_files, desc="voc", unit="xml", disable=not progress), start=1):
        root = parsed[xml_path]
        image_path, file_name = _image_path(xml_path, root, images_dir)
        if image_path in xml_of_image:
            raise DataError(f"{xml_path}: names image {file_name!r}, which {xml_of_image[image_path].name} names too")
        xml_of_image[image_path] = xml_path
        boxes = _read_objects(xml_path, root, label_of)
        where = f"{image_path} (image id {image_id}, {xml_path.name})"
        size = image_size_or_bad(image_path, file_name, image_id, where)
        if isinstance(size, BadImage):
            bad.append(BadImage(size.file_name, size.image_id, size.message, num_boxes=len(boxes)))
            continue
        width, height = size
        stated = _stated_size(xml_path, root)
        if stated is not None and stated != size:
            corrected[XML_SIZE_DIFFERS] += 1
            log.info("%s: <size> says %dx%d, the image is %dx%d; the image's size is used", xml_path, *stated, width, height)
        record = new_record(image_id, file_name, image_path, width, height)
        add_repaired_boxes(record, boxes, dropped, clipped)
        images.append(record)
    if corrected:
        log.warning("%s: %d XML <size> entries disagree with their images; the images' sizes are used", annotations_dir, corrected[XML_SIZE_DIFFERS])

    read = [*xml_files, *([Path(split)] if split is not None else []), *([Path(names)] if names is not None else [])]
    return CocoDataset(
        annotations_path=annotations_dir,
        annotations_sha256=digest_files(read, annotations_dir),
        categories=categories,
        images=images,
        dropped=dict(sorted(dropped.items())),
        clipped=dict(sorted(clipped.items())),
        bad_images=bad,
        corrected=dict(corrected),
        source_format="voc",
    )


def _split_files(split: Path, annotations_dir: Path) -> list[Path]:
    try:
        lines = split.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{split}: no such split file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{split}: cannot read split file ({exc})") from None
    files: list[Path] = []
    line_of: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        stem = line.split("#", 1)[0].strip()
        if not stem:
            continue
        if stem in line_of:
            raise DataError(f"{split}: line {number}: {stem!r} is listed twice (also line {line_of[stem]})")
        if "/" in stem or "\\" in stem:
            raise DataError(f"{split}: line {number}: {stem!r}: expected a file stem, not a path")
        line_of[stem] = number
        path = annotations_dir / f"{stem}.xml"
        if not path.is_file():
            raise DataError(f"{split}: line {number}: no annotation file {path}")
        files.append(path)
    return files


def _parse(path: Path) -> ElementTree.Element:
    # ElementTree on Python 3.11's expat refuses entity-expansion attacks ("billion laughs").
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: root element is <{root.tag}>, expected <annotation> (not a Pascal VOC file)")
    return root


def _object_name(path: Path, index: int, obj: ElementTree.Element) -> str:
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise DataError(f"{path}: object #{index + 1}: no <name>")
    return name


def _image_path(xml_path: Path, root: ElementTree.Element, images_dir: Path) -> tuple[Path, str]:
    """The image file under ``images_dir``: ``<filename>`` when it exists there, else the XML's stem."""
    file_name = (root.findtext("filename") or "").strip()
    if file_name:
        path = safe_image_path(xml_path, "<filename>", images_dir, file_name)
        if path.is_file():
            return path, file_name
    for suffix in IMAGE_SUFFIXES:
        for candidate in (f"{xml_path.stem}{suffix}", f"{xml_path.stem}{suffix.upper()}"):
            if (images_dir / candidate).is_file():
                return images_dir / candidate, candidate
    # Missing: reported with the other bad images, under the name the XML gives.
    file_name = file_name or f"{xml_path.stem}.jpg"
    return images_dir / file_name, file_name


def _stated_size(path: Path, root: ElementTree.Element) -> tuple[int, int] | None:
    size = root.find("size")
    if size is None:
        return None
    try:
        width, height = int(float(size.findtext("width") or 0)), int(float(size.findtext("height") or 0))
    except ValueError:
        raise DataError(f"{path}: <size> width/height must be numbers") from None
    return (width, height) if width > 0 and height > 0 else None  # 0x0 is a common "unknown"


def _read_objects(path: Path, root: ElementTree.Element, label_of: dict[str, int]) -> list[tuple[Box, int, bool]]:
    """Every ``<object>`` as (xyxy, label, difficult), before clipping to the image."""
    objects = []
    for index, obj in enumerate(root.iter("object")):
        where = f"{path}: object #{index + 1}"
        name = _object_name(path, index, obj)
        if name not in label_of:
            raise DataError(f"{where}: class {name!r} is not in the class names ({', '.join(label_of)})")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{where} ({name}): no <bndbox>")
        corners = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            text = (box.findtext(key) or "").strip()
            try:
                value = float(text)
            except ValueError:
                raise DataError(f"{where} ({name}): <{key}> must be a number, got {text!r}") from None
            if not math.isfinite(value):
                raise DataError(f"{where} ({name}): <{key}> is {text!r}")
            corners.append(value)
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise DataError(f"{where} ({name}): <difficult> must be 0 or 1, got {difficult!r}")
        objects.append((tuple(corners), label_of[name], difficult == "1"))
    return objects
