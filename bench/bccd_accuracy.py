"""Accuracy for a fixed training-time budget on real data: BCCD, scored on its test split.

Three detectors, each trained from scratch for the same wall-clock budget of training
time on this machine (start-up and evaluation excluded on every side):

- ``onenet_r18``: OneNet-R18 through ``anchorless.platform.training.driver.train`` (two Ray Train
  workers, DeepSpeed, Ray Data, bf16 autocast), stopped by ``training.time_budget_minutes``;
- ``fcos_r18``: our FCOS-R18 through the same path (and the other entries of ``DETECTORS``,
  ``cornernet_r18`` and ``centernet_triplets_r18`` among them, scored after their Soft-NMS);
- ``torchvision_fcos_r18``: torchvision's ``FCOS`` on a ResNet-18 FPN (P3-P7) trained by
  a plain single-process loop with two torch threads and one DataLoader worker (the
  same two cores), stopped at the same budget.

Ours train with ``training.precision=bf16`` (the platform's CPU mixed precision: the forward
under bf16 autocast, float32 weights, gradients and losses); the peer is a plain float32 loop,
or bf16 autocast too with ``--set torchvision_fcos_r18:training.precision=bf16``.

Every side gets the same inputs and recipe: the BCCD train split letterboxed to
``--image-size`` with the platform's augmentations (the peer reads the same shards
through the same ``decode_and_transform``), 8 images per optimizer step, AdamW
(lr 5e-4, weight decay 1e-4), 100 warmup steps then a constant LR, gradient clipping
at 1.0, BatchNorm everywhere (no pretrained weights exist here). torchvision's
transform gets ``min_size = max_size = image size`` so it only normalises (ImageNet
mean/std, as ours), and its score threshold is FCOS's 0.05. Every model is scored by
the same function (``common.score_on_split``: pycocotools AP/AP50 on original pixels
and the duplicate rate) on the BCCD test split, which no side saw.

    .venv/bin/python bench/bccd_accuracy.py [--bccd DIR] [--minutes 10] [--seeds 1] [--only NAME ...]

With ``--seeds N`` every detector trains N times (``training.seed`` 0..N-1: initial
weights, data order and augmentation), seed by seed in turn, and the table shows
the mean and the spread: at a few hundred steps from scratch, one run per side
cannot rank these models (see the single runs in BENCHMARKS.md).

Prints a side-by-side table, then one JSON line (AP and AP50 are the means over seeds):
``{"onenet_r18": {"AP":…, "AP50":…, "AP_seeds": […], …}, "fcos_r18": {…}, "torchvision_fcos_r18": {…}, "minutes": …}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ShardBatches, score_on_split, shard_splits  # noqa: E402

PEER = "torchvision_fcos_r18"
DETECTORS = {
    # From scratch: box sides regressed in strides (4 px) rather than raw pixels, and the
    # auxiliary one-to-many head (9 positives per object, training only) sharing the box
    # regression; each was measured better on BCCD (BENCHMARKS.md, the OneNet-R18 probes).
    "onenet_r18": {
        "name": "onenet", "num_classes": 3, "backbone": {"depth": 18}, "head": {"ltrb_scale": 4.0, "one_to_many_topk": 9}
    },
    "fcos_r18": {"name": "fcos", "num_classes": 3, "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}},
    # FCOS + ATSS (configs/bccd_fcos_atss_r18.yaml), GFL v1 (configs/bccd_gfl_r18.yaml) and v2.
    "fcos_atss_r18": {
        "name": "fcos", "num_classes": 3, "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}, "assigner": {"kind": "atss"}
    },
    "gfl_r18": {"name": "gfl", "num_classes": 3, "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}},
    "gfl_v2_r18": {"name": "gfl_v2", "num_classes": 3, "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}},
    # The corner-keypoint detectors on ResNet-18 + the deconvolution upsampler, 64-channel
    # branches (configs/bccd_cornernet_r18.yaml, configs/bccd_centernet_triplets_r18.yaml).
    "cornernet_r18": {"name": "cornernet", "num_classes": 3, "backbone": {"depth": 18}, "head": {"channels": 64}},
    "centernet_triplets_r18": {
        "name": "centernet_triplets", "num_classes": 3, "backbone": {"depth": 18}, "head": {"channels": 64}
    },
}
OURS = tuple(DETECTORS)  # every entry races by default


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_bccd = os.environ.get("ANCHORLESS_BCCD", str(REPO / ".." / "shared" / "datasets" / "bccd"))
    parser.add_argument("--bccd", default=default_bccd, help="BCCD root (annotations/, images/)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training-time budget of each detector")
    parser.add_argument("--image-size", type=int, default=416)
    parser.add_argument("--seeds", type=int, default=1, help="runs per detector (training.seed 0..N-1); mean and spread reported")
    parser.add_argument("--only", nargs="+", choices=[*OURS, PEER], help="run only these")
    parser.add_argument("--workdir", help="shards and runs go here (default: a new temporary directory)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[NAME:]key.path=value",
        help="change the recipe of one detector (NAME:) or of all, e.g. onenet_r18:detector.head.num_heads=2; "
        "the peer reads data and training fields. Published figures use none.",
    )
    return parser.parse_args()


def overrides_for(name: str, overrides: list[str]) -> list[str]:
    """The ``--set`` values that apply to ``name``: unprefixed ones and ``name:``-prefixed ones."""
    chosen = []
    for override in overrides:
        target, sep, rest = override.partition(":")
        if not sep or "=" in target:  # no prefix (a value may contain ':')
            chosen.append(override)
        elif target == name:
            chosen.append(rest)
        elif target not in (*OURS, PEER):
            sys.exit(f"--set {override}: {target!r} is not one of {', '.join((*OURS, PEER))}")
    return chosen


def experiment_config(name: str, shards: dict[str, Path], workdir: Path, args: argparse.Namespace, seed: int = 0):
    """The common recipe as a platform config; the peer reads its data/optimizer fields too."""
    from anchorless.platform.config import apply_overrides, build_config

    raw = {
        "name": f"bench-bccd-{name}",
        "workspace": str(workdir / "workspace"),
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "image_size": args.image_size, "batch_size": 4, "max_boxes": 100},
        "detector": DETECTORS.get(name, DETECTORS["fcos_r18"]),
        "training": {
            "epochs": 10_000,  # the budget stops it
            "num_workers": 2,
            "cpus_per_worker": 1,
            "time_budget_minutes": args.minutes,
            "optimizer": {"name": "adamw", "lr": 5e-4, "weight_decay": 1e-4},
            "schedule": {"kind": "constant", "warmup_steps": 100, "warmup_factor": 0.01},
            "grad_clip": 1.0,
            # Ours train with the platform's CPU bf16 (autocast forward, float32 weights and losses;
            # ~1.9x the steps here); the peer is the plain float32 loop unless --set says otherwise.
            "precision": "fp32" if name == PEER else "bf16",
            "checkpoint": {"every_epochs": 10_000},
        },
        "evaluation": {"every_epochs": 10_000},  # scored once, at the stop, on val; test is scored below
        "tracking": {"experiment": "bench-bccd", "registered_model": None, "tracking_uri": None},
    }
    overrides = [f"training.seed={seed}", *overrides_for(name, args.overrides)]
    return build_config(apply_overrides(raw, overrides), source=f"{name} recipe")


def run_ours(name: str, cfg, shards: dict[str, Path]) -> dict:
    from anchorless.platform.models.loading import load_model
    from anchorless.platform.training.driver import train

    summary = train(cfg, restart=True, progress=True)
    model, _ = load_model(summary["export"])
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        scores = score_on_split(model.predict, shards["test"], cfg)
    return {**scores, "steps": summary["step"], "epochs": summary["epoch"]}


def torchvision_fcos(num_classes: int, image_size: int) -> torch.nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        norm_layer=torch.nn.BatchNorm2d,  # trainable BN: nothing pretrained to freeze
        trainable_layers=5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),  # P6 from P5, as torchvision's own FCOS-R50
    )
    # Inputs arrive letterboxed to image_size: the transform's resize is then the identity.
    return FCOS(backbone, num_classes=num_classes, min_size=image_size, max_size=image_size, score_thresh=0.05)


def run_peer(cfg, shards: dict[str, Path], minutes: float) -> dict:
    """torchvision FCOS-R18 trained by a plain loop until ``minutes`` of training time."""
    from tqdm import tqdm

    from anchorless.platform.data.pipeline import to_model_inputs
    from anchorless.platform.training.engine import WarmupSchedule, training_autocast

    torch.set_num_threads(2)
    torch.manual_seed(cfg.training.seed)
    model = torchvision_fcos(cfg.detector["num_classes"], cfg.data.image_size)
    opt = cfg.training.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule.from_config(cfg.training.schedule, 10**9))
    peer_cfg = cfg.model_copy(deep=True)
    peer_cfg.data.batch_size = cfg.data.batch_size * cfg.training.num_workers  # one process takes the global batch
    batches = ShardBatches(shards["train"], peer_cfg)
    forward_precision = training_autocast(cfg.training, torch.device("cpu"))  # fp32 unless --set precision
    budget_s, spent, steps, epoch = minutes * 60.0, 0.0, 0, 0
    bar = tqdm(total=round(budget_s), unit="s", desc="torchvision FCOS-R18 (training s)")
    model.train()
    while spent < budget_s:
        batches.set_epoch(epoch)  # a fresh loader per epoch so its worker sees the new order
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=1, prefetch_factor=2)
        tick = time.perf_counter()
        for batch in loader:
            images, targets, _ = to_model_inputs(batch)
            with forward_precision:
                losses = model(list(images), targets)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
            optimizer.step()
            scheduler.step()
            steps += 1
            now = time.perf_counter()
            spent, tick = spent + now - tick, now
            bar.update(round(spent) - bar.n)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            if spent >= budget_s:
                break
        epoch += 1
    bar.close()
    model.eval()

    def predict(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return model(list(images))

    with contextlib.redirect_stdout(io.StringIO()):
        scores = score_on_split(predict, shards["test"], cfg)
    return {**scores, "steps": steps, "epochs": round(steps / len(batches), 2)}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    bccd = Path(args.bccd)
    if not (bccd / "annotations").is_dir():
        sys.exit(f"BCCD not found at {bccd} (pass --bccd or set ANCHORLESS_BCCD)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="anchorless-bench-bccd-"))
    shards = shard_splits(bccd, workdir)

    names = args.only or [PEER, *OURS]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    loads = {name: [] for name in names}
    for seed in range(args.seeds):  # seed by seed, so slow drift of the machine's load hits every side alike
        for name in names:
            print(f"\n== {name}, seed {seed}: {args.minutes:g} min of training", flush=True)
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            cfg = experiment_config(name, shards, workdir, args, seed=seed)
            result = run_peer(cfg, shards, args.minutes) if name == PEER else run_ours(name, cfg, shards)
            runs[name].append(result)
            loads[name].append((round(load_before, 1), round(os.getloadavg()[0], 1)))
            print(f"   wall {time.perf_counter() - start:.0f} s, load {loads[name][-1]}: AP {result['AP']:.4f} AP50 {result['AP50']:.4f}", flush=True)
    results = {name: summarise(name_runs) for name, name_runs in runs.items()}

    seeds = f", mean ± sd over {args.seeds} seeds" if args.seeds > 1 else ""
    print(f"\nBCCD test split ({args.image_size} px), {args.minutes:g} min of training each, from scratch{seeds}")
    print(f"{'':<24} {'AP':>15} {'AP50':>15} {'AP75':>7} {'dup':>6} {'steps':>6} {'epochs':>7}")
    for name, r in results.items():
        print(
            f"{name:<24} {r['AP']:>7.4f} ±{r['AP_sd']:.3f} {r['AP50']:>7.4f} ±{r['AP50_sd']:.3f} "
            f"{r['AP75']:>7.4f} {r['duplicate_rate']:>6.3f} {r['steps']:>6.0f} {r['epochs']:>7.1f}"
        )
        if args.seeds > 1:
            print(f"{'':<24} AP per seed: {', '.join(f'{ap:.3f}' for ap in r['AP_seeds'])}")
    if PEER in results:
        for name in OURS:
            if name in results:
                ratio = results[name]["AP"] / max(results[PEER]["AP"], 1e-9)
                print(f"{name} / {PEER}: AP x{ratio:.2f}, AP50 x{results[name]['AP50'] / max(results[PEER]['AP50'], 1e-9):.2f}")
    print(json.dumps({**results, "minutes": args.minutes, "seeds": args.seeds, "image_size": args.image_size, "load_before_after": loads, "overrides": args.overrides}))


def summarise(runs: list[dict]) -> dict:
    """Means over seeds (AP, AP50, AP75, duplicate rate, steps), spreads and per-seed values of AP and AP50."""
    summary: dict = {}
    for key in ("AP", "AP50", "AP75", "duplicate_rate", "steps", "epochs"):
        values = [float(run[key]) for run in runs]
        summary[key] = round(statistics.fmean(values), 4)
        if key in ("AP", "AP50"):
            summary[f"{key}_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
            summary[f"{key}_seeds"] = [round(value, 4) for value in values]
    return summary


if __name__ == "__main__":
    main()
