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

CornerNet-Lite (``--lite``: only these): the papers' networks at 80 classes, random weights,
BatchNorm folded, one image of ``--lite-size`` (512, the papers' 511 rounded to what both trunks
divide): ``cornernet`` on Hourglass-104 against ``cornernet_squeeze`` on Hourglass-Squeeze, forward
+ pairing + Soft-NMS, thread time as above. Then, when ``--saccade`` and ``--cornernet`` name
trained models (exports or registry URIs, such as the accuracy race's), the speed/accuracy curve
of ``cornernet_saccade`` over ``--k-max`` (1 3 6 12) beside CornerNet on the scored split of
``--data`` letterboxed to ``--curve-size`` (416, the race's; AP by the race's scoring function):
images per second of wall time (the predict calls only, torch's default threads, so run it on a
quiet machine), the crops per image each k_max really took, and a plot (``--plot``).

    .venv/bin/python bench/inference.py [--size 384] [--batch 2] [--repeats 5]
    .venv/bin/python bench/inference.py --keypoint [--keypoint-size 416] [--repeats 3]
    .venv/bin/python bench/inference.py --lite [--lite-size 512] [--repeats 3]
        [--saccade MODEL --cornernet MODEL --data bccd --curve-size 416 --k-max 1 3 6 12 --plot FILE.png]

Prints a side-by-side table, then one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

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


LITE_SPEED_ROWS = {"CornerNet (Hourglass-104)": "cornernet", "CornerNet-Squeeze (Hourglass-Squeeze)": "cornernet_squeeze"}


def lite_speed_section(args: argparse.Namespace) -> dict[str, float]:
    """Squeeze against CornerNet at the same input: the papers' networks, as the platform serves them."""
    models = {}
    for label, name in LITE_SPEED_ROWS.items():
        torch.manual_seed(0)
        model = build_detector({"name": name, "num_classes": NUM_CLASSES}).eval()
        parameters = sum(p.numel() for p in model.parameters())
        models[label] = (fold_batchnorm(model), False)
        print(f"{label}: {parameters / 1e6:.2f}M parameters")
    images = torch.rand(1, 3, args.lite_size, args.lite_size)
    speed = measure(models, images, args.repeats)
    cornernet, squeeze = (speed[label]["images_per_s"] for label in LITE_SPEED_ROWS)
    print(f"\nCornerNet-Lite speed, 1 x 3 x {args.lite_size}^2, 1 thread, random weights, 80 classes, "
          f"forward + pairing + Soft-NMS, median of {args.repeats}")
    print(f"{'model':<40} | {'img/s':>7} | {'s/img':>7} | {'vs CornerNet':>12}")
    for label, row in speed.items():
        ratio = row["images_per_s"] / cornernet
        print(f"{label:<40} | {row['images_per_s']:>7.3f} | {1 / row['images_per_s']:>7.2f} | {ratio:>11.2f}x")
    return {
        "lite_size": args.lite_size,
        "cornernet_hourglass104_img_s": round(cornernet, 4),
        "cornernet_squeeze_img_s": round(squeeze, 4),
        "squeeze_vs_cornernet_ratio": round(squeeze / cornernet, 2),
    }


def timed_scores(model: torch.nn.Module, shard_dir: Path, cfg) -> dict[str, float]:
    """AP etc. on a split (the race's scoring) with the wall seconds spent in ``model.predict``."""
    from common import score_on_split

    spent, images = [0.0], [0]

    def predict(batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        start = time.perf_counter()
        out = model.predict(batch)  # score_on_split runs under no_grad
        spent[0] += time.perf_counter() - start
        images[0] += len(batch)
        return out

    scores = score_on_split(predict, shard_dir, cfg)
    return {**scores, "images": images[0], "images_per_s": images[0] / spent[0]}


def count_crops(model: torch.nn.Module) -> list[int]:
    """Makes ``model`` (a cornernet_saccade) count the locations it looks at: [views + crops]."""
    looked = [0]
    look = model.look

    def counting_look(images, where, side):
        looked[0] += len(where.image)
        return look(images, where, side)

    model.look = counting_look
    return looked


def kmax_curve_section(args: argparse.Namespace) -> dict:
    """Saccade's speed/accuracy over k_max beside CornerNet, on the scored split of ``--data``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import SHARD_CACHE, shard_splits

    from anchorless.platform.config import apply_overrides, build_config
    from anchorless.platform.models.loading import load_model

    def scoring_config(meta: dict, source: str):  # the model's own config at the curve's input size
        return build_config(apply_overrides(meta["config"], [f"data.image_size={args.curve_size}"]), source=source)

    torch.set_num_threads(args.curve_threads)
    data = shard_splits(args.data, Path(args.cache or SHARD_CACHE))
    split = data.shards[data.scored]
    saccade, saccade_meta = load_model(args.saccade)
    cornernet, cornernet_meta = load_model(args.cornernet)
    if saccade_meta["config"]["detector"]["name"] != "cornernet_saccade":
        raise SystemExit(f"--saccade {args.saccade}: a {saccade_meta['config']['detector']['name']} model, not cornernet_saccade")
    views_per_image = len(saccade.postprocess.init_sizes)
    looked = count_crops(saccade)
    saccade_scoring = scoring_config(saccade_meta, str(args.saccade))
    rows = {}
    load_before = os.getloadavg()[0]
    for k_max in args.k_max:
        saccade.postprocess.k_max = k_max
        looked[0] = 0
        row = timed_scores(saccade, split, saccade_scoring)
        row["crops_per_image"] = looked[0] / row["images"] - views_per_image
        rows[f"cornernet_saccade k_max {k_max}"] = row
    rows["cornernet"] = timed_scores(cornernet, split, scoring_config(cornernet_meta, str(args.cornernet)))
    load_after = os.getloadavg()[0]
    base = rows["cornernet"]
    print(f"\nSaccade's k_max on {data.name} {data.scored} ({base['images']} images at {args.curve_size} px), wall time of predict, "
          f"{args.curve_threads} threads, load {load_before:.1f} -> {load_after:.1f}")
    print(f"{'model':<30} | {'crops/img':>9} | {'img/s':>7} | {'vs CornerNet':>12} | {'AP':>6} | {'AP50':>6} | {'AP75':>6}")
    for name, row in rows.items():
        crops = f"{row['crops_per_image']:>9.2f}" if "crops_per_image" in row else f"{'-':>9}"
        print(f"{name:<30} | {crops} | {row['images_per_s']:>7.3f} | {row['images_per_s'] / base['images_per_s']:>11.2f}x | "
              f"{row['AP']:>6.3f} | {row['AP50']:>6.3f} | {row['AP75']:>6.3f}")
    if args.plot:
        plot_kmax_curve(rows, Path(args.plot), f"{data.name} {data.scored}")
    return {
        "kmax_curve": {
            name: {key: round(float(row[key]), 4) for key in ("AP", "AP50", "AP75", "images_per_s", "crops_per_image") if key in row}
            for name, row in rows.items()
        },
        "curve_data": data.name,
        "curve_size": args.curve_size,
        "curve_threads": args.curve_threads,
    }


def plot_kmax_curve(rows: dict[str, dict], path: Path, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anchorless.files import atomic_path

    saccade = {name.rsplit(" ", 1)[1]: row for name, row in rows.items() if name.startswith("cornernet_saccade")}
    figure, axes = plt.subplots(figsize=(5.5, 4))
    axes.plot([r["images_per_s"] for r in saccade.values()], [r["AP"] for r in saccade.values()], "o-", label="CornerNet-Saccade")
    for k_max, row in saccade.items():
        axes.annotate(f"k_max {k_max}", (row["images_per_s"], row["AP"]), textcoords="offset points", xytext=(5, 5))
    axes.plot([rows["cornernet"]["images_per_s"]], [rows["cornernet"]["AP"]], "s", label="CornerNet")
    axes.set(xlabel="images / s (CPU, wall)", ylabel=f"AP ({split})", title="CornerNet-Saccade: speed vs accuracy over k_max")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    os.chmod(path, 0o644)
    print(f"plot: {path}")


def lite_section(args: argparse.Namespace) -> dict:
    figures = lite_speed_section(args)
    if args.saccade or args.cornernet:
        if not (args.saccade and args.cornernet):
            raise SystemExit("the k_max curve needs both --saccade and --cornernet (trained models)")
        figures.update(kmax_curve_section(args))
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
    parser.add_argument("--lite", action="store_true", help="only the CornerNet-Lite rows (and the k_max curve)")
    parser.add_argument("--lite-size", type=int, default=512, help="input side of the Squeeze vs CornerNet rows")
    parser.add_argument("--saccade", help="a trained cornernet_saccade (export path or models:/ URI) for the k_max curve")
    parser.add_argument("--cornernet", help="a trained CornerNet (export path or models:/ URI) beside the curve")
    parser.add_argument("--data", default="bccd", help="the curve's data: a preset (bccd, raccoon) or a COCO root")
    parser.add_argument("--cache", help="shard cache of the curve's data (default: the accuracy race's)")
    parser.add_argument("--curve-size", type=int, default=416, help="letterboxed input side of the curve (the accuracy race's)")
    parser.add_argument("--k-max", type=int, nargs="+", default=[1, 3, 6, 12], help="the curve's k_max values")
    parser.add_argument("--curve-threads", type=int, default=torch.get_num_threads(), help="torch threads of the curve")
    parser.add_argument("--plot", help="write the curve as a PNG here")
    args = parser.parse_args()
    args.threads = 1  # thread_time counts the calling thread only
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.lite:
        figures = lite_section(args)
        print(json.dumps({"benchmark": "inference_lite", "threads": args.threads, **figures}))
        return
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
