"""Inference speed: our FCOS-R50 vs torchvision's fcos_resnet50_fpn, with our OneNet-R18 and
CenterNet-R18 beside them.

Same input size and batch for every model, eval mode, no gradients, random weights
(weights=None: nothing is downloaded), forward + post-processing, images per second.
torchvision's model is built with min_size = max_size = the input size so its transform
does not resize, with 80 classes, and our FCOS with BatchNorm like torchvision's
weights=None build (ours defaults to frozen BN, which only matters with pretrained weights).
Ours run as the platform serves a model: BatchNorm folded into the convolutions
(``detectors.layers.fold_batchnorm``; GroupNorm in the FCOS head cannot fold); a row without folding shows
the bare network, the same convolutions as torchvision's.

Two post-processing loads: "default" thresholds (ours: cls > 0.05; torchvision:
sqrt(cls * ctr) > 0.2) — with random weights almost nothing passes, so this is the
network's cost — and "loaded" (both thresholds 0), where 1000 candidates per level go
through NMS, the worst case of post-processing.

Times are CPU time of the one thread doing the work (``time.thread_time``, torch set to
one intra-op thread), so the load of other jobs on a shared machine does not enter; the
median over interleaved rounds.

    .venv/bin/python bench/inference.py [--size 384] [--batch 2] [--repeats 5]

Prints a side-by-side table, then one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torchvision.models.detection import fcos_resnet50_fpn

from anchorless.detectors import build_detector
from anchorless.detectors.layers import fold_batchnorm

NUM_CLASSES = 80


def build_models(size: int, loaded: bool) -> dict[str, tuple[torch.nn.Module, bool]]:
    """name -> (model in eval mode, takes a list of images instead of a batch tensor)."""
    threshold = {"score_threshold": 0.0} if loaded else {}
    ours_fcos = build_detector(
        {"name": "fcos", "num_classes": NUM_CLASSES, "backbone": {"depth": 50, "norm": "bn"}, "postprocess": threshold}
    )
    theirs = fcos_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES,
        min_size=size,
        max_size=size,
        **({"score_thresh": 0.0} if loaded else {}),
    )
    onenet = build_detector({"name": "onenet", "num_classes": NUM_CLASSES, "postprocess": threshold})
    centernet = build_detector({"name": "centernet", "num_classes": NUM_CLASSES, "postprocess": threshold})
    for model in (ours_fcos, theirs, onenet, centernet):
        model.eval()
    # Ours as the platform serves them (evaluate, predict, the MLflow model): BatchNorm folded
    # into the convolutions. The unfolded FCOS row is the same network as torchvision's.
    return {
        "ours FCOS-R50": (fold_batchnorm(ours_fcos), False),
        "ours FCOS-R50 unfolded": (ours_fcos, False),
        "torchvision FCOS-R50": (theirs, True),
        "ours OneNet-R18": (fold_batchnorm(onenet), False),
        "ours CenterNet-R18": (fold_batchnorm(centernet), False),
    }


def run(model: torch.nn.Module, as_list: bool, images: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(list(images)) if as_list else model.predict(images)
    return sum(len(d["scores"]) for d in out)


def measure(models, images: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Images/s per model: models interleaved round by round so machine load hits all alike."""
    for model, as_list in models.values():
        run(model, as_list, images)  # warm-up
    seconds = {name: [] for name in models}
    detections = {}
    for _ in range(repeats):
        for name, (model, as_list) in models.items():
            start = time.thread_time()
            detections[name] = run(model, as_list, images)
            seconds[name].append(time.thread_time() - start)
    return {
        name: {"images_per_s": len(images) / statistics.median(s), "detections": detections[name] / len(images)}
        for name, s in seconds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=384, help="square input size (multiple of 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    args = parser.parse_args()
    args.threads = 1  # thread_time counts the calling thread only
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size)

    results = {}
    for load in ("default", "loaded"):
        results[load] = measure(build_models(args.size, load == "loaded"), images, args.repeats)

    print(f"Inference, {args.batch} x 3 x {args.size} x {args.size}, 1 thread, images per CPU-second "
          f"(thread time), random weights, forward + post-processing, median of {args.repeats}")
    print(f"{'model':<24} | {'default img/s':>13} | {'vs tv FCOS':>10} | {'loaded img/s':>12} | "
          f"{'vs tv FCOS':>10} | {'dets/img (loaded)':>17}")
    print("-" * 100)
    for name in results["default"]:
        d, lo = results["default"][name], results["loaded"][name]
        rd = d["images_per_s"] / results["default"]["torchvision FCOS-R50"]["images_per_s"]
        rl = lo["images_per_s"] / results["loaded"]["torchvision FCOS-R50"]["images_per_s"]
        print(f"{name:<24} | {d['images_per_s']:>13.3f} | {rd:>9.2f}x | {lo['images_per_s']:>12.3f} | "
              f"{rl:>9.2f}x | {lo['detections']:>17.0f}")
    print("(ours FCOS vs peer torchvision fcos_resnet50_fpn: same backbone, FPN P3-P7 and head widths)")

    def ips(load: str, name: str) -> float:
        return round(results[load][name]["images_per_s"], 3)

    headline = {
        "benchmark": "inference",
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "ours_fcos_r50_img_s": ips("default", "ours FCOS-R50"),
        "torchvision_fcos_r50_img_s": ips("default", "torchvision FCOS-R50"),
        "ours_onenet_r18_img_s": ips("default", "ours OneNet-R18"),
        "ours_centernet_r18_img_s": ips("default", "ours CenterNet-R18"),
        "fcos_vs_torchvision_ratio": round(
            ips("default", "ours FCOS-R50") / ips("default", "torchvision FCOS-R50"), 3
        ),
        "fcos_vs_torchvision_ratio_loaded": round(
            ips("loaded", "ours FCOS-R50") / ips("loaded", "torchvision FCOS-R50"), 3
        ),
        "unfolded_fcos_vs_torchvision_ratio": round(
            ips("default", "ours FCOS-R50 unfolded") / ips("default", "torchvision FCOS-R50"), 3
        ),
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
