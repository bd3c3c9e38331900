"""Offline evaluation: Ray Data batch inference over shards, scored with pycocotools.

The shards stream through the same pipeline as validation during training
(``build_dataset(..., train=False)``: decode + letterbox), then through
``map_batches`` with a callable class that builds the model once per actor.
Detections go back to original pixels with each image's ``scale``, and are
scored against the ground truth rebuilt from the shards (COCO AP, AR and the
duplicate rate of an NMS-free detector). The COCO results JSON and a summary
JSON are written atomically.

A small data set with no Ray cluster to use is scored in this process instead, by the
same decode and predictor code (``executor="auto"``): starting a local Ray, its decode
tasks and a model actor costs some 30 s on a two-core machine, more than decoding and
predicting a few hundred images here.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import torch

from anchorless.errors import AnchorlessError, DataError
from anchorless.files import write_json_atomic
from anchorless.platform.config import DataConfig
from anchorless.platform.data.pipeline import DECODE_COLUMNS, build_dataset, decode_and_transform
from anchorless.platform.data.shards import coco_ground_truth, iter_shard_tables, manifest_checksum, read_manifest
from anchorless.platform.evaluation.metrics import score_detections
from anchorless.platform.models.export import ModelError, category_table, export_meta, model_from_export
from anchorless.platform.models.loading import is_mlflow_uri, load_export
from anchorless.platform.models.predict import batch_to_original_pixels
from anchorless.platform.ray_session import connect_ray
from anchorless.platform.tracking.store import resolve_tracking_uri

log = logging.getLogger(__name__)

RESULTS_FILE = "coco_results.json"
SUMMARY_FILE = "summary.json"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
EXECUTORS = ("auto", "ray", "process")
# "auto" scores up to this many images in this process when there is no Ray cluster to join.
IN_PROCESS_MAX_IMAGES = 512


class EvaluationError(AnchorlessError):
    """An evaluation that cannot run as asked (resources, lost images)."""


class _BatchPredictor:
    """A Ray Data actor: loads the model once, then maps decoded batches to detections.

    The model comes from ``source`` (an export path or MLflow URI, loaded by the
    actor itself) or, for an in-memory model, from the object store. Output, one
    row per image: ``image_id`` and the image's detections in original pixels as
    lists (``labels``, ``scores`` and flat xyxy ``boxes``, 4 per detection).
    """

    def __init__(
        self,
        source: str | None,
        tracking_uri: str | None,
        model_ref: list | None,
        torch_threads: int | None,
        use_gpu: bool,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if torch_threads is not None:  # an actor's CPUs; in this process torch keeps its own count
            torch.set_num_threads(torch_threads)
        if source is not None:
            self.model, _ = model_from_export(load_export(source, tracking_uri=tracking_uri), device=self.device)
            return
        if model is None:
            import ray

            model = ray.get(model_ref[0])  # wrapped in a list so Ray hands over the reference itself
        self.model = model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = torch.from_numpy(batch["image"]).to(self.device).float().div_(255.0)  # (B, 3, S, S)
        with torch.inference_mode():
            detections = self.model.predict(images)
        labels, scores, boxes = [], [], []
        for original in batch_to_original_pixels(detections, batch):
            labels.append(original["labels"].numpy().astype(np.int32))
            scores.append(original["scores"].numpy().astype(np.float32))
            boxes.append(original["boxes"].numpy().astype(np.float32).reshape(-1))
        return pa.table(
            {
                "image_id": pa.array(batch["image_id"].astype(np.int64)),
                "labels": pa.array(labels, type=pa.list_(pa.int32())),
                "scores": pa.array(scores, type=pa.list_(pa.float32())),
                "boxes": pa.array(boxes, type=pa.list_(pa.float32())),
            }
        )


def check_categories(model_categories: list[Mapping[str, Any]], manifest: Mapping[str, Any], shard_dir: Any) -> None:
    """The model's label → category table must be the shards' (same ids, names, order)."""
    expected = category_table(manifest)
    actual = [
        {"label": int(c["label"]), "coco_id": int(c["coco_id"]), "name": str(c["name"])} for c in model_categories
    ]
    if actual != expected:

        def show(table: list[Mapping[str, Any]]) -> str:
            return ", ".join(f"{c['label']}={c['name']} (coco {c['coco_id']})" for c in table)

        raise ModelError(
            f"{shard_dir}: the model's categories do not match the shards' manifest; "
            f"model: [{show(actual)}], shards: [{show(expected)}]"
        )


def evaluate(
    model_source: Any,
    shard_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    out_dir: str | os.PathLike[str] | None = None,
    address: str | None = None,
    concurrency: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    duplicate_score_threshold: float = 0.3,
    duplicate_iou_threshold: float = 0.5,
    tracking_uri: str | None = None,
    workspace: str | os.PathLike[str] = "workspace",
    progress: bool = True,
    executor: str = "auto",
) -> dict[str, Any]:
    """Score a model on a shard directory; returns the summary (also written to ``out_dir``).

    Args:
        model_source: a ``.pt`` export, a directory holding one, an MLflow model URI
            (``models:/NAME/VERSION``, ``models:/NAME@alias``, ``runs:/RUN/model``), or a
            ``(model, meta)`` pair as :func:`anchorless.platform.models.loading.load_model` returns.
        shard_dir: shards written by ``anchorless data shard`` (local path or URI).
        batch_size: images per inference call.
        out_dir: where ``coco_results.json`` and ``summary.json`` go; default
            ``<workspace>/evaluations/<UTC time>``.
        address: Ray cluster to join; None uses a running Ray or starts a local one.
        concurrency: inference actors (each loads the model once).
        cpus_per_actor / gpus_per_actor: resources per actor (torch threads = CPUs).
        duplicate_score_threshold / duplicate_iou_threshold: the duplicate-rate settings.
        tracking_uri: where ``models:/`` URIs resolve (default: ``$MLFLOW_TRACKING_URI``,
            then the workspace's SQLite store).
        progress: progress bars (Ray Data's, or this process's).
        executor: ``ray`` (actors over Ray Data), ``process`` (decode and predict here,
            one batch after another, with torch's threads of this process) or ``auto``:
            here when no cluster is given or running (``address``, ``$RAY_ADDRESS``, a Ray
            this process joined) and the shards hold at most ``IN_PROCESS_MAX_IMAGES`` images.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR100`` (pycocotools; -1 where a size has no
        ground truth), ``duplicate_rate`` and ``confident_detections`` (its
        denominator), ``per_class_AP`` (by category name), ``images``,
        ``seconds``, ``images_per_second``, ``model``, ``data``, ``data_manifest_sha256``,
        ``model_manifest_sha256``, ``results`` and ``summary`` (file paths).
    """
    if executor not in EXECUTORS:
        raise EvaluationError(f"evaluate: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    started = time.perf_counter()
    manifest = read_manifest(shard_dir)
    here = _in_this_process(executor, address, manifest["num_images"])
    store = tracking_uri or _workspace_store(workspace)
    model = None
    if isinstance(model_source, tuple):
        model, meta = model_source
    else:
        model_source = os.fspath(model_source)
        if not is_mlflow_uri(model_source):
            model_source = str(Path(model_source).resolve())  # actors may run in another directory
        payload = load_export(model_source, tracking_uri=store)
        meta = {**export_meta(payload), "source": payload["source"]}
        if here:
            model, _ = model_from_export(payload)
        del payload  # on Ray each actor loads its own copy
    check_categories(meta["categories"], manifest, shard_dir)
    data_cfg = DataConfig.model_validate({**meta["config"]["data"], "train": None, "val": None})
    label_to_category = {int(c["label"]): int(c["coco_id"]) for c in meta["categories"]}

    detections: list[dict[str, torch.Tensor]] = []
    image_ids: list[int] = []
    seen: set[int] = set()
    if here:
        predictor = _BatchPredictor(None, None, None, None, gpus_per_actor > 0, model=model)
        for table in _predict_here(predictor, shard_dir, manifest, data_cfg, batch_size, progress=progress):
            _collect(table, detections, image_ids, seen)
    else:
        for table in _predict_on_ray(
            model_source, model, store, shard_dir, data_cfg, batch_size=batch_size,
            address=address, concurrency=concurrency, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
            progress=progress,
        ):  # fmt: skip
            _collect(table, detections, image_ids, seen)

    coco_gt = coco_ground_truth(shard_dir)
    expected_ids = {image["id"] for image in coco_gt["images"]}
    if seen != expected_ids:
        missing = sorted(expected_ids - seen)
        raise EvaluationError(
            f"{shard_dir}: {len(missing)} of {len(expected_ids)} images were not predicted (ids {missing[:10]})"
        )
    metrics, results = score_detections(
        coco_gt, detections, image_ids, label_to_category,
        duplicate_score_threshold=duplicate_score_threshold, duplicate_iou_threshold=duplicate_iou_threshold,
    )  # fmt: skip
    seconds = time.perf_counter() - started

    out = Path(out_dir) if out_dir is not None else _default_out_dir(workspace)
    summary = {
        **{key: metrics[key] for key in (*METRICS, "duplicate_rate", "confident_detections")},
        "per_class_AP": metrics["per_class_AP"],
        "images": len(seen),
        "detections": len(results),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(seen) / seconds, 3) if seconds > 0 else None,
        "model": str(meta.get("source", "<in-memory model>")),
        "data": os.fspath(shard_dir),
        "data_manifest_sha256": manifest_checksum(manifest),
        "model_manifest_sha256": meta.get("manifest_sha256"),
        "results": str(out / RESULTS_FILE),
        "summary": str(out / SUMMARY_FILE),
    }
    write_json_atomic(out / RESULTS_FILE, results, indent=1)
    write_json_atomic(out / SUMMARY_FILE, summary, indent=1)
    log.info(
        "evaluated %d images in %.1fs: AP %.4f AP50 %.4f -> %s", len(seen), seconds, summary["AP"], summary["AP50"], out
    )
    return summary


def _in_this_process(executor: str, address: str | None, num_images: int) -> bool:
    if executor != "auto":
        return executor == "process"
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")  # imported only to look would cost a second
    if ray is not None and ray.is_initialized():
        return False
    return num_images <= IN_PROCESS_MAX_IMAGES


def _predict_here(
    predictor: _BatchPredictor, shard_dir: Any, manifest: dict[str, Any], data_cfg: DataConfig, batch_size: int, *, progress: bool
) -> Iterator[pa.Table]:
    """The predictor's tables for every image of the shards, decoded here as Ray's decode tasks do."""
    from tqdm import tqdm

    with tqdm(total=manifest["num_images"], desc="evaluate", unit="img", disable=not progress) as bar:
        for shard in iter_shard_tables(shard_dir, manifest, columns=DECODE_COLUMNS):
            for start in range(0, shard.num_rows, batch_size):
                rows = shard.slice(start, batch_size)
                batch = decode_and_transform(
                    rows, image_size=data_cfg.image_size, max_boxes=data_cfg.max_boxes, augment=None, seed=0,
                    epoch=0, one_thread=False,
                )  # fmt: skip
                yield predictor(batch)
                bar.update(rows.num_rows)


def _predict_on_ray(
    model_source: Any,
    model: torch.nn.Module | None,
    store: str,
    shard_dir: Any,
    data_cfg: DataConfig,
    *,
    batch_size: int,
    address: str | None,
    concurrency: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    progress: bool,
) -> Iterator[pa.Table]:
    """The predictor's tables from a pool of Ray actors fed by Ray Data's decode tasks."""
    import ray

    own_ray = connect_ray(address)  # quiets Ray Data's execution plans; its progress bars stay
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        concurrency = _fit_concurrency(concurrency, cpus_per_actor, gpus_per_actor)
        model_ref = ray.put(model.cpu()) if model is not None else None
        dataset = build_dataset(shard_dir, data_cfg, train=False)
        predictions = dataset.map_batches(
            _BatchPredictor,
            fn_constructor_kwargs={
                "source": None if model is not None else model_source,
                "tracking_uri": store,
                "model_ref": [model_ref] if model is not None else None,
                "torch_threads": max(1, int(cpus_per_actor)),
                "use_gpu": gpus_per_actor > 0,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
        )
        yield from predictions.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        if own_ray:
            ray.shutdown()


def _collect(
    table: pa.Table, detections: list[dict[str, torch.Tensor]], image_ids: list[int], seen: set[int]
) -> None:
    """Append one batch of actor output as per-image detections (original pixels)."""
    columns = table.to_pydict()
    rows = zip(columns["image_id"], columns["labels"], columns["scores"], columns["boxes"])
    for image_id, labels, scores, boxes in rows:
        if image_id in seen:
            raise DataError(f"image id {image_id} appears twice in the shards")
        seen.add(image_id)
        image_ids.append(int(image_id))
        detections.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # (N, 4) xyxy
                "scores": torch.tensor(scores, dtype=torch.float32),  # (N,)
                "labels": torch.tensor(labels, dtype=torch.int64),  # (N,)
            }
        )


def _fit_concurrency(concurrency: int, cpus_per_actor: float, gpus_per_actor: float) -> int:
    """At most as many actors as leave one CPU for reading and decoding the shards.

    Actors hold their CPUs for the whole run; if they took every CPU the read
    tasks could never be scheduled and the pipeline would wait forever.
    """
    import ray

    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 0))
    fitting = int((total_cpus - 1) // cpus_per_actor) if cpus_per_actor > 0 else concurrency
    if fitting < 1:
        raise EvaluationError(
            f"evaluate needs {cpus_per_actor:g} CPU(s) per inference actor plus one for reading; "
            f"the Ray cluster has {total_cpus:g}"
        )
    if gpus_per_actor > 0:
        fitting = min(fitting, int(float(resources.get("GPU", 0)) // gpus_per_actor))
        if fitting < 1:
            raise EvaluationError(
                f"evaluate asks for {gpus_per_actor:g} GPU(s) per actor; "
                f"the Ray cluster has {resources.get('GPU', 0):g}"
            )
    if concurrency > fitting:
        log.warning("evaluate: %d inference actors do not fit beside the readers on %g CPUs; using %d",
                    concurrency, total_cpus, fitting)
    return min(concurrency, fitting)


def _workspace_store(workspace: str | os.PathLike[str]) -> str:
    return resolve_tracking_uri(None, workspace)


def _default_out_dir(workspace: str | os.PathLike[str]) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(workspace) / "evaluations" / stamp
