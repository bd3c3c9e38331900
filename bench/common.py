"""Pieces the benchmarks share: the peers' data path over our shards, scoring, and a registered
model to serve (random weights, no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch


class ShardBatches(torch.utils.data.Dataset):
    """Batch ``i`` of an epoch over a shard directory, decoded and augmented exactly as the
    Ray Data pipeline does it (``decode_and_transform``), for peers fed by a DataLoader.

    ``set_epoch`` reshuffles and changes the augmentation draws, as a new epoch of the
    pipeline does; it must be called before the DataLoader's workers start (or with
    ``persistent_workers=False``) to reach them.
    """

    def __init__(self, shard_dir: Path, cfg: Any, *, train: bool = True) -> None:
        import pyarrow as pa

        from anchorless.platform.data.shards import iter_shard_tables, read_manifest

        self.table = pa.concat_tables(list(iter_shard_tables(shard_dir, read_manifest(shard_dir))))
        self.cfg, self.train = cfg, train
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rows = np.arange(self.table.num_rows)
        self.order = np.random.default_rng(self.cfg.training.seed + epoch).permutation(rows) if self.train else rows

    def __len__(self) -> int:
        batch = self.cfg.data.batch_size
        return self.table.num_rows // batch if self.train else -(-self.table.num_rows // batch)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        from anchorless.platform.data.pipeline import decode_and_transform

        data = self.cfg.data
        rows = self.order[index * data.batch_size : (index + 1) * data.batch_size]
        augment = data.augment.model_dump() if (self.train and data.augment.enabled) else None
        return decode_and_transform(
            self.table.take(rows), image_size=data.image_size, max_boxes=data.max_boxes, augment=augment,
            seed=self.cfg.training.seed, epoch=self.epoch,
        )


def shard_splits(bccd: Path, workdir: Path) -> dict[str, Path]:
    """Parquet shards of a data set's train, val and test splits (written once per workdir)."""
    from anchorless.platform.data.shards import write_shards

    shards = {}
    for split in ("train", "val", "test"):
        shards[split] = workdir / "shards" / split
        if not (shards[split] / "manifest.json").exists():
            write_shards(bccd / "annotations" / f"instances_{split}.json", bccd / "images", shards[split], progress=False)
    return shards


def iter_eval_batches(shard_dir: Path, cfg: Any) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(images in [0, 1], meta) for every image of a split, letterboxed, no augmentation."""
    from anchorless.platform.data.pipeline import to_model_inputs

    batches = ShardBatches(shard_dir, cfg, train=False)
    for index in range(len(batches)):
        images, _, meta = to_model_inputs(batches[index])
        yield images, meta


@torch.no_grad()
def score_on_split(
    predict: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]], shard_dir: Path, cfg: Any
) -> dict[str, Any]:
    """COCO metrics (pycocotools) and duplicate rate of ``predict`` over a shard split.

    ``predict`` takes a (B, 3, S, S) batch in [0, 1] and returns per image
    ``{"boxes" xyxy in input pixels, "scores", "labels" contiguous}``; every model is
    scored by this same function, from the same letterboxed inputs.
    """
    from anchorless.platform.data.shards import coco_ground_truth, read_manifest
    from anchorless.platform.evaluation.metrics import score_detections
    from anchorless.platform.models.predict import batch_to_original_pixels

    manifest = read_manifest(shard_dir)
    label_to_category = {int(c["label"]): int(c["coco_id"]) for c in manifest["categories"]}
    detections, image_ids = [], []
    for images, meta in iter_eval_batches(shard_dir, cfg):
        detections += batch_to_original_pixels(predict(images), meta)  # clipped, as the platform scores
        image_ids += meta["image_id"].tolist()
    return score_detections(coco_ground_truth(shard_dir), detections, image_ids, label_to_category).metrics


# --- a registered model to serve, without training one ------------------------------------------

CATEGORIES_80 = [{"label": i, "coco_id": i + 1, "name": f"class-{i + 1}"} for i in range(80)]


def random_photo(path: Path, *, width: int, height: int, seed: int = 0) -> Path:
    """A photo-like JPEG (smooth colour fields, not noise, so it compresses as photos do)."""
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(path, format="JPEG", quality=90)
    return path


def register_random_detector(workdir: Path, detector: dict[str, Any], image_size: int, name: str) -> tuple[str, str]:
    """A randomly initialised detector exported, logged and registered as ``name`` v1 in a new
    MLflow store under ``workdir``, as training registers one; (tracking URI, ``models:/name/1``)."""
    from mlflow import MlflowClient

    from anchorless.detectors import build_detector
    from anchorless.platform.config import build_config
    from anchorless.platform.models.export import export_checkpoint
    from anchorless.platform.models.pyfunc import log_and_register

    workdir.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = build_config({
        "name": name, "workspace": str(workdir), "data": {"image_size": image_size}, "detector": detector,
        "tracking": {"experiment": name, "registered_model": name, "tracking_uri": store},
    })  # fmt: skip
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    run = client.create_run(client.create_experiment(name, artifact_location=(workdir / "artifacts").as_uri()))
    torch.manual_seed(0)
    manifest = {"format": "anchorless-shards", "source": {"annotations": "random", "sha256": "0" * 64}, "categories": CATEGORIES_80}
    export = export_checkpoint(build_detector(cfg.detector), cfg, manifest, workdir / "model.pt")
    uri = log_and_register(run.info.run_id, export, cfg, {}, tracking_uri=store)
    client.set_terminated(run.info.run_id)
    return store, uri
