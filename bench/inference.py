"""Inference speed: our FCOS-R50 vs torchvision's fcos_resnet50_fpn, with our OneNet-R18 and
CenterNet-R18 beside them; and the corner-keypoint detectors (CornerNet-R18, CenterNet
triplets-R18) with and without Soft-NMS, with a training-step row beside FCOS-R18 and OneNet-R18.

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

Corner-keypoint rows (``--keypoint``: only these): the BCCD configs' ResNet-18 variants
(64-channel branches) with 80 classes at ``--keypoint-size`` (416), forward + pairing + their
Gaussian Soft-NMS, then the same weights with ``postprocess.nms=none`` (pairing alone). With
random weights few corner pairs pass the class, geometry and embedding checks; the "loaded"
rows drop the embedding check, so every same-class, well-ordered pair of the top 100 corners
goes on (up to the 1000 candidates): Soft-NMS's worst case.
Training: seconds per AdamW step (forward, losses, backward, step) at ``--keypoint-size``,
batch 4, 3 classes, random boxes, in float32, the median over ``--repeats`` steps after one.

    .venv/bin/python bench/inference.py [--size 384] [--batch 2] [--repeats 5]
    .venv/bin/python bench/inference.py --keypoint [--keypoint-size 416] [--repeats 3]

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


KEYPOINT_R18 = {"backbone": {"depth": 18}, "head": {"channels": 64}}  # configs/bccd_*_r18.yaml
TRAIN_ROWS = {  # the BCCD race's recipes (bench/accuracy.py --data bccd), 3 classes
    "FCOS-R18": {"name": "fcos", "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}},
    "OneNet-R18": {"name": "onenet", "backbone": {"depth": 18}, "head": {"ltrb_scale": 4.0, "one_to_many_topk": 9}},
    "CornerNet-R18": {"name": "cornernet", **KEYPOINT_R18},
    "CenterNet-triplets-R18": {"name": "centernet_triplets", **KEYPOINT_R18},
}


def build_keypoint_models() -> dict[str, tuple[torch.nn.Module, bool]]:
    """The corner-keypoint rows: each detector (the same weights) with its Soft-NMS and with
    none, at the paper's embedding threshold and "loaded" (no embedding threshold)."""
    models = {}
    for label, name in (("CornerNet-R18", "cornernet"), ("CenterNet-triplets-R18", "centernet_triplets")):
        for loaded in (False, True):
            for nms, tag in (("soft_gaussian", "Soft-NMS"), ("none", "no NMS")):
                post = {"nms": nms, **({"max_embedding_distance": 1e9} if loaded else {})}
                torch.manual_seed(0)
                model = build_detector({"name": name, "num_classes": NUM_CLASSES, **KEYPOINT_R18, "postprocess": post})
                models[f"ours {label} {tag}{' loaded' if loaded else ''}"] = (fold_batchnorm(model.eval()), False)
    return models


def training_seconds_per_step(size: int, batch: int, repeats: int) -> dict[str, float]:
    """Median thread seconds of one AdamW step per TRAIN_ROWS model, on random images and boxes."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator)
    targets = []
    for _ in range(batch):
        corner = torch.rand(8, 2, generator=generator) * size * 0.7  # (8, 2)
        extent = (torch.rand(8, 2, generator=generator) * 0.25 + 0.04) * size  # (8, 2)
        boxes = torch.cat([corner, (corner + extent).clamp(max=size - 1)], dim=1)  # (8, 4)
        targets.append({"boxes": boxes, "labels": torch.randint(0, 3, (8,), generator=generator)})
    seconds = {}
    for label, cfg in TRAIN_ROWS.items():
        torch.manual_seed(0)
        model = build_detector({**cfg, "num_classes": 3}).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(repeats + 1):  # the first step pays for allocations
            start = time.thread_time()
            loss = model(images, targets)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.thread_time() - start)
        seconds[label] = statistics.median(times[1:])
    return seconds


def keypoint_section(args: argparse.Namespace) -> dict[str, float]:
    """Print the corner-keypoint rows; returns their headline figures."""
    images = torch.rand(args.batch, 3, args.keypoint_size, args.keypoint_size)
    speed = measure(build_keypoint_models(), images, args.repeats)
    steps = training_seconds_per_step(args.keypoint_size, 4, args.repeats)
    print(f"\nCorner keypoints, {args.batch} x 3 x {args.keypoint_size}^2, 1 thread, random weights, 80 classes")
    print(f"{'model':<43} | {'img/s':>7} | {'dets/img':>8}")
    for name, row in speed.items():
        print(f"{name:<43} | {row['images_per_s']:>7.3f} | {row['detections']:>8.0f}")
    print(f"\nTraining step, 4 x 3 x {args.keypoint_size}^2, 1 thread, float32, AdamW, 3 classes")
    print(f"{'model':<43} | {'s/step':>7}")
    for name, value in steps.items():
        print(f"{name:<43} | {value:>7.2f}")

    def key(name: str) -> str:
        return name.lower().replace("ours ", "").replace("-", "_").replace(" ", "_")

    figures = {f"{key(name)}_img_s": round(row["images_per_s"], 3) for name, row in speed.items()}
    figures.update({f"train_{key(name)}_s_per_step": round(value, 3) for name, value in steps.items()})
    return figures


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
    parser.add_argument("--keypoint-size", type=int, default=416, help="input size of the corner-keypoint rows")
    parser.add_argument("--keypoint", action="store_true", help="only the corner-keypoint rows")
    args = parser.parse_args()
    args.threads = 1  # thread_time counts the calling thread only
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.keypoint:
        figures = keypoint_section(args)
        print(json.dumps({"benchmark": "inference_keypoint", "size": args.keypoint_size, "batch": args.batch,
                          "threads": args.threads, **figures}))  # fmt: skip
        return
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
    headline.update(keypoint_section(args))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
