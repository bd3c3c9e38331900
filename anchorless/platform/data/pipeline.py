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
epoch              int32                       the pass over the split that drew the augmentation
=================  ==========================  ===========================================

Crowd boxes (``iscrowd``) are left out of training targets, as torchvision's
detection references do; evaluation reads them from :func:`coco_ground_truth`.

Training streams: when the encoded split is cached, one Ray Data execution
streams many shuffled passes over it (``data.stream_rows`` rows), so the
start-up of an execution is not paid every epoch; a worker cuts its part of the
stream into epochs of a fixed number of steps (:class:`EpochStream`), and starts
the next execution when one ends. Uncached (large) splits stream one pass per
execution. Within an execution Ray Data decodes ahead of the consumer until the
pipeline's object-store budget is spent (~1.2 GB measured with 512 px BCCD on
this 2-CPU machine), which is why a run caps the passes at its epochs.

Mixup (``data.mixup``) blends an image with another of its decode block, drawn
with the same seeding (:mod:`anchorless.platform.data.mixup`). Multi-scale
training (``data.multiscale``) happens on the worker, per batch
(:func:`multiscale_size`, :func:`resize_batch`): the pipeline ships one shape.

Augmentation is random per (seed, pass, image id), so an image's augmentation
does not depend on which task decodes it, and each pass draws new ones. The pass
counts on across executions (Ray Data's execution index, the one its seeded
shuffles use, times the passes per execution). Row *order* is not reproducible:
Ray finishes parallel tasks in whatever order they finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from anchorless.platform.config import AugmentConfig, DataConfig
from anchorless.errors import DataError
from anchorless.platform.data.images import decode_image_bytes
from anchorless.platform.data.mixup import mix_samples
from anchorless.platform.data.shards import read_manifest, resolve_location
from anchorless.platform.data.transforms import Sample, eval_transform, train_transform
from anchorless.platform.ray_session import ImportedWhereCalled

log = logging.getLogger(__name__)

# The shard columns decode_and_transform reads: what build_dataset (and offline evaluation
# decoding in its own process) read from the Parquet shards.
DECODE_COLUMNS = ["image_id", "width", "height", "image", "boxes", "labels", "iscrowd"]

# Rows per block and per decode task: small enough that one shard becomes many
# parallel tasks and a block of decoded 512 px images stays ~25 MB; large enough
# that per-task scheduling is noise (16 rows measured ~20% slower on 2 CPUs,
# see bench/data_pipeline.py).
DECODE_BLOCK_ROWS = 32
# Rows one decode task of a training stream works through, handing out each
# block as it is done. Ray Data leaves a CPU idle for a while between tasks;
# measured on BCCD, 2 CPUs, images/s for 32/128/256/512/1024 rows per task:
# 240/280/315/350/315 (bench/data_pipeline.py's Ray side alone).
STREAM_ROWS_PER_TASK = 512


def build_dataset(
    shard_dir: str | os.PathLike[str],
    data_cfg: DataConfig,
    *,
    train: bool,
    seed: int = 0,
    block_rows: int = DECODE_BLOCK_ROWS,
    max_passes: int | None = None,
) -> "ray.data.Dataset":  # noqa: F821 - ray is imported lazily
    """A Ray Dataset of decoded, transformed, fixed-shape rows (see the module docstring).

    Lazy, except that with ``data_cfg.cache_encoded`` (by default when the shards
    fit in a quarter of the object store) the shards are read once here and their
    encoded rows stay in the object store; each pass then only decodes and
    augments, and a training dataset streams many passes per execution.

    Args:
        shard_dir: a directory written by :func:`anchorless.platform.data.shards.write_shards`
            (local path or URI).
        data_cfg: the config's ``data`` section (image size, max boxes, augmentation,
            decode concurrency).
        train: augment (when ``data_cfg.augment.enabled``) and shuffle shard order;
            otherwise only letterbox (row order is not guaranteed either way).
        seed: the run's seed (``training.seed``) for augmentation and file order.
        block_rows: rows per decode block (a throughput knob, see ``DECODE_BLOCK_ROWS``).
        max_passes: at most this many passes per execution of a cached training
            stream (the run's epochs: Ray Data decodes ahead of the consumer until
            its object-store budget is used, and passes no epoch needs are waste).
    """
    import ray

    manifest = read_manifest(shard_dir)
    augment = data_cfg.augment if train and data_cfg.augment.enabled else None
    filesystem, base = resolve_location(shard_dir)
    with _parquet_reader_v1():
        dataset = ray.data.read_parquet(
            [f"{base}/{shard['file']}" for shard in manifest["shards"]],
            columns=DECODE_COLUMNS,
            # The resolved filesystem: left to infer it, Ray probes for one on every epoch.
            filesystem=filesystem,
            shuffle=ray.data.FileShuffleConfig(seed=seed) if train else None,
            # Hive partitioning would read "key=value" path parts as columns.
            partitioning=None,
        )
    # Streaming split of each shard into small blocks: without it one shard is
    # one read task, and all of its images would decode in a single process.
    dataset = dataset.repartition(target_num_rows_per_block=block_rows)
    decode_kwargs = {
        "image_size": data_cfg.image_size,
        "max_boxes": data_cfg.max_boxes,
        "augment": augment.model_dump() if augment is not None else None,
        "seed": seed,
        "mixup": data_cfg.mixup.model_dump() if train and data_cfg.mixup.enabled else None,
    }
    compute = ray.data.TaskPoolStrategy(size=data_cfg.decode_concurrency)
    cached = _should_cache(manifest, data_cfg.cache_encoded)
    if cached and train:
        passes = passes_per_execution(manifest["num_images"], data_cfg.stream_rows, max_passes)
        stream = _multi_pass_stream(
            dataset.materialize(),
            passes=passes,
            blocks_per_task=max(1, STREAM_ROWS_PER_TASK // block_rows),
            decode_kwargs=decode_kwargs,
            compute=compute,
        )
        # Ray Data reserves a share of the CPUs for each operator; decoding is the
        # only operator of this stream that needs them (measured 1.2-1.5x faster
        # on 2 CPUs without the reservation). Evaluation keeps it: a model actor
        # pool usually follows there.
        stream.context.op_resource_reservation_enabled = False
        return stream
    if cached:
        # Every epoch is a new execution; listing, reading and splitting the
        # shards again costs seconds each time, decoding from cached blocks none.
        dataset = dataset.materialize()
    return dataset.map_batches(
        ImportedWhereCalled.of(decode_and_transform),  # Ray's coordinators need not import torch
        batch_size=block_rows,
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_kwargs=decode_kwargs,
        compute=compute,
        num_cpus=1,
    )


@contextlib.contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Ray Data's first Parquet reader for the ``read_parquet`` calls inside.

    The second (Ray's default) lists files by reading every footer on a pool of up to 32
    new actors, each a Python process of its own, once per read: ~1 min for a run's train
    and validation reads on 2 busy CPUs (one 18-image shard: 7.5 s, against 0.2 s here).
    Shards are a few files written by us, whose footers need no pool.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    chosen = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = chosen


def passes_per_execution(num_images: int, stream_rows: int, max_passes: int | None = None) -> int:
    """Passes over a cached training split that one Ray Data execution streams: about ``stream_rows`` rows."""
    passes = max(1, -(-stream_rows // max(1, num_images)))
    return passes if max_passes is None else max(1, min(passes, max_passes))


def _multi_pass_stream(
    cached: "ray.data.MaterializedDataset",  # noqa: F821
    *,
    passes: int,
    blocks_per_task: int,
    decode_kwargs: dict[str, Any],
    compute: Any,
) -> "ray.data.Dataset":  # noqa: F821
    """``passes`` shuffled passes over cached encoded blocks as one Ray Data execution.

    Ray Data has no repeat (its DatasetPipeline is gone), and each execution costs
    a start-up (~0.3 s to the first batch on BCCD, a third of an epoch there).
    Item ``i`` of a ``range`` is block ``i % num_blocks`` of pass ``i // num_blocks``
    in that pass's seeded block order; its decode task fetches the cached block by
    reference (no copy of the encoded bytes) and augments it with the pass's seed.
    Items run in order, so passes follow each other (blocks at a pass boundary may
    overlap, as a DataLoader's persistent workers refill across epochs). A task
    decodes ``blocks_per_task`` blocks and hands each out as it is done.
    """
    import ray

    blocks = [ref for bundle in cached.iter_internal_ref_bundles() for ref in bundle.block_refs]
    items = passes * len(blocks)
    # A short stream still gets a few tasks per CPU, or one task would decode it all.
    blocks_per_task = max(1, min(blocks_per_task, items // (2 * max(1, int(ray.cluster_resources().get("CPU", 1))))))
    return ray.data.range(items, override_num_blocks=-(-items // blocks_per_task)).map_batches(
        ImportedWhereCalled.of(_decode_stream_items),
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"blocks": blocks, "passes": passes, **decode_kwargs},
        compute=compute,
        num_cpus=1,
    )


def stream_pass_order(seed: int, data_pass: int, num_blocks: int) -> np.ndarray:
    """The block order of one pass of a multi-pass stream (deterministic per seed and pass)."""
    return np.random.default_rng([seed, data_pass]).permutation(num_blocks)


def _decode_stream_items(
    items: dict[str, np.ndarray], *, blocks: list[Any], passes: int, seed: int, **decode_kwargs: Any
) -> Iterator[dict[str, np.ndarray]]:
    import ray

    for item in items["id"].tolist():
        # Each execution of the stream goes on from where the last one ended.
        data_pass = _execution_epoch() * passes + item // len(blocks)
        block = ray.get(blocks[stream_pass_order(seed, data_pass, len(blocks))[item % len(blocks)]])
        yield decode_and_transform(block, seed=seed, epoch=data_pass, **decode_kwargs)


def _should_cache(manifest: dict[str, Any], mode: str) -> bool:
    if mode != "auto":
        return mode == "always"
    import ray

    shard_bytes = sum(shard["bytes"] for shard in manifest["shards"])
    return shard_bytes <= 0.25 * ray.cluster_resources().get("object_store_memory", 0)


def _execution_epoch() -> int:
    """Ray Data's execution index of the running dataset: 0, 1, 2... per execution (not per epoch).

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
    mixup: dict[str, Any] | None = None,
    one_thread: bool = True,
) -> dict[str, np.ndarray]:
    """Decode a block of shard rows and transform each image (mixing some with another of the
    block when ``mixup`` is given); fixed-shape numpy columns out.

    ``one_thread``: set this process's torch to one thread, once (a Ray decode task, one per
    CPU: torch must not fan out inside it); False where a process decodes for itself.
    """
    global _threads_set
    if one_thread and not _threads_set:
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
        # No pixel bound: `data shard` applied it (with its own --max-image-pixels) when writing.
        image = decode_image_bytes(encoded[row], f"image id {image_id} (shard image bytes)", max_pixels=None)
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
    if mixup is not None:
        samples = mix_samples(
            samples, [int(i) for i in image_ids], prob=mixup["prob"], alpha=mixup["alpha"], seed=seed, epoch=epoch
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


def multiscale_size(sizes: Sequence[int], *, seed: int, step: int) -> int:
    """The input side of optimizer step ``step`` (``data.multiscale``): a function of the seed
    and the step alone, so every rank resizes its batch to the same size."""
    return int(sizes[np.random.default_rng([seed, step]).integers(len(sizes))])


def resize_batch(
    images: torch.Tensor, targets: list[dict[str, torch.Tensor]], size: int
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """A letterboxed (B, 3, S, S) batch and its targets resized to ``size``; boxes scale with it.

    The content sits at the top-left of every canvas, so one factor moves all boxes.
    """
    canvas = images.shape[-1]
    if size == canvas:
        return images, targets
    resized = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=size < canvas)
    factor = size / canvas
    return resized, [{**target, "boxes": target["boxes"] * factor} for target in targets]


def steps_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    """Batches every rank runs per epoch: one pass's share, in whole batches.

    Ray Train splits a dataset with ``streaming_split(world_size, equal=True)``:
    every rank gets exactly the same number of rows of an execution, so every
    rank's batches (taken with ``drop_last=True``) run out together and the
    collective ops of data-parallel training never wait on a rank with one
    batch fewer. An epoch is ``(num_images // world_size) // batch_size`` steps.
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size and batch_size must be >= 1, got {world_size}, {batch_size}")
    return (num_images // world_size) // batch_size


Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class EpochStream:
    """One rank's training batches, cut into epochs of exactly ``steps`` batches.

    The batches come from ``iterator`` (a Ray ``DataIterator`` or ``Dataset``)
    as one continuous stream: when an execution of the dataset ends, the next
    begins (``streaming_split`` makes every rank cross that boundary at the same
    batch). An epoch is a step count, not an execution: with several passes per
    execution (see :func:`build_dataset`) epochs just follow each other, and a
    stream abandoned early (a time budget, a restart) costs nothing more.

    :meth:`close` ends the execution in flight (on every rank, for Ray Data to
    shut it down); the next :meth:`epoch` starts a new one. Training closes it
    before each evaluation: the in-flight execution's decode tasks, paused by
    backpressure, keep their CPU slots, and the validation stream could not
    schedule a task (seen as a hang with 416 px images on two cores).
    """

    def __init__(
        self,
        iterator: Any,
        *,
        batch_size: int,
        steps: int,
        device: torch.device | str = "cpu",
        prefetch_batches: int = 2,
        shuffle_buffer: int | None = None,
    ) -> None:
        if steps < 1:
            raise ValueError(f"an epoch needs at least one step, got {steps}")
        self.steps = steps
        self._iter_kwargs = {
            "batch_size": batch_size,
            "batch_format": "numpy",
            "drop_last": True,
            "prefetch_batches": prefetch_batches,
            "local_shuffle_buffer_size": shuffle_buffer,
        }
        self._iterator, self._device = iterator, device
        self._batches: Iterator[dict[str, np.ndarray]] | None = None
        self._ahead: dict[str, np.ndarray] | None = None  # fetched by fetch_ahead, not yet trained on

    def _endless(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            delivered = 0
            batches = iter(self._iterator.iter_batches(**self._iter_kwargs))  # Ray gives an iterable of a generator
            try:
                for batch in batches:
                    delivered += 1
                    yield batch
            finally:
                batches.close()  # now, not at garbage collection: Ray Data then ends this split's execution
            if delivered == 0:
                raise RuntimeError(
                    f"the training data delivered no batch of {self._iter_kwargs['batch_size']}: "
                    "fewer images than workers x batch size?"
                )

    def close(self) -> None:
        """End the execution in flight, if any; the next batch starts a new one."""
        self._ahead = None
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def fetch_ahead(self) -> None:
        """Fetch the next batch now; the next epoch starts with it.

        A worker calls this in a thread while it builds its engine: a new execution's first
        batch waits for Ray Data to plan it and start its decode processes (seconds), which
        then overlaps the build instead of following it. Every rank calls it, or none does.
        """
        if self._ahead is None:
            self._ahead = self._next_batch()

    def _next_batch(self) -> dict[str, np.ndarray]:
        if self._ahead is not None:
            batch, self._ahead = self._ahead, None
            return batch
        if self._batches is None:
            self._batches = self._endless()
        return next(self._batches)

    def epoch(self) -> Iterator[Batch]:
        """The next ``steps`` batches; boxes lost to the ``max_boxes`` cap are logged once."""
        capped = 0
        for _ in range(self.steps):
            batch = self._next_batch()
            capped += int(np.sum(batch["num_boxes_capped"]))
            yield to_model_inputs(batch, self._device)
        if capped:
            log.warning("%d boxes dropped this epoch by the max_boxes cap", capped)
