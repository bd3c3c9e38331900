"""What the folder formats (Pascal VOC, YOLO) share: the class-names file, one checksum over
many files, and each image's upright size read from its header.

A folder format has no single annotation file whose sha256 identifies the data set, so the
manifest's source checksum is a digest over every file that was read, in order, with names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

import yaml

from anchorless.errors import DataError
from anchorless.platform.data.coco import BadImage, Category, read_image_size

# The image extensions Ultralytics accepts, less the ones PIL cannot open without plug-ins.
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")


def read_class_names(path: str | Path) -> list[str]:
    """Class names in label order from a YOLO ``data.yaml`` (its ``names``: a list, or a
    ``{0: name, 1: ...}`` mapping) or a plain names file (one name a line, blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: no such names file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read names file ({exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        names = _names_from_yaml(path, text)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names; a detector needs at least one class")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise DataError(f"{path}: class name {name!r} is listed twice (ids {seen[name]} and {index})")
        seen[name] = index
    return names


def _names_from_yaml(path: Path, text: str) -> list[str]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from None
    names: Any = document.get("names") if isinstance(document, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{path}: 'names' keys must be the class ids 0..{len(names) - 1}, got {sorted(names)!r}")
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
        raise DataError(f"{path}: expected 'names' as a list of class names or a {{id: name}} mapping")
    return [name.strip() for name in names]


def categories_from_names(names: list[str]) -> list[Category]:
    """Label ``i`` is the ``i``-th name; its COCO category id is ``i + 1`` (COCO ids start at 1)."""
    return [Category(coco_id=label + 1, label=label, name=name) for label, name in enumerate(names)]


def digest_files(files: Iterable[Path], root: Path) -> str:
    """sha256 over each file's path relative to ``root`` and its bytes, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def image_size_or_bad(path: Path, file_name: str, image_id: int, where: str) -> tuple[int, int] | BadImage:
    """The upright size of an image from its header, or the :class:`BadImage` it is."""
    try:
        return read_image_size(path, where)
    except DataError as exc:
        return BadImage(file_name, image_id, str(exc))
