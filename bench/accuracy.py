"""The accuracy race: every detector trained from scratch for the same budget of training time
on real data, against torchvision's FCOS-R18-FPN in float32 and in bf16 autocast.

``--data`` is a preset, ``bccd`` (364 blood-smear images, 3 classes, many small objects; scored
on its test split) or ``raccoon`` (200 photographs, 1 class, a few large objects; no test
split, so scored on val), or any root laid out like BCCD: ``annotations/instances_{train,val[,test]}.json``
and ``images/`` (the same names under ``coco/`` also do, as raccoon has them). A preset ``NAME``
lives at ``$ANCHORLESS_NAME``, else under ``--datasets`` / ``$ANCHORLESS_DATASETS`` / the
``shared/datasets`` folder beside the repository. The classes (count and names) are read from the
data; every entry is built for them. The splits are sharded once into ``--cache`` and reused
while their source (instances JSON and image folder) is unchanged.

The entries, each trained for ``--minutes`` of training time on this machine (start-up and
evaluation excluded on every side):

- ours, every entry of ``DETECTORS`` (every registered detector, in its BCCD race variant):
  through ``anchorless.platform.training.driver.train`` (two Ray Train workers, DeepSpeed, Ray
  Data, the platform's CPU bf16: the forward under bf16 autocast, float32 weights, gradients and
  losses), stopped by ``training.time_budget_minutes``;
- ``torchvision_fcos_r18``: torchvision's ``FCOS`` on a ResNet-18 FPN (P3-P7) trained by a plain
  single-process loop with two torch threads and one DataLoader worker (the same two cores),
  in float32, stopped at the same budget;
- ``torchvision_fcos_r18_bf16``: the same peer with its forward under bf16 autocast, as ours:
  our bf16 speed-up is not ours alone, so this is the fair fight.

The headline compares every entry's mean AP with the stronger of the two peer rows (the
higher mean AP in this race).

Every side gets the same inputs and recipe: the train split letterboxed to ``--image-size`` with
the platform's augmentations (the peer reads the same shards through the same
``decode_and_transform``), 8 images per optimizer step, AdamW (lr 5e-4, weight decay 1e-4), 100
warmup steps then a constant LR, gradient clipping at 1.0, BatchNorm everywhere (no pretrained
weights exist here); CornerNet-Saccade alone trains on 256-px windows around objects, its
paper's training (``ENTRY_OVERRIDES``), and is scored on the same ``--image-size`` inputs as the
rest. torchvision's transform gets ``min_size = max_size = image size`` so it only normalises
(ImageNet mean/std, as ours), and its score threshold is FCOS's 0.05. Every model is scored by
the same function (``common.score_on_split``: pycocotools AP/AP50/AP75 on original pixels and the
duplicate rate) on the scored split, which no side trained on.

    .venv/bin/python bench/accuracy.py --data bccd|raccoon|ROOT [--minutes 10] [--seeds 2] [--only NAME ...]
        [--set [NAME:]key.path=value ...] [--ablate [TRICK ...]] [--ablate-on NAME ...]

``--seeds N`` trains every entry N times (``training.seed`` 0..N-1: initial weights, data order
and augmentation), seed by seed in turn, so slow drift of the machine's load hits every side
alike; the table shows the mean, the spread and each seed's AP.

``--ablate`` adds one row per trick (all of ``TRICKS`` when none is named) for each entry of
``--ablate-on`` (default: our entries among those racing): the entry's recipe plus the trick's
overrides, one seed (seed 0, run right after the entry's own seed-0 run), named ``ENTRY+TRICK``
(``fcos_r18+ema``). A trick the entry lacks (label smoothing without a sigmoid focal loss, or on
the peer) is listed as not run. ``--set fcos_r18+ema:training.ema.tau=300`` changes one
ablation row; ``--set fcos_r18:...`` applies to the entry and its ablation rows.

Prints a side-by-side table, then one JSON line: each row's name mapped to its figures
(``"AP"``, ``"AP_sd"``, ``"AP_seeds"``, ``"AP50"``, ..., ``"AP75"``, ``"duplicate_rate"``,
``"steps"``, ``"epochs"``, ``"vs_peer"``), then ``"headline"`` (the stronger peer, its AP and every
row's AP ratio to it) and the race's settings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
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

from common import PRESETS, SHARD_CACHE, ShardBatches, ShardedData, score_on_split, shard_splits, start_training_bench  # noqa: E402

PEERS = {"torchvision_fcos_r18": "fp32", "torchvision_fcos_r18_bf16": "bf16"}  # name -> training.precision
DETECTORS = {  # num_classes comes from the data
    # From scratch: box sides regressed in strides (4 px) rather than raw pixels, and the
    # auxiliary one-to-many head (9 positives per object, training only) sharing the box
    # regression; each was measured better on BCCD (BENCHMARKS.md, the OneNet-R18 probes).
    "onenet_r18": {"name": "onenet", "backbone": {"depth": 18}, "head": {"ltrb_scale": 4.0, "one_to_many_topk": 9}},
    # OneNet's FCOS-head variant (FPN P3-P7, one match over every level) with the same
    # auxiliary one-to-many head: large objects are matched on a coarse level.
    "onenet_fpn_r18": {"name": "onenet_fpn", "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}, "head": {"one_to_many_topk": 9}},
    # CenterNet (objects as points) on ResNet-18 + its deconvolution upsampler (configs/bccd_centernet_r18.yaml).
    "centernet_r18": {"name": "centernet", "backbone": {"depth": 18}},
    "fcos_r18": {"name": "fcos", "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}},
    # FCOS + ATSS (configs/bccd_fcos_atss_r18.yaml), GFL v1 (configs/bccd_gfl_r18.yaml) and v2.
    "fcos_atss_r18": {"name": "fcos", "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}, "assigner": {"kind": "atss"}},
    "gfl_r18": {"name": "gfl", "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}},
    "gfl_v2_r18": {"name": "gfl_v2", "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}},
    # The corner-keypoint detectors on ResNet-18 + the deconvolution upsampler, 64-channel
    # branches (configs/bccd_cornernet_r18.yaml, configs/bccd_centernet_triplets_r18.yaml).
    "cornernet_r18": {"name": "cornernet", "backbone": {"depth": 18}, "head": {"channels": 64}},
    "centernet_triplets_r18": {"name": "centernet_triplets", "backbone": {"depth": 18}, "head": {"channels": 64}},
    # CornerNet-Lite on their own hourglasses at half the papers' width
    # (configs/bccd_cornernet_squeeze.yaml, configs/bccd_cornernet_saccade.yaml).
    "cornernet_squeeze": {
        "name": "cornernet_squeeze",
        "backbone": {"channels": [128, 128, 192, 192, 256], "stem_channels": 64, "out_channels": 128},
        "head": {"channels": 128, "pool_channels": 64},
    },
    "cornernet_saccade": {
        "name": "cornernet_saccade",
        "backbone": {"channels": [128, 192, 192, 256], "stem_channels": 64, "out_channels": 128},
        "head": {"channels": 128, "pool_channels": 64, "attention_channels": 128},
        "postprocess": {"k_max": 12},
    },
}
# Settings beyond the detector that an entry's paper trains with.
# Saccade trains on 256-px windows around objects (the paper's 255-px crops; its BCCD config),
# 2.6x cheaper per step than the race's 416-px canvas, and is scored like every entry on the
# 416-px letterboxed split (run_ours), which its two steps downsize and zoom into.
ENTRY_OVERRIDES = {"cornernet_saccade": ["data.augment.object_crop.enabled=true", "data.image_size=256"]}
OURS = tuple(DETECTORS)  # every entry races by default
ENTRIES = (*PEERS, *OURS)
TRICKS = {  # --ablate: the training tricks of issue 16, each as the overrides that turn it on
    # tau 100: the default 2000 updates barely averages in the few hundred steps of a race.
    "ema": ["training.ema.enabled=true", "training.ema.tau=100"],
    # Sizes around the race's 416 whose mean pixel count is the canvas's: the same cost per step.
    "multiscale": ["data.multiscale.enabled=true", "data.multiscale.sizes=[320,352,384,416,448,480,512]"],
    "mixup": ["data.mixup.enabled=true"],
    "label_smoothing": ["training.label_smoothing=0.1"],
    # The race's schedule is constant; with the time budget a cosine decays over training seconds.
    "budget_cosine": ["training.schedule.kind=cosine"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="bccd", help=f"a preset ({', '.join(PRESETS)}) or a root with annotations/instances_{{train,val[,test]}}.json and images/"
    )
    parser.add_argument("--datasets", help="the folder holding the presets (default $ANCHORLESS_DATASETS, else ../shared/datasets)")
    parser.add_argument(
        "--cache",
        default=str(SHARD_CACHE),
        help="shards are written here once per source and reused (default $ANCHORLESS_BENCH_CACHE, else workspace/bench/shards)",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="training-time budget of each run")
    parser.add_argument("--image-size", type=int, default=416)
    parser.add_argument("--seeds", type=int, default=1, help="runs per entry (training.seed 0..N-1); mean and spread reported")
    parser.add_argument("--only", nargs="+", choices=ENTRIES, help="race only these entries")
    parser.add_argument("--workdir", help="training runs go here (default: a new temporary directory)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[NAME:]key.path=value",
        help="change the recipe of one entry or ablation row (NAME:) or of all, e.g. onenet_r18:detector.head.num_heads=2; "
        "the peers read data and training fields. Published figures use none.",
    )
    parser.add_argument(
        "--ablate", nargs="*", choices=TRICKS, metavar="TRICK", help=f"one-seed rows with each trick on ({', '.join(TRICKS)}; default all)"
    )
    parser.add_argument("--ablate-on", nargs="+", choices=ENTRIES, metavar="NAME", help="entries to ablate (default: ours among those racing)")
    return parser.parse_args(argv)


def overrides_for(row: str, overrides: list[str]) -> list[str]:
    """The overrides of one row: its trick's (an ``ENTRY+TRICK`` row), then the ``--set`` values
    that are unprefixed or prefixed with its entry or its own name, in the order given."""
    entry, _, trick = row.partition("+")
    chosen = list(TRICKS[trick]) if trick else []
    for override in overrides:
        target, sep, rest = override.partition(":")
        if not sep or "=" in target:  # no prefix (a value may contain ':')
            chosen.append(override)
        elif target in (entry, row):
            chosen.append(rest)
        elif target.partition("+")[0] not in ENTRIES or target.partition("+")[2] not in ("", *TRICKS):
            raise ValueError(f"--set {override}: {target!r} is not an entry ({', '.join(ENTRIES)}) nor ENTRY+TRICK ({', '.join(TRICKS)})")
    return chosen


def race_rows(names: list[str], ablate: list[str], ablate_on: list[str]) -> list[str]:
    """Every row in the order of a seed-0 round: each entry, then its ablation rows."""
    return [row for name in names for row in (name, *(f"{name}+{trick}" for trick in ablate if name in ablate_on))]


def experiment_config(row: str, data: ShardedData, workdir: Path, args: argparse.Namespace, seed: int = 0):
    """The common recipe as a platform config for ``row`` (an entry or ``ENTRY+TRICK``); the
    peers read its data, optimizer and training fields too."""
    from anchorless.platform.config import apply_overrides, build_config

    entry = row.partition("+")[0]
    raw = {
        "name": f"bench-{data.name}-{row.replace('+', '-')}",
        "workspace": str(workdir / "workspace"),
        "data": {"train": str(data.shards["train"]), "val": str(data.shards["val"]), "image_size": args.image_size, "batch_size": 4, "max_boxes": 100},
        "detector": {**copy.deepcopy(DETECTORS.get(entry, DETECTORS["fcos_r18"])), "num_classes": len(data.classes)},
        "training": {
            "epochs": 10_000,  # the budget stops it
            "num_workers": 2,
            "cpus_per_worker": 1,
            "time_budget_minutes": args.minutes,
            "optimizer": {"name": "adamw", "lr": 5e-4, "weight_decay": 1e-4},
            "schedule": {"kind": "constant", "warmup_steps": 100, "warmup_factor": 0.01},
            "grad_clip": 1.0,
            # Ours train with the platform's CPU bf16 (autocast forward, float32 weights and losses;
            # ~1.9x the steps here); each peer row names its own precision.
            "precision": PEERS.get(entry, "bf16"),
            "checkpoint": {"every_epochs": 10_000},
        },
        "evaluation": {"every_epochs": 10_000},  # scored once, at the stop, on val; the scored split is scored below
        "tracking": {"experiment": f"bench-{data.name}", "registered_model": None, "tracking_uri": None},
    }
    overrides = [f"training.seed={seed}", *ENTRY_OVERRIDES.get(entry, []), *overrides_for(row, args.overrides)]
    return build_config(apply_overrides(raw, overrides), source=f"{row} recipe")


def refusal(entry: str, cfg) -> str | None:
    """Why ``entry`` cannot train as ``cfg`` says (a trick it lacks), or None."""
    if not cfg.training.label_smoothing:
        return None
    if entry in PEERS:
        return "torchvision's FCOS loss takes no label smoothing"
    from anchorless.detectors import build_detector
    from anchorless.platform.config import ConfigError
    from anchorless.platform.training.tricks import apply_label_smoothing

    try:
        apply_label_smoothing(build_detector(cfg.detector), cfg.training.label_smoothing)
    except ConfigError as exc:
        return str(exc)
    return None


def run_ours(cfg, data: ShardedData, image_size: int) -> dict:
    """Train ``cfg`` through the platform, then score its export on ``image_size``-px inputs
    (the race's, whatever size the entry trained at)."""
    from anchorless.platform.config import apply_overrides, build_config
    from anchorless.platform.models.loading import load_model
    from anchorless.platform.training.driver import train

    summary = train(cfg, restart=True, progress=True)
    model, _ = load_model(summary["export"])
    model.eval()
    scoring = build_config(apply_overrides(cfg.to_dict(), [f"data.image_size={image_size}"]), source=cfg.name)
    with contextlib.redirect_stdout(io.StringIO()):
        scores = score_on_split(model.predict, data.shards[data.scored], scoring)
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


def set_input_size(model: torch.nn.Module, size: int) -> None:
    """Keep torchvision's resize the identity for square ``size`` inputs (multi-scale steps)."""
    model.transform.min_size, model.transform.max_size = (size,), size


def run_peer(cfg, data: ShardedData, minutes: float) -> dict:
    """torchvision FCOS-R18 trained by a plain loop until ``minutes`` of training time, with the
    tricks the config turns on that apply to it: the schedule over the budget's seconds,
    ``training.ema``, ``data.multiscale`` and ``data.mixup`` (label smoothing is refused before)."""
    from tqdm import tqdm

    from anchorless.platform.data.pipeline import multiscale_size, resize_batch, to_model_inputs
    from anchorless.platform.training.engine import WarmupSchedule, set_schedule_clock, training_autocast
    from anchorless.platform.training.tricks import WeightEma

    training, multiscale = cfg.training, cfg.data.multiscale
    torch.set_num_threads(2)
    torch.manual_seed(training.seed)
    model = torchvision_fcos(cfg.detector["num_classes"], cfg.data.image_size)
    opt = training.optimizer
    if opt.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    budget_s, spent, steps, epoch = minutes * 60.0, 0.0, 0, 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule.from_config(training.schedule, 10**9, budget_s))
    ema = WeightEma(model, training.ema) if training.ema.enabled else None
    peer_cfg = cfg.model_copy(deep=True)
    peer_cfg.data.batch_size = cfg.data.batch_size * training.num_workers  # one process takes the global batch
    batches = ShardBatches(data.shards["train"], peer_cfg)
    forward_precision = training_autocast(training, torch.device("cpu"))
    bar = tqdm(total=round(budget_s), unit="s", desc=f"torchvision FCOS-R18 {training.precision} (training s)")
    model.train()
    while spent < budget_s:
        batches.set_epoch(epoch)  # a fresh loader per epoch so its worker sees the new order
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=1, prefetch_factor=2)
        tick = time.perf_counter()
        for batch in loader:
            images, targets, _ = to_model_inputs(batch)
            if multiscale.enabled:  # the step's size, drawn as the platform's worker draws it
                size = multiscale_size(multiscale.sizes, seed=training.seed, step=steps + 1)
                images, targets = resize_batch(images, targets, size)
                set_input_size(model, size)
            with forward_precision:
                losses = model(list(images), targets)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            if training.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
            optimizer.step()
            scheduler.step()
            steps += 1
            if ema is not None:
                ema.update(model)
            now = time.perf_counter()
            spent, tick = spent + now - tick, now
            set_schedule_clock(scheduler, spent)
            bar.update(round(spent) - bar.n)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            if spent >= budget_s:
                break
        epoch += 1
    bar.close()
    final = ema.module if ema is not None else model
    set_input_size(final, cfg.data.image_size)
    final.eval()

    def predict(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return final(list(images))

    with contextlib.redirect_stdout(io.StringIO()):
        scores = score_on_split(predict, data.shards[data.scored], cfg)
    return {**scores, "steps": steps, "epochs": round(steps / len(batches), 2)}


def summarise(runs: list[dict]) -> dict:
    """Means over seeds (AP, AP50, AP75, duplicate rate, steps, epochs), spreads and per-seed values of AP and AP50."""
    summary: dict = {}
    for key in ("AP", "AP50", "AP75", "duplicate_rate", "steps", "epochs"):
        values = [float(run[key]) for run in runs]
        summary[key] = round(statistics.fmean(values), 4)
        if key in ("AP", "AP50"):
            summary[f"{key}_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
            summary[f"{key}_seeds"] = [round(value, 4) for value in values]
    return summary


def headline(results: dict[str, dict]) -> dict:
    """The stronger peer row (the higher mean AP of the peers' own rows, not their ablations) and
    every row's mean AP as a multiple of its AP (None while that AP is 0); empty when no peer raced."""
    peers = {name: results[name]["AP"] for name in PEERS if name in results}
    if not peers:
        return {}
    peer = max(peers, key=peers.__getitem__)
    ratios = {name: round(r["AP"] / peers[peer], 3) if peers[peer] > 0 else None for name, r in results.items()}
    return {"peer": peer, "peer_AP": peers[peer], "AP_ratio": ratios}


def print_table(title: str, results: dict[str, dict], head: dict, skipped: dict[str, str]) -> None:
    ratios = head.get("AP_ratio", {})
    width = max(len(name) for name in results) if results else 0
    print(f"\n{title}")
    print(f"{'':<{width}} {'AP':>15} {'AP50':>15} {'AP75':>7} {'dup':>6} {'steps':>6} {'epochs':>7} {'x peer':>7}  AP per seed")
    for name, r in results.items():
        ratio = f"{ratios[name]:>7.2f}" if ratios.get(name) is not None else f"{'-':>7}"
        print(
            f"{name:<{width}} {r['AP']:>7.4f} ±{r['AP_sd']:.3f} {r['AP50']:>7.4f} ±{r['AP50_sd']:.3f} {r['AP75']:>7.4f} "
            f"{r['duplicate_rate']:>6.3f} {r['steps']:>6.0f} {r['epochs']:>7.1f} {ratio}  {', '.join(f'{ap:.3f}' for ap in r['AP_seeds'])}"
        )
    if head:
        print(f"x peer: mean AP / the stronger peer's, {head['peer']} (AP {head['peer_AP']:.4f})")
    for row, reason in skipped.items():
        print(f"not run: {row}: {reason}")


def main() -> None:
    args = parse_args()
    start_training_bench()
    names = args.only or list(ENTRIES)
    ablate = list(TRICKS) if args.ablate == [] else (args.ablate or [])
    ablate_on = args.ablate_on or [name for name in names if name in OURS]
    if not set(ablate_on) <= set(names):
        sys.exit(f"--ablate-on {' '.join(sorted(set(ablate_on) - set(names)))}: not racing (name it in --only too)")
    try:
        data = shard_splits(args.data, Path(args.cache), args.datasets)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(str(exc))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"anchorless-bench-{data.name}-"))

    rows = race_rows(names, ablate, ablate_on)
    skipped: dict[str, str] = {}
    for row in rows:  # every recipe checked before hours of training: a bad --set fails now
        try:
            reason = refusal(row.partition("+")[0], experiment_config(row, data, workdir, args))
        except ValueError as exc:
            sys.exit(str(exc))
        if reason and "+" not in row:
            sys.exit(f"{row}: {reason}")
        if reason:
            skipped[row] = reason
    runs: dict[str, list[dict]] = {row: [] for row in rows if row not in skipped}
    loads: dict[str, list] = {row: [] for row in runs}
    for seed in range(args.seeds):  # seed by seed, so slow drift of the machine's load hits every side alike
        for row in runs:
            if "+" in row and seed:  # ablation rows: one seed
                continue
            print(f"\n== {row}, seed {seed}: {args.minutes:g} min of training on {data.name}", flush=True)
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            cfg = experiment_config(row, data, workdir, args, seed=seed)
            entry = row.partition("+")[0]
            result = run_peer(cfg, data, args.minutes) if entry in PEERS else run_ours(cfg, data, args.image_size)
            runs[row].append(result)
            loads[row].append((round(load_before, 1), round(os.getloadavg()[0], 1)))
            print(f"   wall {time.perf_counter() - start:.0f} s, load {loads[row][-1]}: AP {result['AP']:.4f} AP50 {result['AP50']:.4f}", flush=True)
    results = {row: summarise(row_runs) for row, row_runs in runs.items()}
    head = headline(results)
    for row, ratio in head.get("AP_ratio", {}).items():
        results[row]["vs_peer"] = ratio

    from anchorless.platform.data.shards import read_manifest

    scored_images = read_manifest(data.shards[data.scored])["num_images"]
    seeds = f"; mean ± sd over {args.seeds} seeds" if args.seeds > 1 else ""
    ablation = "; ablation rows (ENTRY+TRICK): one seed, seed 0" if ablate else ""
    classes = f"{len(data.classes)} class{'es' if len(data.classes) > 1 else ''}: {', '.join(data.classes)}"
    print_table(
        f"{data.name} {data.scored} split ({scored_images} images, {classes}), {args.image_size} px, "
        f"{args.minutes:g} min of training each, from scratch{seeds}{ablation}",
        results, head, skipped,
    )  # fmt: skip
    print(json.dumps({
        **results, "headline": head, "data": data.name, "split": data.scored, "classes": data.classes,
        "minutes": args.minutes, "seeds": args.seeds, "image_size": args.image_size, "ablate": ablate,
        "skipped": skipped, "load_before_after": loads, "overrides": args.overrides,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
