"""The NMS family side by side on the same raw detections: BCCD test split, every NMS kind's
AP, AP50, duplicate rate and milliseconds per image, torchvision's ``batched_nms`` ("hard")
as the speed reference.

Three detectors, each either trained from scratch on BCCD through the platform with the
recipe of ``bench/accuracy.py`` (its ``DETECTORS`` table and ``experiment_config``:
two Ray Train workers, DeepSpeed, bf16, ``--minutes`` of training time) or loaded from a
local ``.pt`` export (``--load NAME=PATH``):

- ``fcos_r18``: FCOS-R18 (hard NMS at 0.6 is its own post-processing);
- ``gfl_r18``: GFL-R18 (v1; the same);
- ``onenet_r18``: OneNet-R18 (NMS-free: "none" is its own).

Each model runs once over the test split with NMS off, which gives its raw candidates:
FCOS and GFL keep every (location, class) pair above 0.05, at most 1000 per level; OneNet
its top 100. Every NMS kind then post-processes the same cached candidates with the
model's IoU threshold (``detector.postprocess.nms_iou``) and each kind's paper values for
the rest, keeps the top 100, and is scored by ``common.score_on_split`` (pycocotools on
original pixels, the duplicate rate at score 0.3 / IoU 0.5). Milliseconds per image are
the CPU time of the one thread doing the NMS (``time.thread_time``, torch on one thread),
median over ``--repeats`` passes over the cached candidates.

    .venv/bin/python bench/nms.py [--bccd DIR] [--minutes 10] [--load fcos_r18=model.pt ...] [--only NAME ...]

``--minutes 1`` is a smoke check (the models learn little in a minute). Prints one table
per model, then one JSON line of headline figures:
``{"models": {name: {kind: {"AP", "AP50", "duplicate_rate", "ms_per_image"}}}, "best": {name: {...}}, ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import experiment_config  # noqa: E402
from common import SHARD_CACHE, iter_eval_batches, score_on_split, shard_splits, start_training_bench  # noqa: E402

from anchorless.detectors.postprocess import NMS_KINDS, LevelwisePostprocess, Postprocess  # noqa: E402

MODELS = ("fcos_r18", "gfl_r18", "onenet_r18")
REFERENCE = "hard"  # torchvision's batched_nms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bccd", default="bccd", help="BCCD root (annotations/, images/); default the preset: $ANCHORLESS_BCCD, else ../shared/datasets/bccd"
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="training-time budget of each model trained here")
    parser.add_argument("--image-size", type=int, default=416)
    parser.add_argument("--only", nargs="+", choices=MODELS, help="run only these models")
    parser.add_argument(
        "--load", action="append", default=[], metavar="NAME=PATH", help="use a local .pt export instead of training NAME"
    )
    parser.add_argument("--kinds", nargs="+", choices=NMS_KINDS, default=list(NMS_KINDS), help="NMS kinds to compare")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the cached candidates (median)")
    parser.add_argument("--workdir", help="runs go here (default: a new temporary directory); shards to --cache")
    parser.add_argument(
        "--cache",
        default=str(SHARD_CACHE),
        help="shards, written once per source (default $ANCHORLESS_BENCH_CACHE, else workspace/bench/shards)",
    )
    args = parser.parse_args()
    args.overrides = []  # experiment_config reads the accuracy bench's --set overrides
    return args


def trained_model(name: str, cfg, exports: dict[str, str]) -> torch.nn.Module:
    """The model of ``name``: loaded from its ``--load`` export, else trained here."""
    from anchorless.platform.models.loading import load_model

    if name in exports:
        model, _ = load_model(exports[name])
    else:
        from anchorless.platform.training.driver import train

        model, _ = load_model(train(cfg, restart=True, progress=True)["export"])
    return model.eval()


def raw_candidates(model: torch.nn.Module, shard_dir: Path, cfg) -> list[list[dict[str, torch.Tensor]]]:
    """Per test batch, per image: the model's detections with NMS off and nothing cut after
    its own candidate selection (per-level top-k, or OneNet's top 100)."""
    post = model.postprocess
    settings = (post.nms, post.topk)
    post.nms = "none"
    if isinstance(post, LevelwisePostprocess):
        post.topk = post.pre_nms_topk * len(model.head.strides)
    try:
        return [model.predict(images) for images, _ in iter_eval_batches(shard_dir, cfg)]
    finally:
        post.nms, post.topk = settings


def compare_kinds(
    raw: list[list[dict[str, torch.Tensor]]], nms_iou: float, kinds: list[str], shard_dir: Path, cfg, repeats: int
) -> dict[str, dict[str, float]]:
    """Every kind on the same candidates: COCO scores and CPU ms per image."""
    images = [image for batch in raw for image in batch]
    results = {}
    for kind in kinds:
        post = Postprocess(topk=100, nms=kind, nms_iou=nms_iou)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            times = []
            for _ in range(repeats):
                start = time.thread_time()
                for det in images:
                    post.select(det["boxes"], det["scores"], det["labels"])
                times.append((time.thread_time() - start) / max(len(images), 1) * 1000)
        finally:
            torch.set_num_threads(threads)
        replay = iter(raw)

        def predict(_images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
            return [post.select(det["boxes"], det["scores"], det["labels"]) for det in next(replay)]

        with contextlib.redirect_stdout(io.StringIO()):
            scores = score_on_split(predict, shard_dir, cfg)
        results[kind] = {
            "AP": round(float(scores["AP"]), 4),
            "AP50": round(float(scores["AP50"]), 4),
            "duplicate_rate": round(float(scores["duplicate_rate"]), 4),
            "ms_per_image": round(statistics.median(times), 3),
        }
    return results


def print_table(name: str, results: dict[str, dict[str, float]], candidates: float) -> None:
    reference = results.get(REFERENCE, {}).get("ms_per_image")
    print(f"\n{name}: {candidates:.0f} candidates per image")
    print(f"{'NMS':<18} {'AP':>7} {'AP50':>7} {'dup':>6} {'ms/img':>8} {'x hard':>7}")
    for kind, r in results.items():
        speed = f"{r['ms_per_image'] / reference:>7.2f}" if reference else f"{'':>7}"
        print(f"{kind:<18} {r['AP']:>7.4f} {r['AP50']:>7.4f} {r['duplicate_rate']:>6.3f} {r['ms_per_image']:>8.3f} {speed}")


def main() -> None:
    args = parse_args()
    start_training_bench()
    exports = dict(item.split("=", 1) for item in args.load)
    unknown = sorted(set(exports) - set(MODELS))
    if unknown:
        sys.exit(f"--load {unknown[0]}=...: not one of {', '.join(MODELS)}")
    try:
        data = shard_splits(args.bccd, Path(args.cache))
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"{exc} (pass --bccd or set ANCHORLESS_BCCD)")
    if data.scored != "test":
        sys.exit(f"{data.root}: no test split (annotations/instances_test.json)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="anchorless-bench-nms-"))

    tables, candidates = {}, {}
    for name in args.only or MODELS:
        how = f"loaded from {exports[name]}" if name in exports else f"{args.minutes:g} min of training"
        print(f"\n== {name}: {how}", flush=True)
        cfg = experiment_config(name, data, workdir, args)
        model = trained_model(name, cfg, exports)
        raw = raw_candidates(model, data.shards["test"], cfg)
        count = [len(det["scores"]) for batch in raw for det in batch]
        candidates[name] = statistics.fmean(count) if count else 0.0
        tables[name] = compare_kinds(raw, model.postprocess.nms_iou, args.kinds, data.shards["test"], cfg, args.repeats)

    print(f"\nBCCD test split ({args.image_size} px): every NMS kind on each model's raw candidates, top 100 kept")
    for name, results in tables.items():
        print_table(name, results, candidates[name])
    best = {
        name: {
            "kind": max(results, key=lambda kind: results[kind]["AP"]),
            "AP": max(r["AP"] for r in results.values()),
            "AP_hard": results.get(REFERENCE, {}).get("AP"),
            "ms_hard": results.get(REFERENCE, {}).get("ms_per_image"),
        }
        for name, results in tables.items()
    }
    print(json.dumps({
        "models": tables, "best": best, "candidates_per_image": {k: round(v, 1) for k, v in candidates.items()},
        "minutes": args.minutes, "image_size": args.image_size, "loaded": exports,
    }))


if __name__ == "__main__":
    main()
