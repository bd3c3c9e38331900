"""Pieces the benchmarks share: the real data sets as shards, the peers' data path over our
shards, scoring, and a registered model to serve (random weights, no training)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


class ShardBatches(torch.utils.data.Dataset):
    """Batch ``i`` of an epoch over a shard directory, decoded and augmented exactly as the
    Ray Data pipeline does it (``decode_and_transform``, with ``data.mixup`` inside each batch
    where the pipeline mixes inside each decode block), for peers fed by a DataLoader.

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
        mixup = data.mixup.model_dump() if (self.train and data.mixup.enabled) else None  # within the batch
        return decode_and_transform(
            self.table.take(rows), image_size=data.image_size, max_boxes=data.max_boxes, augment=augment,
            seed=self.cfg.training.seed, epoch=self.epoch, mixup=mixup,
        )


PRESETS = ("bccd", "raccoon")  # the real data sets beside the repository (../shared/datasets/NAME)
SPLITS = ("train", "val", "test")
# Where the benches keep their shards between invocations (shard_splits): the repository's
# ignored workspace unless $ANCHORLESS_BENCH_CACHE says otherwise.
SHARD_CACHE = Path(os.environ.get("ANCHORLESS_BENCH_CACHE") or REPO / "workspace" / "bench" / "shards")


def start_training_bench() -> None:
    """What a bench that trains through the platform sets first: warnings only, runs tracked in
    its own MLflow store (not $MLFLOW_TRACKING_URI's), and the local Ray it starts on loopback
    (before ``import ray``, as the CLI does), unless $RAY_ADDRESS names a cluster."""
    from anchorless.platform.ray_session import keep_local_ray_on_loopback

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if not os.environ.get("RAY_ADDRESS"):
        keep_local_ray_on_loopback()


def dataset_root(data: str, datasets: str | os.PathLike[str] | None = None) -> Path:
    """Where ``--data`` points: a preset's folder, else ``data`` itself as a path.

    A preset ``NAME`` is ``$ANCHORLESS_NAME`` where that is set (``ANCHORLESS_BCCD``, as the
    tests read it), else ``NAME`` under ``datasets``, ``$ANCHORLESS_DATASETS`` or the
    ``shared/datasets`` folder beside the repository, in that order.
    """
    if data not in PRESETS:
        return Path(data)
    own = os.environ.get(f"ANCHORLESS_{data.upper()}")
    if own:
        return Path(own)
    return Path(datasets or os.environ.get("ANCHORLESS_DATASETS") or REPO.parent / "shared" / "datasets") / data


def coco_split_files(root: Path) -> dict[str, Path]:
    """The COCO instances JSON of each split under ``root``: ``annotations/instances_{train,val[,test]}.json``
    (BCCD's layout), else the same names under ``coco/`` (raccoon keeps its VOC XML in ``annotations/``).
    The images are ``root/images``, which the JSON files' ``file_name`` entries are relative to."""
    for folder in ("annotations", "coco"):
        found = {split: root / folder / f"instances_{split}.json" for split in SPLITS}
        found = {split: path for split, path in found.items() if path.is_file()}
        if {"train", "val"} <= set(found):
            if not (root / "images").is_dir():
                raise FileNotFoundError(f"{root}: no images/ folder beside {folder}/")
            return found
    raise FileNotFoundError(
        f"{root}: no annotations/instances_train.json and instances_val.json (nor under coco/); "
        "--data takes bccd, raccoon or a root laid out like BCCD"
    )


def source_fingerprint(annotations: Path, images: Path) -> str:
    """sha256 of a split's instances JSON and of its image folder's listing (names, sizes, mtimes):
    shards made from the same source are reused, a changed JSON or image folder is sharded again."""
    digest = hashlib.sha256(annotations.read_bytes())
    for path in sorted(images.iterdir()):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardedData:
    """A data set's splits as Parquet shards, its categories and the split it is scored on."""

    name: str
    root: Path
    shards: dict[str, Path]  # split -> shard directory
    classes: list[str]  # category names by contiguous label
    scored: str  # "test" where the set has one, else "val"


def shard_splits(data: str, cache: Path, datasets: str | os.PathLike[str] | None = None) -> ShardedData:
    """Parquet shards of every split of ``data`` (a preset or a root, see :func:`dataset_root`)
    under ``cache``, written once per source: later calls reuse them while the source's
    :func:`source_fingerprint` is unchanged. The classes are read from the shards' manifests,
    which must agree across splits."""
    from anchorless.files import write_atomic
    from anchorless.platform.data.shards import read_manifest, write_shards

    root = dataset_root(data, datasets)
    files = coco_split_files(root)
    name = data if data in PRESETS else f"{root.resolve().name}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"
    shards, categories = {}, {}
    for split, instances in files.items():
        shards[split] = cache / name / split
        stamp = cache / name / f"{split}.source"  # beside the shard directory, which write_shards replaces
        fingerprint = source_fingerprint(instances, root / "images")
        current = stamp.is_file() and stamp.read_text() == fingerprint and (shards[split] / "manifest.json").is_file()
        if not current:
            write_shards(instances, root / "images", shards[split], progress=False)
            write_atomic(stamp, fingerprint)
        categories[split] = read_manifest(shards[split])["categories"]
    classes = [category["name"] for category in sorted(categories["train"], key=lambda c: c["label"])]
    for split, listed in categories.items():
        if listed != categories["train"]:
            raise ValueError(f"{files[split]}: its categories differ from {files['train'].name}'s ({', '.join(classes)})")
    return ShardedData(name, root, shards, classes, "test" if "test" in shards else "val")


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
