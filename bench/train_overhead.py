"""What Ray Train + Ray Data + DeepSpeed cost: `train()` with one worker vs a bare PyTorch loop.

Both train the quickstart's detector (configs/quickstart.yaml) on the same synthetic
shards with the same batch, the same torch threads, the same augmentation code
(``anchorless.platform.data.pipeline.decode_and_transform``), AdamW, gradient clipping and the
same LR schedule. The bare loop decodes in one persistent DataLoader worker process,
as a plain PyTorch script would; the platform decodes in Ray Data tasks. Throughput
is training images per second over the epochs after the first (start-up excluded on
both sides; evaluation and checkpoints are outside the timed loop on both sides), the
median over alternating rounds of both.

    python bench/train_overhead.py [--epochs 4] [--num-images 300] [--threads 1] [--repeats 2]

Prints a side-by-side table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ShardBatches  # noqa: E402


def make_shards(root: Path, num_images: int, size: int) -> dict[str, Path]:
    from anchorless.platform.data.shards import write_shards
    from anchorless.platform.data.synth import generate_synthetic_coco

    files = generate_synthetic_coco(root / "synth", num_images=num_images, size=size, seed=0, progress=False)
    for split, annotations in files.items():
        write_shards(annotations, root / "synth" / "images", root / "shards" / split, progress=False)
    return {split: root / "shards" / split for split in files}


def bare_loop(cfg, shard_dir: Path, epochs: int, threads: int) -> list[float]:
    """Images/s of each epoch of a plain single-process training loop."""
    from anchorless.detectors import build_detector
    from anchorless.platform.data.pipeline import to_model_inputs
    from anchorless.platform.training.engine import WarmupSchedule

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.training.seed)
    model = build_detector(cfg.detector)
    optimizer_cfg = cfg.training.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optimizer_cfg.lr, betas=optimizer_cfg.betas, weight_decay=optimizer_cfg.weight_decay, foreach=True
    )
    batches = ShardBatches(shard_dir, cfg)
    schedule = WarmupSchedule.from_config(cfg.training.schedule, len(batches) * epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=True, num_workers=1, persistent_workers=True, prefetch_factor=cfg.data.prefetch_batches or 2
    )
    speeds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        waited, batches_iter = 0.0, iter(loader)
        while True:
            fetch = time.perf_counter()
            batch = next(batches_iter, None)
            waited += time.perf_counter() - fetch
            if batch is None:
                break
            images, targets, _ = to_model_inputs(batch)
            loss = model(images, targets)["loss"]
            optimizer.zero_grad()
            loss.backward()
            if cfg.training.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
            optimizer.step()
            scheduler.step()
        speeds.append(len(batches) * cfg.data.batch_size / (time.perf_counter() - start))
        print(f"  bare     epoch {epoch + 1}: {speeds[-1]:.2f} images/s, waited {waited:.2f} s for data", flush=True)
    return speeds


def platform_run(cfg, epochs: int) -> list[float]:
    """Images/s of each epoch of `anchorless.platform.training.driver.train` (from the run's MLflow metrics)."""
    from mlflow import MlflowClient

    from anchorless.platform.training.driver import train

    summary = train(cfg, restart=True, progress=False)
    client = MlflowClient(summary["tracking_uri"])
    history = {
        key: [m.value for m in sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.step)]
        for key in ("epoch_images_per_s", "data_wait_s")
    }
    speeds = history["epoch_images_per_s"]
    for epoch, (speed, waited) in enumerate(zip(speeds, history["data_wait_s"]), 1):
        print(f"  platform epoch {epoch}: {speed:.2f} images/s, waited {waited:.2f} s for data", flush=True)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-images", type=int, default=300, help="synthetic images (80%% train)")
    parser.add_argument("--size", type=int, default=192, help="synthetic image side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process / worker")
    parser.add_argument("--repeats", type=int, default=2, help="bare/platform rounds, alternating (the machine's load drifts)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from anchorless.platform.config import load_config

    root = Path(tempfile.mkdtemp(prefix="anchorless-bench-train-"))
    shards = make_shards(root, args.num_images, args.size)
    overrides = [
        "name=bench-train-overhead",
        f"workspace={root / 'workspace'}",
        f"data.train={shards['train']}",
        f"data.val={shards['val']}",
        "training.num_workers=1",
        f"training.cpus_per_worker={args.threads}",
        f"training.torch_threads={args.threads}",
        f"training.epochs={args.epochs}",
        f"training.checkpoint.every_epochs={args.epochs}",  # one checkpoint and one evaluation, at the end
        f"evaluation.every_epochs={args.epochs}",
        "tracking.registered_model=null",
        "tracking.tracking_uri=null",
    ]
    cfg = load_config(args.config, overrides)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    print(
        f"OneNet ({cfg.detector['backbone']['depth']}) {cfg.data.image_size}px, batch {cfg.data.batch_size}, "
        f"{args.threads} torch thread(s), {args.epochs} epochs, shards in {root}",
        flush=True,
    )
    bare, platform = [], []
    for round_ in range(args.repeats):
        print(f"round {round_ + 1}/{args.repeats}", flush=True)
        bare += bare_loop(cfg, shards["train"], args.epochs, args.threads)[1:]
        platform += platform_run(cfg, args.epochs)[1:]
    bare_speed, platform_speed = float(np.median(bare)), float(np.median(platform))
    ratio = platform_speed / bare_speed
    print()
    print(f"{'median training images/s':<34} {'images/s':>9}   (epochs 2..{args.epochs} of {args.repeats} rounds)")
    print(f"{'bare PyTorch loop (1 process)':<34} {bare_speed:>9.2f}")
    print(f"{'anchorless train() (1 worker)':<34} {platform_speed:>9.2f}")
    print(f"{'ratio platform / bare':<34} {ratio:>9.3f}")
    print(
        json.dumps(
            {
                "bare_images_per_s": round(bare_speed, 3),
                "platform_images_per_s": round(platform_speed, 3),
                "platform_vs_bare_ratio": round(ratio, 3),
                "image_size": cfg.data.image_size,
                "batch_size": cfg.data.batch_size,
                "threads": args.threads,
                "epochs": args.epochs,
                "repeats": args.repeats,
                "bare_epochs": [round(v, 2) for v in bare],
                "platform_epochs": [round(v, 2) for v in platform],
            }
        )
    )


if __name__ == "__main__":
    main()
