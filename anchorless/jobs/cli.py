"""The ``anchorless`` command: verbs for what people do, ``key.path=value`` overrides.

Imports of the heavy libraries (torch, ray, mlflow) happen inside each verb so that
``anchorless --help`` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("anchorless")

QUICKSTART_CONFIG = "configs/quickstart.yaml"


def _print_json_line(summary: dict[str, Any]) -> None:
    """The last line of train/evaluate/tune: one JSON object scripts can read."""
    print(json.dumps(summary, default=str), flush=True)


# --- config -----------------------------------------------------------------------------------


def _config_show(args: argparse.Namespace) -> int:
    from anchorless.platform.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no file given: the first word is an override
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    print(cfg.to_yaml(), end="")
    return 0


# --- data -------------------------------------------------------------------------------------


def _data_synth(args: argparse.Namespace) -> int:
    from anchorless.platform.synth import generate_synthetic_coco

    files = generate_synthetic_coco(
        args.out, num_images=args.num_images, size=args.size, seed=args.seed, val_fraction=args.val_fraction
    )
    for split, path in files.items():
        print(f"{split}: {path}")
    print(f"images: {Path(args.out) / 'images'}")
    return 0


def _data_shard(args: argparse.Namespace) -> int:
    from anchorless.platform.shards import format_manifest_summary, write_shards

    manifest = write_shards(
        args.annotations, args.images, args.out, target_shard_mb=args.shard_mb, workers=args.workers
    )
    print(format_manifest_summary(manifest, args.out))
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from anchorless.platform.inspect import format_inspection, inspect_shards

    out_png = args.out or str(Path(args.shard_dir) / "inspect.png")
    report = inspect_shards(args.shard_dir, out_png, num_samples=args.samples, seed=args.seed)
    print(format_inspection(report))
    print(f"sample grid: {out_png}")
    return 0


# --- train / evaluate / predict ----------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from anchorless.platform.config import load_config
    from anchorless.platform.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, address=args.address, restart=args.restart)
    _print_json_line(summary)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from anchorless.platform.evaluate import evaluate

    summary = evaluate(
        args.model, args.data, batch_size=args.batch_size, out_dir=args.out, address=args.address
    )
    _print_json_line(summary)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from anchorless.platform.predict import predict_images

    out = predict_images(args.model, args.images, args.out, score_threshold=args.score_threshold)
    print(f"detections: {out}")
    return 0


# --- quickstart ---------------------------------------------------------------------------------


def _quickstart(args: argparse.Namespace) -> int:
    """Synthetic data -> shards -> the main training job, all on the embedded default."""
    from anchorless.platform.config import load_config
    from anchorless.platform.shards import format_manifest_summary, write_shards
    from anchorless.platform.synth import generate_synthetic_coco

    cfg = load_config(args.config, args.overrides)
    root = Path(cfg.workspace) / "quickstart"
    synth_dir = root / "synth"
    print(f"[1/3] synthetic data set -> {synth_dir}", flush=True)
    files = generate_synthetic_coco(synth_dir, num_images=args.num_images, size=args.size, seed=args.seed)
    print("[2/3] sharding", flush=True)
    for split, annotations in files.items():
        shard_dir = Path(getattr(cfg.data, split) or root / "shards" / split)
        manifest = write_shards(annotations, synth_dir / "images", shard_dir)
        print(format_manifest_summary(manifest, shard_dir))
    print(f"[3/3] training {cfg.detector['name']} ({cfg.training.num_workers} Ray Train workers, DeepSpeed)", flush=True)
    from anchorless.platform.train import train

    summary = train(cfg, restart=True)
    uri = summary.get("tracking_uri")
    if uri and uri.startswith("sqlite:///"):
        print(f"look at the run: mlflow ui --backend-store-uri {uri}")
    _print_json_line(summary)
    return 0


# --- parser -------------------------------------------------------------------------------------


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="override any config field, e.g. training.epochs=5 detector.assigner.cost_giou=3",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anchorless",
        description="Train anchor-free, NMS-free detectors on Ray: data, train, evaluate, tune, promote.",
        epilog="Run `anchorless VERB --help` for the options of each verb.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    quick = verbs.add_parser(
        "quickstart", help="synthetic data -> shards -> train OneNet on a local Ray, track in a local MLflow"
    )
    quick.add_argument("--config", default=QUICKSTART_CONFIG, help=f"training config (default {QUICKSTART_CONFIG})")
    quick.add_argument("--num-images", type=int, default=480, help="synthetic images in all (default 480)")
    quick.add_argument("--size", type=int, default=192, help="synthetic image side in pixels (default 192)")
    quick.add_argument("--seed", type=int, default=0)
    _add_overrides(quick)
    quick.set_defaults(run=_quickstart)

    config = verbs.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the fully resolved config")
    show.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    _add_overrides(show)
    show.set_defaults(run=_config_show)

    data = verbs.add_parser("data", help="synthesise, shard and inspect data").add_subparsers(
        dest="action", required=True
    )
    synth = data.add_parser("synth", help="write a synthetic COCO data set of shapes")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--num-images", type=int, default=200)
    synth.add_argument("--size", type=int, default=192, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--val-fraction", type=float, default=0.2)
    synth.set_defaults(run=_data_synth)

    shard = data.add_parser("shard", help="validate a COCO data set and write Parquet shards + manifest.json")
    shard.add_argument("--annotations", required=True, help="COCO instances JSON")
    shard.add_argument("--images", required=True, help="image root the JSON's file_name entries are relative to")
    shard.add_argument("--out", required=True, help="shard directory (local path or s3://...)")
    shard.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB (default 256)")
    shard.add_argument("--workers", type=int, default=None, help="parallel writers (default: CPU count)")
    shard.set_defaults(run=_data_shard)

    inspect = data.add_parser("inspect", help="counts, histograms and a grid of sample images with boxes")
    inspect.add_argument("shard_dir")
    inspect.add_argument("--out", help="PNG path of the sample grid (default SHARD_DIR/inspect.png)")
    inspect.add_argument("--samples", type=int, default=16)
    inspect.add_argument("--seed", type=int, default=0)
    inspect.set_defaults(run=_data_inspect)

    train = verbs.add_parser("train", help="train a detector with Ray Train + DeepSpeed, tracked in MLflow")
    train.add_argument("config", help="YAML experiment config")
    _add_overrides(train)
    train.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")
    train.add_argument("--restart", action="store_true", help="start fresh instead of resuming a run of the same name")
    train.set_defaults(run=_train)

    evaluate = verbs.add_parser("evaluate", help="score a model on shards with pycocotools")
    evaluate.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, runs:/..., or an export .pt")
    evaluate.add_argument("--data", required=True, help="shard directory")
    evaluate.add_argument("--out", default=None, help="directory for the COCO results JSON and the summary")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")
    evaluate.set_defaults(run=_evaluate)

    predict = verbs.add_parser("predict", help="detect objects in images; writes JSON and drawn images")
    predict.add_argument("--model", required=True, help="model URI or export .pt")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", required=True, help="output directory")
    predict.add_argument("--score-threshold", type=float, default=0.3)
    predict.set_defaults(run=_predict)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )
    # Ray and DeepSpeed are chatty at INFO; a user wants our progress, not theirs.
    for name in ("ray", "deepspeed", "DeepSpeed", "mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: list[str] | None = None) -> int:
    from anchorless.platform.errors import AnchorlessError

    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except AnchorlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
