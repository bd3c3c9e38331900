"""Images/s of the Ray Data pipeline vs a torch DataLoader over torchvision's CocoDetection.

Both sides do the same work per image, on the same BCCD images, with the same
number of CPU workers: decode the JPEG with ``torchvision.io.decode_image``,
drop crowd boxes, run ``anchorless.platform.data.pipeline.transform_image`` (the training
augmentations + letterbox from ``transforms.py``), pack fixed-shape batches with
``pack_samples`` and hand them to ``to_model_inputs`` as a training worker would.

- ours: Parquet shards → ``build_dataset(train=True)`` (read_parquet, streaming
  repartition, encoded blocks cached, many passes per Ray Data execution,
  decode tasks) → ``streaming_split(1, equal=True)``, the iterator a Ray Train
  worker gets → ``EpochStream``, cut into epochs as the training loop does.
- peer: ``CocoDetection`` (image loading switched from PIL to the same
  ``decode_image``, so the decoder is not what is compared) → ``DataLoader`` with
  ``num_workers`` processes, persistent, pinned off (CPU), collate = ``pack_samples``.

The sides run in turns (ours, peer, ours, peer for two rounds), never at the
same time: a pipeline that keeps decoding ahead while the other is timed would
take CPU from it. Each turn is a fresh process that builds its pipeline, runs
one warm-up epoch (worker start-up, imports), times ``--epochs`` epochs and
exits. The headline
is images over seconds across all timed epochs, so every epoch start counts:
the DataLoader's persistent workers refill at each, ours starts a new Ray Data
execution every ``data.stream_rows`` rows (every 20 epochs of BCCD train, so a
turn of 20 epochs contains one). The median epoch is printed too. Last line:
one JSON object.

    .venv/bin/python bench/data_pipeline.py [--bccd DIR] [--workers 2] [--epochs 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anchorless.platform.config import AugmentConfig, DataConfig  # noqa: E402
from anchorless.platform.data.pipeline import (  # noqa: E402
    EpochStream,
    build_dataset,
    pack_samples,
    steps_per_epoch,
    to_model_inputs,
    transform_image,
)
from anchorless.platform.data.shards import write_shards  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_bccd = os.environ.get("ANCHORLESS_BCCD", str(REPO / ".." / "shared" / "datasets" / "bccd"))
    parser.add_argument("--bccd", default=default_bccd, help="BCCD root (annotations/, images/)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test", "all"], help="all = the three merged")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="CPU workers on each side")
    parser.add_argument("--epochs", type=int, default=20, help="timed epochs per turn of each side")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each side, alternating (ours, peer, ours, ...)")
    parser.add_argument("--block-rows", type=int, default=None, help="rows per Ray decode block (default: the module's)")
    # One turn, run by the bench itself in a fresh process:
    parser.add_argument("--turn", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--turn-shards", help=argparse.SUPPRESS)
    parser.add_argument("--turn-annotations", help=argparse.SUPPRESS)
    parser.add_argument("--turn-images", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


# --- ours: Ray Data ----------------------------------------------------------------------------


def ray_epochs(shard_dir: Path, num_images: int, cfg: DataConfig, args: argparse.Namespace):
    """An epoch function over the Ray pipeline: returns the images it delivered."""
    kwargs = {"block_rows": args.block_rows} if args.block_rows else {}
    dataset = build_dataset(shard_dir, cfg, train=True, **kwargs)
    (split,) = dataset.streaming_split(1, equal=True)  # what Ray Train hands a worker
    stream = EpochStream(
        split, batch_size=cfg.batch_size, steps=steps_per_epoch(num_images, 1, cfg.batch_size),
        prefetch_batches=cfg.prefetch_batches,
    )

    def epoch() -> int:
        seen = 0
        for images, targets, meta in stream.epoch():
            seen += images.shape[0]
        return seen

    epoch.close = stream.close
    return epoch


# --- peer: torch DataLoader over torchvision CocoDetection ----------------------------------------


class DecodedCocoDetection:
    """CocoDetection with the same decoder and per-image work as the Ray pipeline."""

    def __init__(self, root: str, ann_file: str, *, image_size: int, augment: AugmentConfig, seed: int) -> None:
        from torchvision.datasets import CocoDetection

        class _Decoded(CocoDetection):
            def _load_image(self, id: int):  # noqa: A002 - torchvision's signature
                from torchvision.io import ImageReadMode, decode_image, read_file

                return decode_image(read_file(os.path.join(self.root, self.coco.loadImgs(id)[0]["file_name"])), mode=ImageReadMode.RGB)

        self.coco = _Decoded(root, ann_file)
        self.image_size, self.augment, self.seed = image_size, augment, seed
        label_of = {cat: label for label, cat in enumerate(sorted(self.coco.coco.getCatIds()))}
        self.label_of = label_of

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, index: int):
        image, annotations = self.coco[index]
        image_id = self.coco.ids[index]
        kept = [a for a in annotations if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in kept)], dtype=np.float32)
        labels = np.array([self.label_of[a["category_id"]] for a in kept], dtype=np.int64)
        height, width = image.shape[-2:]
        sample = transform_image(
            image, boxes.reshape(-1, 4), labels, image_id=image_id, image_size=self.image_size,
            augment=self.augment, seed=self.seed, epoch=0,
        )
        return sample, image_id, width, height


def _collate(items, *, image_size: int, max_boxes: int):
    samples, ids, widths, heights = zip(*items)
    packed = pack_samples(
        list(samples), image_ids=np.array(ids), orig_widths=np.array(widths), orig_heights=np.array(heights),
        image_size=image_size, max_boxes=max_boxes, epoch=0,
    )
    return {key: torch.from_numpy(value) for key, value in packed.items()}  # shared memory across processes


def dataloader_epochs(bccd: Path, cfg: DataConfig, args: argparse.Namespace):
    """An epoch function over the DataLoader: returns the images it delivered."""
    from functools import partial

    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    dataset = DecodedCocoDetection(
        str(bccd / "images"), str(args.annotations),
        image_size=cfg.image_size, augment=cfg.augment, seed=0,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=True,
        prefetch_factor=cfg.prefetch_batches,
        collate_fn=partial(_collate, image_size=cfg.image_size, max_boxes=cfg.max_boxes),
        worker_init_fn=lambda _: torch.set_num_threads(1),
    )

    def epoch() -> int:
        seen = 0
        for batch in loader:
            images, targets, meta = to_model_inputs(batch, "cpu")
            seen += images.shape[0]
        return seen

    def close() -> None:
        loader._iterator = None  # the persistent workers' iterator: dropping it shuts them down

    return epoch, close


def timed(epoch) -> tuple[int, float]:
    start = time.perf_counter()
    seen = epoch()
    return seen, time.perf_counter() - start


def turn(side: str, shard_dir: Path, num_images: int, cfg: DataConfig, args: argparse.Namespace) -> list[tuple[int, float]]:
    """In this (fresh) process: build one side's pipeline, warm it up one epoch, time ``args.epochs`` epochs."""
    if side == "ours":
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        epoch = ray_epochs(shard_dir, num_images, cfg, args)
        close = epoch.close
    else:
        epoch, close = dataloader_epochs(Path(args.bccd), cfg, args)
    timed(epoch)
    epochs = [timed(epoch) for _ in range(args.epochs)]
    close()
    return epochs


def turn_in_fresh_process(side: str, shard_dir: Path, num_images: int, args: argparse.Namespace) -> list[tuple[int, float]]:
    """One turn in its own process: nothing of the other side (Ray's workers, a loader's) outlives it."""
    command = [
        sys.executable, __file__, "--bccd", args.bccd, "--split", args.split, "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--epochs", str(args.epochs),
        "--turn", side, "--turn-shards", str(shard_dir), "--turn-annotations", str(args.annotations),
        "--turn-images", str(num_images),
    ]  # fmt: skip
    if args.block_rows:
        command += ["--block-rows", str(args.block_rows)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {side} turn failed:\n{done.stderr[-3000:]}")
    epochs = [tuple(epoch) for epoch in json.loads(done.stdout.strip().splitlines()[-1])]
    images, seconds = sum(n for n, _ in epochs), sum(t for _, t in epochs)
    print(f"  {side}: {images / seconds:.1f} img/s over {args.epochs} epochs", flush=True)
    return epochs


def _annotations(bccd: Path, split: str, tmp: Path) -> Path:
    """The split's COCO JSON; for "all", the three splits merged with fresh ids."""
    if split != "all":
        return bccd / "annotations" / f"instances_{split}.json"
    merged: dict = {"images": [], "annotations": [], "categories": None}
    for name in ("train", "val", "test"):
        coco = json.loads((bccd / "annotations" / f"instances_{name}.json").read_text())
        merged["categories"] = coco["categories"]
        new_id = {}
        for image in coco["images"]:
            new_id[image["id"]] = len(merged["images"]) + 1
            merged["images"].append({**image, "id": new_id[image["id"]]})
        for ann in coco["annotations"]:
            merged["annotations"].append({**ann, "id": len(merged["annotations"]) + 1, "image_id": new_id[ann["image_id"]]})
    path = tmp / "instances_all.json"
    path.write_text(json.dumps(merged))
    return path


def main() -> None:
    args = parse_args()
    bccd = Path(args.bccd)
    if not (bccd / "annotations" / "instances_train.json").is_file():
        sys.exit(f"BCCD not found at {bccd} (pass --bccd or set ANCHORLESS_BCCD)")
    cfg = DataConfig(image_size=args.image_size, batch_size=args.batch_size, decode_concurrency=args.workers)

    if args.turn:
        args.annotations = args.turn_annotations
        print(json.dumps(turn(args.turn, Path(args.turn_shards), args.turn_images, cfg, args)))
        return

    ours_epochs, peer_epochs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        args.annotations = _annotations(bccd, args.split, Path(tmp))
        shard_dir = Path(tmp) / "shards"
        manifest = write_shards(args.annotations, bccd / "images", shard_dir, progress=False)
        import ray

        ray.shutdown()  # sharding may have started one; the turns bring their own
        for _ in range(args.rounds):
            ours_epochs += turn_in_fresh_process("ours", shard_dir, manifest["num_images"], args)
            peer_epochs += turn_in_fresh_process("peer", shard_dir, manifest["num_images"], args)

    def rate(epochs: list[tuple[int, float]]) -> float:
        return sum(n for n, _ in epochs) / sum(t for _, t in epochs)

    ours, peer = rate(ours_epochs), rate(peer_epochs)
    ours_median = statistics.median(n / t for n, t in ours_epochs)
    peer_median = statistics.median(n / t for n, t in peer_epochs)
    ratio = ours / peer
    print()
    print(f"BCCD {args.split}: {manifest['num_images']} images 640x480 -> {args.image_size}px, train augmentations, "
          f"batch {args.batch_size}, {args.workers} CPU workers each, {args.rounds} turns x {args.epochs} epochs per side")
    print(f"{'pipeline':<44} {'images/s':>9} {'median epoch':>13}")
    print(f"{'ours: Ray Data (cached blocks, multi-pass)':<44} {ours:>9.1f} {ours_median:>13.1f}")
    print(f"{'peer: DataLoader(CocoDetection)':<44} {peer:>9.1f} {peer_median:>13.1f}")
    print(f"{'ratio ours/peer':<44} {ratio:>9.2f}x {ours_median / peer_median:>12.2f}x")
    print(json.dumps({
        "benchmark": "data_pipeline",
        "dataset": f"bccd/{args.split}",
        "images": manifest["num_images"],
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "epochs_per_turn": args.epochs,
        "rounds": args.rounds,
        "ray_images_per_s": round(ours, 1),
        "dataloader_images_per_s": round(peer, 1),
        "ray_median_epoch_images_per_s": round(ours_median, 1),
        "dataloader_median_epoch_images_per_s": round(peer_median, 1),
        "ray_vs_dataloader_ratio": round(ratio, 3),
    }))


if __name__ == "__main__":
    main()
