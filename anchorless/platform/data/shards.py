"""A validated data set (COCO, VOC or YOLO) → Parquet shards + ``manifest.json``, and reading them back.

One row per image: ``image_id``, ``file_name``, ``width``, ``height``, the
encoded ``image`` bytes exactly as stored (never re-encoded), and the image's
boxes as flat ``list<float32>`` xyxy in stored-image pixels (``4 * N`` values),
contiguous ``labels``, ``iscrowd`` and COCO ``areas`` (kept for evaluation,
whose small/medium/large split uses them). ``manifest.json`` holds the category
table, per-shard counts and sha256, the source's format and sha256, what was
dropped, clipped or corrected, and the images skipped as bad. Nothing in a shard
or the manifest depends on the time or the machine, so the same input gives
byte-identical output; the same data from COCO, VOC or YOLO gives byte-identical
shards (the manifests differ only in ``source``).

An image that is missing, unreadable, truncated or not the size its annotations
say is a bad image. Every one is found (the whole data set is read) and listed in
one error, and nothing is written; with ``skip_bad_images`` they are left out,
logged and listed in the manifest (``skipped_images``, their boxes counted as
``dropped.image_skipped``).

Output goes through pyarrow's filesystems, so ``out`` may be a local path or a
URI such as ``s3://bucket/prefix`` (an S3 endpoint from ``$AWS_ENDPOINT_URL``).
Everything is written under a temporary name next to ``out`` and moved into place
only when all of it succeeded; on an object store, where there is no directory
rename, the manifest is written last, so a reader that finds one finds every shard
it lists, and a writer killed half-way leaves no manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import posixpath
import uuid
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from tqdm import tqdm

from anchorless.errors import DataError
from anchorless.platform.data.coco import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_SKIPPED,
    BadImage,
    CocoDataset,
    ImageRecord,
    load_coco,
    verify_image_bytes,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "anchorless-shards"
FORMAT_VERSION = 1
ROW_GROUP_BYTES = 32 * 2**20  # bounds a writer's and a reader's memory per row group

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
        ("boxes", pa.list_(pa.float32())),  # flat xyxy, 4 values per box
        ("labels", pa.list_(pa.int32())),
        ("iscrowd", pa.list_(pa.bool_())),
        ("areas", pa.list_(pa.float32())),
    ]
)
METADATA_COLUMNS = [name for name in SHARD_SCHEMA.names if name != "image"]


# --- paths -------------------------------------------------------------------------------------


def resolve_location(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or a URI."""
    location = os.fspath(location)
    if "://" in location:
        try:
            filesystem, path = pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise DataError(f"{location}: cannot open this location ({exc})") from None
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(location)


# --- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardTask:
    index: int
    file: str
    records: list[ImageRecord]
    row_group_size: int
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def write_shards(
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    **options: Any,
) -> dict[str, Any]:
    """Validate a COCO data set (instances JSON + image root) and shard it; see :func:`shard_dataset`."""
    return shard_dataset(partial(load_coco, annotations, images), out, **options)


def shard_dataset(
    load: Callable[[], CocoDataset],
    out: str | os.PathLike[str],
    *,
    target_shard_mb: float = 256.0,
    workers: int | None = None,
    progress: bool = True,
    skip_bad_images: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Validate a data set and write it as Parquet shards plus ``manifest.json``.

    Args:
        load: reads and validates the source (``load_coco``, ``load_voc``, ``load_yolo``
            with their arguments bound); called once ``out`` is known to be usable.
        out: shard directory, a local path or a URI (``s3://bucket/prefix``). If it
            exists it must be empty or an earlier shard directory (it is replaced).
        target_shard_mb: shards are cut when the next image would push a shard's
            encoded image bytes past this many MiB.
        workers: parallel shard writers (processes); default one per CPU, at most
            one per shard.
        progress: show a tqdm bar (images written).
        skip_bad_images: leave missing, unreadable or truncated images out (listed in
            the manifest) instead of failing.
        max_image_pixels: an image whose header declares more pixels is a bad image,
            refused before it is decoded (decompression bombs).

    Returns:
        The manifest (also written as ``out/manifest.json``).

    Raises:
        DataError: on any input problem that makes the data set unusable, every bad
            image listed, and on a data set with no image to write; nothing is left at
            ``out`` or next to it.
    """
    if target_shard_mb <= 0:
        raise DataError(f"target shard size must be positive, got {target_shard_mb} MB")
    if max_image_pixels < 1:
        raise DataError(f"the image pixel limit must be positive, got {max_image_pixels}")
    filesystem, out_path = resolve_location(out)
    shown = os.fspath(out)
    _check_replaceable(filesystem, out_path, shown)
    dataset = load()
    if not dataset.images and not dataset.bad_images:
        # Training on it would fail much later, and far from the cause.
        raise DataError(f"{dataset.annotations_path}: no images (an empty split); nothing was written")
    tasks = _plan_shards(dataset, target_bytes=int(target_shard_mb * 2**20), max_image_pixels=max_image_pixels)

    tmp_path = _sibling(out_path, f".{posixpath.basename(out_path)}.tmp-{uuid.uuid4().hex[:12]}")
    filesystem.create_dir(tmp_path, recursive=True)
    try:
        shards, unreadable = _write_all(filesystem, tmp_path, tasks, workers=workers, progress=progress)
        bad = dataset.bad_images + unreadable
        if bad and not skip_bad_images:
            raise DataError(_bad_images_message(bad))
        if not sum(shard["num_images"] for shard in shards):
            listed = "\n".join(f"  {image.message}" for image in bad)
            raise DataError(f"{dataset.annotations_path}: all {len(bad)} images are bad, none left to shard; nothing was written:\n{listed}")
        manifest = _manifest(dataset, shards, skipped=bad)
        _move_into_place(filesystem, tmp_path, out_path, shown, _manifest_bytes(manifest))
    except BaseException:
        _delete_quietly(filesystem, tmp_path)
        raise
    _log_repairs(manifest, shown)
    return manifest


def _bad_images_message(bad: list[BadImage]) -> str:
    hint = "--skip-bad-images (skip_bad_images=True) leaves bad images out and lists them in the manifest"
    if len(bad) == 1:
        return f"{bad[0].message}; nothing was written ({hint})"
    return f"{len(bad)} bad images; nothing was written ({hint}):\n" + "\n".join(f"  {image.message}" for image in bad)


def _plan_shards(dataset: CocoDataset, *, target_bytes: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[_ShardTask]:
    """Consecutive images grouped by encoded size; the same input gives the same plan."""
    groups: list[list[ImageRecord]] = []
    group_bytes = 0
    sizes = []
    for record in dataset.images:
        size = record.path.stat().st_size
        sizes.append(size)
        if not groups or (group_bytes + size > target_bytes and groups[-1]):
            groups.append([])
            group_bytes = 0
        groups[-1].append(record)
        group_bytes += size
    if not groups:  # only bad images, all missing: still planned, so the error lists them
        groups = [[]]
    mean_size = max(1, int(np.mean(sizes))) if sizes else 1
    row_group_size = max(1, ROW_GROUP_BYTES // mean_size)
    width = max(5, len(str(len(groups) - 1)))
    return [
        _ShardTask(
            index=index, file=f"shard-{index:0{width}d}.parquet", records=records,
            row_group_size=row_group_size, max_image_pixels=max_image_pixels,
        )  # fmt: skip
        for index, records in enumerate(groups)
    ]


def _write_all(
    filesystem: pafs.FileSystem, tmp_path: str, tasks: list[_ShardTask], *, workers: int | None, progress: bool
) -> tuple[list[dict[str, Any]], list[BadImage]]:
    """Every shard written; their manifest entries and the images that did not decode, in shard order."""
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    total = sum(len(task.records) for task in tasks)
    results: dict[int, tuple[dict[str, Any], list[BadImage]]] = {}
    with tqdm(total=total, desc="shard", unit="img", disable=not progress) as bar:
        if workers <= 1:
            for task in tasks:
                results[task.index] = _write_shard(filesystem, tmp_path, task)
                bar.update(len(task.records))
        else:
            # A process pool, not Ray tasks: the image root is a local directory
            # that only this machine can read, and sharding should not need a
            # cluster. Processes, not threads, so per-image Python work runs in
            # parallel; "spawn" because the caller may hold threads (Ray, tqdm).
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                pending = {pool.submit(_write_shard, filesystem, tmp_path, task): task for task in tasks}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        task = pending.pop(future)
                        if future.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise future.exception()
                        results[task.index] = future.result()
                        bar.update(len(task.records))
    ordered = [results[index] for index in sorted(results)]
    return [entry for entry, _ in ordered], [image for _, bad in ordered for image in bad]


def _write_shard(filesystem: pafs.FileSystem, tmp_path: str, task: _ShardTask) -> tuple[dict[str, Any], list[BadImage]]:
    """Read, verify and write one shard; returns its manifest entry and the images that did not decode."""
    path = f"{tmp_path}/{task.file}"
    num_images = num_boxes = 0
    bad: list[BadImage] = []
    with filesystem.open_output_stream(path) as sink:
        with pq.ParquetWriter(
            sink,
            SHARD_SCHEMA,
            compression={name: ("NONE" if name == "image" else "ZSTD") for name in SHARD_SCHEMA.names},
            use_dictionary=False,
            write_statistics=["image_id", "width", "height"],
            store_schema=True,
        ) as writer:
            for start in range(0, len(task.records), task.row_group_size):
                chunk, encoded = _read_verified(task.records[start : start + task.row_group_size], bad, task.max_image_pixels)
                if chunk:
                    writer.write_table(_rows_table(chunk, encoded), row_group_size=len(chunk))
                num_images += len(chunk)
                num_boxes += sum(len(record.labels) for record in chunk)
            if not num_images:
                writer.write_table(SHARD_SCHEMA.empty_table())
    entry = {
        "file": task.file,
        "num_images": num_images,
        "num_boxes": num_boxes,
        "bytes": filesystem.get_file_info(path).size,
        "sha256": _sha256(filesystem, path),
    }
    return entry, bad


def _read_verified(
    records: list[ImageRecord], bad: list[BadImage], max_image_pixels: int
) -> tuple[list[ImageRecord], list[bytes]]:
    """The records whose file reads and decodes to its recorded size, with their bytes; the rest go to ``bad``."""
    kept, encoded = [], []
    for record in records:
        try:
            try:
                data = record.path.read_bytes()
            except OSError as exc:
                raise DataError(f"{record.path} (image id {record.image_id}): cannot read image file ({exc.strerror})") from None
            verify_image_bytes(data, record, max_pixels=max_image_pixels)
        except DataError as exc:
            bad.append(BadImage(record.file_name, record.image_id, str(exc), num_boxes=len(record.labels)))
            continue
        kept.append(record)
        encoded.append(data)
    return kept, encoded


def _rows_table(records: list[ImageRecord], encoded: list[bytes]) -> pa.Table:
    def lists(values: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum([len(v) for v in values], out=offsets[1:])
        flat = np.concatenate(values) if values else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))

    return pa.Table.from_arrays(
        [
            pa.array([r.image_id for r in records], pa.int64()),
            pa.array([r.file_name for r in records], pa.string()),
            pa.array([r.width for r in records], pa.int32()),
            pa.array([r.height for r in records], pa.int32()),
            pa.array(encoded, pa.binary()),
            lists([r.boxes.reshape(-1) for r in records], pa.float32()),
            lists([r.labels for r in records], pa.int32()),
            lists([r.iscrowd for r in records], pa.bool_()),
            lists([r.areas for r in records], pa.float32()),
        ],
        schema=SHARD_SCHEMA,
    )


def _manifest(dataset: CocoDataset, shards: list[dict[str, Any]], *, skipped: list[BadImage]) -> dict[str, Any]:
    skipped_ids = {image.image_id for image in skipped}
    dropped = dict(dataset.dropped)
    skipped_boxes = sum(image.num_boxes for image in skipped)
    if skipped_boxes:
        dropped[IMAGE_SKIPPED] = skipped_boxes
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {
            "format": dataset.source_format,
            "annotations": dataset.annotations_path.name,
            "sha256": dataset.annotations_sha256,
        },
        "num_images": sum(shard["num_images"] for shard in shards),
        "num_boxes": sum(shard["num_boxes"] for shard in shards),
        "num_crowd_boxes": int(
            sum(record.iscrowd.sum() for record in dataset.images if record.image_id not in skipped_ids)
        ),
        "dropped": dict(sorted(dropped.items())),
        "clipped": dict(dataset.clipped),
        "corrected": dict(dataset.corrected),
        "skipped_images": [image.manifest_entry() for image in skipped],
        "categories": [
            {"label": category.label, "coco_id": category.coco_id, "name": category.name}
            for category in dataset.categories
        ],
        "shards": shards,
    }


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of ``manifest.json`` as this module writes it: the data set's identity (the
    manifest lists every shard's checksum), recorded with models and compared by the registry."""
    return hashlib.sha256(_manifest_bytes(manifest)).hexdigest()


# --- atomic placement --------------------------------------------------------------------------


def _sibling(path: str, name: str) -> str:
    return posixpath.join(posixpath.dirname(path), name) if "/" in path else name


def _check_replaceable(filesystem: pafs.FileSystem, path: str, shown: str) -> None:
    """``out`` may be absent, an empty directory or an earlier shard directory."""
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise DataError(f"{shown}: exists and is not a directory; refusing to overwrite it")
    entries = filesystem.get_file_info(pafs.FileSelector(path))
    if entries and filesystem.get_file_info(f"{path}/{MANIFEST}").type != pafs.FileType.File:
        raise DataError(f"{shown}: exists and is not a shard directory (no {MANIFEST}); refusing to overwrite it")


def _move_into_place(filesystem: pafs.FileSystem, tmp_path: str, out_path: str, shown: str, manifest: bytes) -> None:
    """The shards written under ``tmp_path`` become the data set at ``out_path``, ``manifest`` with them."""
    _check_replaceable(filesystem, out_path, shown)
    if isinstance(filesystem, pafs.LocalFileSystem):
        # A directory rename is atomic: readers see the old data set or the new one.
        _write_bytes(filesystem, f"{tmp_path}/{MANIFEST}", manifest)
        old_path = None
        if filesystem.get_file_info(out_path).type != pafs.FileType.NotFound:
            old_path = _sibling(out_path, f".{posixpath.basename(out_path)}.old-{uuid.uuid4().hex[:12]}")
            os.replace(out_path, old_path)
        os.replace(tmp_path, out_path)
        if old_path is not None:
            filesystem.delete_dir(old_path)
        return
    # Object stores have no directory rename. The old manifest goes first (its data set is
    # about to change under it), the shards move (a server-side copy on S3), and the new
    # manifest is written last: a reader that finds a manifest finds every shard it lists,
    # and a writer killed anywhere on the way leaves none.
    if filesystem.get_file_info(out_path).type == pafs.FileType.Directory:
        if filesystem.get_file_info(f"{out_path}/{MANIFEST}").type == pafs.FileType.File:
            filesystem.delete_file(f"{out_path}/{MANIFEST}")
        filesystem.delete_dir_contents(out_path, missing_dir_ok=True)
    filesystem.create_dir(out_path, recursive=True)
    for name in sorted(info.base_name for info in filesystem.get_file_info(pafs.FileSelector(tmp_path))):
        filesystem.move(f"{tmp_path}/{name}", f"{out_path}/{name}")
    _write_bytes(filesystem, f"{out_path}/{MANIFEST}", manifest)
    filesystem.delete_dir(tmp_path)


def _delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_dir(path)
    except (OSError, pa.ArrowException):
        log.warning("could not remove temporary shard directory %s", path)


def _write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    with filesystem.open_output_stream(path) as sink:
        sink.write(data)


def _sha256(filesystem: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as source:
        for chunk in iter(lambda: source.read(8 * 2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _log_repairs(manifest: dict[str, Any], shown: str) -> None:
    for kind in ("dropped", "clipped"):
        if manifest[kind]:
            counts = ", ".join(f"{reason}={count}" for reason, count in manifest[kind].items())
            log.warning("%s: %s boxes: %s", shown, kind, counts)
    if manifest["skipped_images"]:
        log.warning("%s: %d bad image(s) skipped (listed in %s)", shown, len(manifest["skipped_images"]), MANIFEST)


def format_manifest_summary(manifest: dict[str, Any], shard_dir: str | os.PathLike[str]) -> str:
    """A few lines for people: totals, categories, what was dropped, clipped, corrected or skipped."""
    source = manifest["source"]
    lines = [
        f"{os.fspath(shard_dir)}: {manifest['num_images']} images, {manifest['num_boxes']} boxes "
        f"in {len(manifest['shards'])} shard(s) (source {source.get('format', 'coco')} {source['annotations']} "
        f"sha256 {source['sha256'][:12]})",
        "  categories: "
        + ", ".join(f"{c['label']}={c['name']} (coco {c['coco_id']})" for c in manifest["categories"]),
    ]
    for kind in ("dropped", "clipped"):
        counts = manifest[kind]
        text = ", ".join(f"{reason}={count}" for reason, count in counts.items()) if counts else "none"
        lines.append(f"  {kind} boxes: {text}")
    if manifest.get("corrected"):
        lines.append("  corrected: " + ", ".join(f"{reason}={count}" for reason, count in manifest["corrected"].items()))
    skipped = manifest.get("skipped_images") or []
    if skipped:
        lines.append(f"  skipped images: {len(skipped)} (listed in manifest.json)")
        lines += [f"    {image['problem']}" for image in skipped[:10]]
        if len(skipped) > 10:
            lines.append(f"    ... and {len(skipped) - 10} more")
    return "\n".join(lines)


# --- reading -----------------------------------------------------------------------------------


def read_manifest(shard_dir: str | os.PathLike[str], *, verify: bool = False) -> dict[str, Any]:
    """Read ``manifest.json``; with ``verify``, check every shard's sha256 too."""
    filesystem, path = resolve_location(shard_dir)
    manifest_path = f"{path}/{MANIFEST}"
    shown = f"{os.fspath(shard_dir).rstrip('/')}/{MANIFEST}"
    try:
        with filesystem.open_input_stream(manifest_path) as source:
            raw = source.read()
    except FileNotFoundError:
        raise DataError(f"{shown}: no manifest; not a shard directory (run `anchorless data shard`)") from None
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{shown}: cannot read manifest ({exc})") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{shown}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{shown}: not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{shown}: format_version {manifest.get('format_version')!r}, this version reads {FORMAT_VERSION}; re-shard"
        )
    if verify:
        for shard in manifest["shards"]:
            shard_path = f"{path}/{shard['file']}"
            try:
                actual = _sha256(filesystem, shard_path)
            except FileNotFoundError:
                raise DataError(f"{shown}: shard {shard['file']} is missing") from None
            if actual != shard["sha256"]:
                raise DataError(
                    f"{shown}: shard {shard['file']} has sha256 {actual[:12]}..., the manifest says "
                    f"{shard['sha256'][:12]}...; the shard is corrupt or was changed"
                )
    return manifest


def iter_shard_tables(
    shard_dir: str | os.PathLike[str], manifest: dict[str, Any], columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """Each shard as a pyarrow Table (only ``columns`` when given), in manifest order."""
    filesystem, path = resolve_location(shard_dir)
    for shard in manifest["shards"]:
        yield pq.read_table(f"{path}/{shard['file']}", columns=columns, filesystem=filesystem)


def coco_ground_truth(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A COCO instances dict rebuilt from the shards, for pycocotools evaluation.

    Original image ids, COCO category ids, ``bbox`` xywh in original pixels,
    ``iscrowd`` and ``area`` as in the source; annotation ids are 1..N in shard
    order. Boxes dropped at ingest are absent here too.
    """
    manifest = read_manifest(shard_dir)
    category_of = {c["label"]: c["coco_id"] for c in manifest["categories"]}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for table in iter_shard_tables(shard_dir, manifest, columns=METADATA_COLUMNS):
        columns = table.to_pydict()
        for row in range(table.num_rows):
            image_id = columns["image_id"][row]
            images.append(
                {
                    "id": image_id,
                    "file_name": columns["file_name"][row],
                    "width": columns["width"][row],
                    "height": columns["height"][row],
                }
            )
            boxes = np.asarray(columns["boxes"][row], dtype=np.float64).reshape(-1, 4)
            for box, label, crowd, area in zip(
                boxes, columns["labels"][row], columns["iscrowd"][row], columns["areas"][row]
            ):
                x0, y0, x1, y1 = (float(v) for v in box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category_of[label],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(area),
                        "iscrowd": int(crowd),
                    }
                )
    categories = [{"id": c["coco_id"], "name": c["name"]} for c in manifest["categories"]]
    return {"images": images, "annotations": annotations, "categories": categories}
