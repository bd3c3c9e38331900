"""The Ray Data pipeline: shards → decoded, augmented, fixed-shape batches → a worker.

``build_dataset`` reads the shards a manifest lists with ``read_parquet``, cuts
them into small blocks (so decoding runs in parallel even when there is only one
shard), keeps those encoded blocks in the object store when they are small
(every epoch is a new Ray Data execution; re-reading costs seconds) and decodes
+ transforms in ``map_batches`` tasks. Each output row has fixed shapes, so Ray
moves plain tensors:

=================  ==========================  ===========================================
column             dtype / shape               meaning
=================  ==========================  ===========================================
image              uint8 (3, S, S)             letterboxed image, not normalised
boxes              float32 (max_boxes, 4)      xyxy network pixels, zero-padded
labels             int64 (max_boxes,)          contiguous labels, padded with -1
num_boxes          int32                       valid rows of ``boxes``/``labels``
num_boxes_capped   int32                       boxes lost to the ``max_boxes`` cap
image_id           int64                       the COCO image id
scale              float32                     network pixels per original pixel
orig_width/height  int32                       the stored image's size
epoch              int32                       Ray Data's execution index (seeds augmentation)
=================  ==========================  ===========================================

Crowd boxes (``iscrowd``) are left out of training targets, as torchvision's
detection references do; evaluation reads them from :func:`coco_ground_truth`.

Augmentation is random per (seed, epoch, image id): the same run repeats the
same augmentation for an image, and each epoch draws new ones. The epoch is Ray
Data's own execution index of the dataset (the one its seeded shuffles use),
which ``streaming_split`` advances once per epoch. Row *order* is not
reproducible: Ray finishes parallel tasks in whatever order they finish.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from anchorless.platform.config import AugmentConfig, DataConfig
from anchorless.platform.errors import DataError
from anchorless.platform.shards import read_manifest, resolve_location
from anchorless.platform.transforms import Sample, eval_transform, train_transform

log = logging.getLogger(__name__)

# Rows per block and per decode task: small enough that one shard becomes many
# parallel tasks and a block of decoded 512 px images stays ~25 MB; large enough
# that per-task scheduling is noise (16 rows measured ~20% slower on 2 CPUs,
# see bench/data_pipeline.py).
DECODE_BLOCK_ROWS = 32


def build_dataset(
    shard_dir: str | os.PathLike[str],
    data_cfg: DataConfig,
    *,
    train: bool,
    seed: int = 0,
    block_rows: int = DECODE_BLOCK_ROWS,
) -> "ray.data.Dataset":  # noqa: F821 - ray is imported lazily
    """A Ray Dataset of decoded, transformed, fixed-shape rows (see the module docstring).

    Lazy, except that with ``data_cfg.cache_encoded`` (by default when the shards
    fit in a quarter of the object store) the shards are read once here and their
    encoded rows stay in the object store; each epoch then only decodes and
    augments.

    Args:
        shard_dir: a directory written by :func:`anchorless.platform.shards.write_shards`
            (local path or URI).
        data_cfg: the config's ``data`` section (image size, max boxes, augmentation,
            decode concurrency).
        train: augment (when ``data_cfg.augment.enabled``) and shuffle shard order;
            otherwise only letterbox (row order is not guaranteed either way).
        seed: the run's seed (``training.seed``) for augmentation and file order.
        block_rows: rows per decode task (a throughput knob, see ``DECODE_BLOCK_ROWS``).
    """
    import ray

    manifest = read_manifest(shard_dir)
    augment = data_cfg.augment if train and data_cfg.augment.enabled else None
    filesystem, base = resolve_location(shard_dir)
    dataset = ray.data.read_parquet(
        [f"{base}/{shard['file']}" for shard in manifest["shards"]],
        columns=["image_id", "width", "height", "image", "boxes", "labels", "iscrowd"],
        # The resolved filesystem: left to infer it, Ray probes for one on every epoch.
        filesystem=filesystem,
        shuffle=ray.data.FileShuffleConfig(seed=seed) if train else None,
        # Hive partitioning would read "key=value" path parts as columns.
        partitioning=None,
    )
    # Streaming split of each shard into small blocks: without it one shard is
    # one read task, and all of its images would decode in a single process.
    dataset = dataset.repartition(target_num_rows_per_block=block_rows)
    cached = _should_cache(manifest, data_cfg.cache_encoded)
    if cached:
        # Every epoch is a new execution; listing, reading and splitting the
        # shards again costs seconds each time, decoding from cached blocks none.
        dataset = dataset.materialize()
        if train:  # the file shuffle above ran once; shuffle block order every epoch instead
            dataset = dataset.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    dataset = dataset.map_batches(
        decode_and_transform,
        batch_size=block_rows,
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_kwargs={
            "image_size": data_cfg.image_size,
            "max_boxes": data_cfg.max_boxes,
            "augment": augment.model_dump() if augment is not None else None,
            "seed": seed,
        },
        compute=ray.data.TaskPoolStrategy(size=data_cfg.decode_concurrency),
        num_cpus=1,
    )
    if cached and train:
        # Ray Data reserves a share of the CPUs for each operator; with the input
        # cached, decoding is the only operator of a training stream that needs
        # them (measured 1.2-1.5x faster on 2 CPUs without the reservation).
        # Evaluation keeps it: a model actor pool usually follows there.
        dataset.context.op_resource_reservation_enabled = False
    return dataset


def _should_cache(manifest: dict[str, Any], mode: str) -> bool:
    if mode != "auto":
        return mode == "always"
    import ray

    shard_bytes = sum(shard["bytes"] for shard in manifest["shards"])
    return shard_bytes <= 0.25 * ray.cluster_resources().get("object_store_memory", 0)


def _execution_epoch() -> int:
    """Ray Data's execution index of the running dataset: 0, 1, 2... per epoch.

    A private attribute, but the one Ray's own seeded shuffles and random()
    expressions read; 0 when it is not there.
    """
    try:
        from ray.data import DataContext

        return int(getattr(DataContext.get_current(), "_execution_idx", 0))
    except Exception:  # outside Ray Data (unit tests of the decoder)
        return 0


_threads_set = False


def decode_and_transform(
    batch: pa.Table,
    *,
    image_size: int,
    max_boxes: int,
    augment: dict[str, Any] | None,
    seed: int,
    epoch: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode a block of shard rows and transform each image; fixed-shape numpy columns out."""
    from torchvision.io import ImageReadMode, decode_image

    global _threads_set
    if not _threads_set:  # one decode task per CPU: torch must not fan out inside it
        torch.set_num_threads(1)
        _threads_set = True
    augment_cfg = AugmentConfig(**augment) if augment is not None else None
    epoch = _execution_epoch() if epoch is None else epoch

    image_ids = batch.column("image_id").to_numpy()
    encoded = _binary_views(batch.column("image"))
    boxes, box_offsets = _list_values(batch.column("boxes"))
    labels, label_offsets = _list_values(batch.column("labels"))
    crowd, _ = _list_values(batch.column("iscrowd"))
    samples = []
    for row in range(batch.num_rows):
        image_id = int(image_ids[row])
        try:
            image = decode_image(encoded[row], mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise DataError(f"image id {image_id}: cannot decode the shard's image bytes ({exc})") from None
        start, end = label_offsets[row], label_offsets[row + 1]
        keep = ~crowd[start:end].astype(bool)
        samples.append(
            transform_image(
                image,
                boxes[box_offsets[row] : box_offsets[row + 1]].reshape(-1, 4)[keep],
                labels[start:end][keep],
                image_id=image_id,
                image_size=image_size,
                augment=augment_cfg,
                seed=seed,
                epoch=epoch,
            )
        )
    return pack_samples(
        samples,
        image_ids=image_ids,
        orig_widths=batch.column("width").to_numpy(),
        orig_heights=batch.column("height").to_numpy(),
        image_size=image_size,
        max_boxes=max_boxes,
        epoch=epoch,
    )


def pack_samples(
    samples: list[Sample],
    *,
    image_ids: np.ndarray,
    orig_widths: np.ndarray,
    orig_heights: np.ndarray,
    image_size: int,
    max_boxes: int,
    epoch: int,
) -> dict[str, np.ndarray]:
    """Transformed samples → the fixed-shape columns of the module docstring."""
    rows = len(samples)
    images = np.empty((rows, 3, image_size, image_size), dtype=np.uint8)
    out_boxes = np.zeros((rows, max_boxes, 4), dtype=np.float32)
    out_labels = np.full((rows, max_boxes), -1, dtype=np.int64)
    num_boxes = np.zeros(rows, dtype=np.int32)
    capped = np.zeros(rows, dtype=np.int32)
    scales = np.zeros(rows, dtype=np.float32)
    for row, sample in enumerate(samples):
        images[row] = sample.image.numpy()
        count = min(len(sample.labels), max_boxes)
        capped[row] = len(sample.labels) - count
        out_boxes[row, :count] = sample.boxes[:count].numpy()
        out_labels[row, :count] = sample.labels[:count].numpy()
        num_boxes[row] = count
        scales[row] = sample.scale
    if capped.any():
        log.warning(
            "%d boxes over the max_boxes=%d cap dropped in a block of %d images (the first ones are kept)",
            int(capped.sum()), max_boxes, rows,
        )
    return {
        "image": images,
        "boxes": out_boxes,
        "labels": out_labels,
        "num_boxes": num_boxes,
        "num_boxes_capped": capped,
        "image_id": np.asarray(image_ids, dtype=np.int64),
        "scale": scales,
        "orig_width": np.asarray(orig_widths, dtype=np.int32),
        "orig_height": np.asarray(orig_heights, dtype=np.int32),
        "epoch": np.full(rows, epoch, dtype=np.int32),
    }


def transform_image(
    image: torch.Tensor,
    boxes: np.ndarray,
    labels: np.ndarray,
    *,
    image_id: int,
    image_size: int,
    augment: AugmentConfig | None,
    seed: int,
    epoch: int,
) -> Sample:
    """One decoded image (3, H, W) uint8 and its xyxy boxes → the network input.

    Augmented (when ``augment`` is given) with a generator seeded by
    (seed, epoch, image id), so an image's augmentation does not depend on which
    task or worker happens to process it.
    """
    sample = Sample.create(image, boxes, labels)
    if augment is None:
        return eval_transform(sample, image_size)
    rng = np.random.default_rng([seed, epoch, image_id % 2**63])
    return train_transform(sample, rng, size=image_size, augment=augment)


def _binary_views(column: pa.ChunkedArray | pa.Array) -> list[torch.Tensor]:
    """Each encoded image as a uint8 tensor viewing the Arrow buffer (no copy)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise DataError("a shard row has no image bytes")
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
    data = array.buffers()[2]
    with warnings.catch_warnings():  # Arrow buffers are read-only; decoding only reads
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8) if data is not None and data.size else torch.empty(0, dtype=torch.uint8)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def _list_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column's flat values and per-row offsets into them (no copy without nulls)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    return array.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


# --- the worker side ----------------------------------------------------------------------------


def to_model_inputs(
    batch: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A pipeline batch → what a detector takes.

    Returns ``images`` float (B, 3, S, S) in [0, 1] on ``device`` (moved as uint8,
    converted there), ``targets`` a list of ``{"boxes" (N, 4) float32 xyxy,
    "labels" (N,) int64}`` without padding, and ``meta`` with ``image_id``,
    ``scale``, ``orig_width``, ``orig_height``, ``num_boxes_capped``, ``epoch`` (CPU tensors).
    """
    device = torch.device(device)
    with warnings.catch_warnings():  # Ray hands out read-only arrays; the image is only read, then converted
        warnings.simplefilter("ignore", UserWarning)
        images = torch.as_tensor(batch["image"]).to(device, non_blocking=True).float().div_(255.0)
    boxes, labels = np.asarray(batch["boxes"]), np.asarray(batch["labels"])
    targets = [
        {
            "boxes": torch.tensor(boxes[i, :n], dtype=torch.float32, device=device),
            "labels": torch.tensor(labels[i, :n], dtype=torch.int64, device=device),
        }
        for i, n in enumerate(np.asarray(batch["num_boxes"]).tolist())
    ]
    meta = {
        key: torch.tensor(np.asarray(batch[key]))
        for key in ("image_id", "scale", "orig_width", "orig_height", "num_boxes_capped", "epoch")
        if key in batch
    }
    return images, targets, meta


def steps_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    """Batches every rank runs per epoch.

    Ray Train splits a dataset with ``streaming_split(world_size, equal=True)``:
    every rank gets exactly ``num_images // world_size`` rows (at most
    ``world_size - 1`` images sit out an epoch). Batches are taken with
    ``drop_last=True``, so every rank runs ``rows // batch_size`` steps and the
    collective ops of data-parallel training never wait on a rank with one
    batch fewer. Augmentation and file shuffling change which images sit out.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size and batch_size must be >= 1, got {world_size}, {batch_size}")
    return (num_images // world_size) // batch_size


def iter_batches_for_steps(
    iterator: Any,
    *,
    batch_size: int,
    steps: int,
    device: torch.device | str = "cpu",
    prefetch_batches: int = 2,
    shuffle_buffer: int | None = None,
) -> Iterator[tuple[torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]:
    """Exactly ``steps`` model-ready batches from a Ray ``DataIterator`` or ``Dataset``.

    The underlying epoch is drained after the last step (so Ray counts the
    epoch as finished and the next one draws new augmentations), and the number
    of boxes lost to the ``max_boxes`` cap is logged once per epoch.
    """
    batches = iterator.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=True,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer,
    )
    taken = capped = 0
    for batch in batches:
        if taken == steps:
            continue  # drain: rows beyond the planned steps are not trained on
        taken += 1
        capped += int(np.sum(batch["num_boxes_capped"]))
        yield to_model_inputs(batch, device)
    if taken < steps:
        raise RuntimeError(
            f"data ran out after {taken} of {steps} planned steps; every rank must run the same number"
        )
    if capped:
        log.warning("%d boxes dropped this epoch by the max_boxes cap", capped)


def iter_train_batches(
    data_cfg: DataConfig,
    *,
    num_images: int,
    dataset_name: str = "train",
    device: torch.device | str = "cpu",
    shuffle_buffer: int | None = None,
) -> Iterator[tuple[torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]]:
    """Inside a Ray Train worker: this rank's batches for one epoch, the same count on every rank.

    ``num_images`` is the manifest's ``num_images`` of the split the trainer was
    given as ``datasets={dataset_name: build_dataset(...)}``. Call once per epoch.
    """
    import ray.train

    context = ray.train.get_context()
    steps = steps_per_epoch(num_images, context.get_world_size(), data_cfg.batch_size)
    yield from iter_batches_for_steps(
        ray.train.get_dataset_shard(dataset_name),
        batch_size=data_cfg.batch_size,
        steps=steps,
        device=device,
        prefetch_batches=data_cfg.prefetch_batches,
        shuffle_buffer=shuffle_buffer,
    )
