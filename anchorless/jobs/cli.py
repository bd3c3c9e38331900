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

# `evaluate --executor` and `models promote --executor`: offline.EXECUTORS, without importing torch here.
EXECUTOR_CHOICES = ("auto", "ray", "process")
EXECUTOR_HELP = (
    "where the model runs: ray (actors fed by Ray Data), process (here, batch after batch) or auto "
    "(default: here when no Ray cluster is given and the shards hold a few hundred images at most)"
)

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
    from anchorless.platform.data.synth import generate_synthetic_coco

    files = generate_synthetic_coco(
        args.out, num_images=args.num_images, size=args.size, seed=args.seed, val_fraction=args.val_fraction
    )
    for split, path in files.items():
        print(f"{split}: {path}")
    print(f"images: {Path(args.out) / 'images'}")
    return 0


def _data_shard(args: argparse.Namespace) -> int:
    from functools import partial

    from anchorless.platform.data.shards import format_manifest_summary, shard_dataset

    needed = {"coco": ("annotations", "images"), "voc": ("annotations", "images"), "yolo": ("labels", "images", "names")}
    missing = [f"--{name}" for name in needed[args.format] if getattr(args, name) is None]
    if missing:
        raise SystemExit(f"anchorless data shard --format {args.format}: needs {' and '.join(missing)}")
    unused = {"coco": ("labels", "names", "split"), "voc": ("labels",), "yolo": ("annotations", "split")}[args.format]
    given = [f"--{name}" for name in unused if getattr(args, name) is not None]
    if given:
        raise SystemExit(f"anchorless data shard --format {args.format}: {', '.join(given)} belongs to another format")
    if args.format == "coco":
        from anchorless.platform.data.coco import load_coco

        load = partial(load_coco, args.annotations, args.images)
    elif args.format == "voc":
        from anchorless.platform.data.voc import load_voc

        load = partial(load_voc, args.annotations, args.images, split=args.split, names=args.names, progress=True)
    else:
        from anchorless.platform.data.yolo import load_yolo

        load = partial(load_yolo, args.labels, args.images, args.names, progress=True)
    limits = {} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels}
    manifest = shard_dataset(
        load, args.out, target_shard_mb=args.shard_mb, workers=args.workers, skip_bad_images=args.skip_bad_images, **limits
    )
    print(format_manifest_summary(manifest, args.out))
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from anchorless.platform.data.inspect import format_inspection, inspect_shards

    out_png = args.out or str(Path(args.shard_dir) / "inspect.png")
    report = inspect_shards(args.shard_dir, out_png, num_samples=args.samples, seed=args.seed)
    print(format_inspection(report))
    print(f"sample grid: {out_png}")
    return 0


# --- train / evaluate / predict ----------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from anchorless.platform.config import load_config
    from anchorless.platform.training.driver import train

    cfg = load_config(args.config, args.overrides)
    _sign_in_to_local_registry(cfg.tracking.tracking_uri, args)
    summary = train(cfg, address=args.address, restart=args.restart)
    _print_json_line(summary)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from anchorless.platform.evaluation.offline import evaluate

    summary = evaluate(
        args.model, args.data, batch_size=args.batch_size, out_dir=args.out, address=args.address, executor=args.executor
    )
    _print_json_line(summary)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from anchorless.platform.models.predict import predict_images

    out = predict_images(args.model, args.images, args.out, score_threshold=args.score_threshold)
    print(f"detections: {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from anchorless.platform.models.onnx import export_model

    summary = export_model(
        args.model, args.out, format=args.format, tracking_uri=_tracking_uri(args), check_image_paths=args.check_images
    )
    _print_json_line(summary)
    return 0


# --- tune / models -----------------------------------------------------------------------------


def _tune(args: argparse.Namespace) -> int:
    from anchorless.platform.tuning.runner import tune_campaign

    summary = tune_campaign(args.campaign, args.overrides, address=args.address, restart=args.restart)
    _print_json_line(summary)
    return 0


def _tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else a running local cluster's server, else the workspace store."""
    from anchorless.platform.tracking.store import resolve_tracking_uri

    if args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri(args.tracking_uri, args.workspace)
    from anchorless.cluster.local import default_state_dir, read_state

    state = read_state(args.cluster_dir or default_state_dir())
    if state and state.get("mlflow_tracking_uri"):
        return state["mlflow_tracking_uri"]
    return resolve_tracking_uri(None, args.workspace)


def _sign_in_to_local_registry(uri: str | None, args: argparse.Namespace, *, account: str = "user") -> dict[str, Any] | None:
    """When ``uri`` is the local cluster's tracking server, talk to it as ``account`` (``user``,
    or ``admin``: the account that moves aliases) with the credentials `cluster up` generated.

    As with the Ray token, the user's own MLFLOW_TRACKING_USERNAME/PASSWORD win, except for the
    admin account: promotion moves the alias, which only that account may do. Returns the
    cluster's state when ``uri`` is its server, else None (nothing is sent anywhere else).
    """
    from anchorless.cluster.local import default_state_dir, read_credentials, read_state

    state = read_state(getattr(args, "cluster_dir", None) or default_state_dir())
    if not uri or state is None or uri.rstrip("/") != state.get("mlflow_tracking_uri"):
        return None
    files = state.get("mlflow", {}).get("credentials")
    if files and (account == "admin" or not os.environ.get("MLFLOW_TRACKING_USERNAME")):
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = read_credentials(files[account])
    return state


def _registry_signing_key(uri: str, state: dict[str, Any] | None) -> bytes:
    """$ANCHORLESS_REGISTRY_KEY, the local cluster's key file for its server, or the store's own."""
    from anchorless.platform.registry.signing import registry_signing_key

    key_file = (state or {}).get("registry_signing_key_file")
    return registry_signing_key(uri, key_file=key_file)


def _registry_client(args: argparse.Namespace):
    from mlflow import MlflowClient

    from anchorless.platform.tracking.store import check_reachable

    uri = _tracking_uri(args)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _models_list(args: argparse.Namespace) -> int:
    from anchorless.platform.registry.versions import format_model_rows, list_models

    print(format_model_rows(list_models(_registry_client(args), args.name)))
    return 0


def _models_promote(args: argparse.Namespace) -> int:
    from anchorless.platform.registry.promotion import Guard, PromotionPolicy, evaluate_version, promote

    policy = PromotionPolicy(metric=args.metric, mode=args.mode, margin=args.margin)
    if args.no_guards:
        policy.guards = {}
    for spec in args.guard or []:
        metric, _, rest = spec.partition(":")
        mode, _, tolerance = rest.partition(":")
        if mode not in ("max", "min"):
            raise SystemExit(f"--guard {spec!r}: expected METRIC:max|min[:TOLERANCE]")
        policy.guards[metric] = Guard(mode=mode, tolerance=float(tolerance or 0.0))
    state = _sign_in_to_local_registry(_tracking_uri(args), args, account="admin")
    client = _registry_client(args)
    uri = client._tracking_client.tracking_uri
    key = _registry_signing_key(uri, state)

    def evaluate_fn(model_uri: str, shard_dir: str) -> dict[str, float]:
        os.environ["MLFLOW_TRACKING_URI"] = uri  # so models:/ URIs resolve against this store
        return evaluate_version(model_uri, shard_dir, batch_size=args.batch_size, address=args.address, executor=args.executor)

    decision = promote(
        client, args.name, args.version, args.data, alias=args.to, policy=policy,
        force=args.force, reason=args.reason, evaluate_fn=evaluate_fn, signing_key=key,
    )
    print(decision.table())
    _print_json_line(decision.summary())
    return 0 if decision.promoted else 1


def _models_rollback(args: argparse.Namespace) -> int:
    from anchorless.platform.registry.history import rollback

    state = _sign_in_to_local_registry(_tracking_uri(args), args, account="admin")
    client = _registry_client(args)
    key = _registry_signing_key(client._tracking_client.tracking_uri, state)
    before, after = rollback(client, args.name, alias=args.to, key=key)
    print(f"{args.name}@{args.to}: v{before} -> v{after}")
    return 0


def _models_serve(args: argparse.Namespace) -> int:
    from anchorless.platform.models.serving import registry_uri, serve

    registry_uri(args.model)  # a malformed reference is refused before MLflow starts
    return serve(
        args.model, tracking_uri=_tracking_uri(args), format=args.format, host=args.host, port=args.port, workers=args.workers
    )


# --- cluster / submit / jobs ------------------------------------------------------------------


def _cluster_up(args: argparse.Namespace) -> int:
    from anchorless.cluster.local import cluster_up, format_cluster

    if not args.local:
        raise SystemExit(
            "only --local is brought up from here; for real clusters render a template: "
            "anchorless cluster template --help"
        )
    state = cluster_up(args.cluster_dir, num_cpus=args.num_cpus, object_store=args.object_store, s3_port=args.s3_port)
    print(format_cluster(state))
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    from anchorless.cluster.local import cluster_status, format_status

    status = cluster_status(args.cluster_dir)
    print(format_status(status))
    return 0 if status.get("running") else 1


def _cluster_down(args: argparse.Namespace) -> int:
    from anchorless.cluster.local import cluster_down

    result = cluster_down(args.cluster_dir)
    print("stopped: " + (", ".join(result["stopped"]) or "nothing was running"))
    return 0


def _cluster_template(args: argparse.Namespace) -> int:
    from anchorless.cluster.templates import template_names, template_parameters, write_template

    if args.name is None:
        for name in template_names():
            params = ", ".join(f"{k}={'<required>' if v is None else v}" for k, v in template_parameters(name).items())
            print(f"{name}: {params}")
        return 0
    values: dict[str, Any] = {}
    for item in args.values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected name=value")
        values[key] = value
    if args.override:
        values["overrides"] = list(args.override)
    out = write_template(args.name, args.out, **values)
    print(f"wrote {out}")
    return 0


def _submit_options_among_job_args(args: argparse.Namespace) -> None:
    """``submit tune x.yaml --follow``: submit's own options may also follow the command's
    arguments (argparse hands everything after KIND to the job). A job never needs an
    ``--address`` of its own: it runs on the cluster it was submitted to."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--follow", action="store_true")
    own.add_argument("--address", default=None)
    own.add_argument("--cluster-dir", default=None)
    found, args.args = own.parse_known_args(args.args)
    args.follow = args.follow or found.follow
    args.address = found.address or args.address
    args.cluster_dir = found.cluster_dir or args.cluster_dir


def _submit(args: argparse.Namespace) -> int:
    from anchorless.jobs.submit import job_logs, job_status, submit

    _submit_options_among_job_args(args)
    job_id = submit(args.kind, args.args, address=args.address, state_dir=args.cluster_dir)
    print(job_id, flush=True)
    if args.follow:
        job_logs(job_id, follow=True, address=args.address, state_dir=args.cluster_dir)
        status = job_status(job_id, address=args.address, state_dir=args.cluster_dir)
        print(f"job {job_id}: {status['status']}")
        return 0 if status["status"] == "SUCCEEDED" else 1
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from anchorless.jobs import submit as jobs

    where = {"address": args.address, "state_dir": args.cluster_dir}
    if args.action == "list":
        print(jobs.format_jobs(jobs.list_jobs(**where)))
    elif args.action == "status":
        status = jobs.job_status(args.job_id, **where)
        print(json.dumps(status, default=str))
        return 0 if status["status"] != "FAILED" else 1
    elif args.action == "logs":
        text = jobs.job_logs(args.job_id, follow=args.follow, **where)
        if not args.follow:
            print(text, end="")
    elif args.action == "stop":
        stopped = jobs.stop_job(args.job_id, **where)
        print("stopping" if stopped else "the job had already ended")
    return 0


# --- quickstart ---------------------------------------------------------------------------------


def _quickstart(args: argparse.Namespace) -> int:
    """Synthetic data -> shards -> the main training job, all on the embedded default."""
    from anchorless.platform.config import load_config
    from anchorless.platform.data.shards import format_manifest_summary, write_shards
    from anchorless.platform.data.synth import generate_synthetic_coco

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
    from anchorless.platform.training.driver import train

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
    quick.add_argument("--seed", type=int, default=0, help="seed of the synthetic data set (default 0)")
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
    synth.add_argument("--num-images", type=int, default=200, help="images in all splits (default 200)")
    synth.add_argument("--size", type=int, default=192, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0, help="same seed, byte-identical data set (default 0)")
    synth.add_argument("--val-fraction", type=float, default=0.2, help="share of images in the val split (default 0.2)")
    synth.set_defaults(run=_data_synth)

    shard = data.add_parser(
        "shard",
        help="validate a COCO, Pascal VOC or YOLO data set and write Parquet shards + manifest.json",
        description="Validate a data set and write it as Parquet shards plus manifest.json. The three formats "
        "give the same shards for the same data. Bad images (missing, unreadable, truncated, a size other "
        "than the annotations say) are all listed in one error, unless --skip-bad-images leaves them out "
        "(they are then listed in the manifest).",
        epilog="examples:\n"
        "  anchorless data shard --annotations instances_train.json --images images/ --out shards/train\n"
        "  anchorless data shard --format voc --annotations Annotations/ --images JPEGImages/ "
        "--split ImageSets/Main/train.txt --out shards/train\n"
        "  anchorless data shard --format yolo --labels labels/train --images images/train "
        "--names data.yaml --out s3://bucket/shards/train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shard.add_argument("--format", choices=("coco", "voc", "yolo"), default="coco", help="the source's format (default coco)")
    shard.add_argument("--annotations", help="coco: the instances JSON; voc: the folder of XML files (one per image)")
    shard.add_argument("--images", required=True, help="image folder (coco: the root the JSON's file_name entries are relative to)")
    shard.add_argument("--labels", help="yolo: the folder of label .txt files, laid out like --images")
    shard.add_argument(
        "--names", help="yolo (required), voc (optional): class names, a data.yaml or a file of one name a line; "
        "voc without it: every class named in the XML folder, sorted",
    )  # fmt: skip
    shard.add_argument("--split", help="voc: a file of image stems, one a line (e.g. ImageSets/Main/train.txt); default every XML")
    shard.add_argument("--out", required=True, help="shard directory (local path or s3://bucket/prefix; S3 endpoint from $AWS_ENDPOINT_URL)")
    shard.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB (default 256)")
    shard.add_argument("--workers", type=int, default=None, help="parallel writers (default: CPU count)")
    shard.add_argument(
        "--skip-bad-images", action="store_true",
        help="leave out images that are missing, unreadable or truncated, listing them in the manifest (default: fail, listing them all)",
    )  # fmt: skip
    shard.add_argument(
        "--max-image-pixels", type=int, default=None,
        help="an image whose header declares more pixels is a bad image, refused before decoding "
        "(a decompression bomb; default 100 million, i.e. 10,000 x 10,000)",
    )  # fmt: skip
    shard.set_defaults(run=_data_shard)

    inspect = data.add_parser("inspect", help="counts, histograms and a grid of sample images with boxes")
    inspect.add_argument("shard_dir", help="shard directory written by `anchorless data shard`")
    inspect.add_argument("--out", help="PNG path of the sample grid (default SHARD_DIR/inspect.png)")
    inspect.add_argument("--samples", type=int, default=16, help="images in the grid (default 16)")
    inspect.add_argument("--seed", type=int, default=0, help="which images are sampled (default 0)")
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
    evaluate.add_argument("--batch-size", type=int, default=8, help="images per inference batch (default 8)")
    evaluate.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")
    evaluate.add_argument("--executor", choices=EXECUTOR_CHOICES, default="auto", help=EXECUTOR_HELP)
    evaluate.set_defaults(run=_evaluate)

    predict = verbs.add_parser("predict", help="detect objects in images; writes JSON and drawn images")
    predict.add_argument("--model", required=True, help="model URI or export .pt")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", required=True, help="output directory")
    predict.add_argument("--score-threshold", type=float, default=0.3, help="keep detections scoring at least this (default 0.3)")
    predict.set_defaults(run=_predict)

    export = verbs.add_parser(
        "export",
        help="export a model as one ONNX graph (image tensor to detections), or OpenVINO IR, checked against torch",
        description=(
            "The graph takes float images (N, 3, S, S) in 0-255 letterboxed to the model's size S and returns "
            "boxes (N, K, 4), scores (N, K), labels (N, K), padded with score 0. --format openvino also converts "
            "it to OpenVINO IR (model.xml + model.bin), checked the same way. A registered version "
            "(models:/NAME/VERSION or models:/NAME@ALIAS) also gets the files beside its pyfunc model."
        ),
    )
    export.add_argument("--model", required=True, help="an export .pt, runs:/RUN/model, models:/NAME/VERSION or models:/NAME@ALIAS")
    export.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                        help="onnx (default): model.onnx; openvino: model.onnx and, converted from it, model.xml + model.bin")
    export.add_argument("--out", required=True, help="output directory (gets model.onnx, and model.xml + model.bin for openvino)")
    export.add_argument("--check-images", nargs="+", default=(), metavar="IMAGE",
                        help="images to check onnxruntime against torch on (default: the model's validation shards)")
    export.add_argument("--tracking-uri", default=None, help="MLflow URI for models:/ and runs:/ (default $MLFLOW_TRACKING_URI or WORKSPACE/mlflow.db)")
    export.add_argument("--workspace", default="workspace", help="workspace holding the embedded MLflow store")
    export.add_argument("--cluster-dir", default=None, help=argparse.SUPPRESS)
    export.set_defaults(run=_export)

    tune = verbs.add_parser("tune", help="run (or resume) a Ray Tune campaign over training configs")
    tune.add_argument("campaign", help="campaign YAML (base config + search space)")
    _add_overrides(tune)
    tune.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")
    tune.add_argument("--restart", action="store_true", help="start the campaign afresh instead of resuming it")
    tune.set_defaults(run=_tune)

    models = verbs.add_parser("models", help="the model registry: list, promote, rollback, serve").add_subparsers(
        dest="action", required=True
    )

    def registry_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI, a running local cluster's server, or WORKSPACE/mlflow.db)")
        sub.add_argument("--workspace", default="workspace", help="workspace holding the embedded MLflow store")
        sub.add_argument("--cluster-dir", default=None, help=argparse.SUPPRESS)

    listing = models.add_parser("list", help="registered models, versions, aliases, key metrics, source run")
    listing.add_argument("name", nargs="?", help="one registered model (default: all)")
    registry_options(listing)
    listing.set_defaults(run=_models_list)

    promote = models.add_parser(
        "promote",
        help="evaluate candidate and champion on the same shards; move the alias if the candidate wins",
        description="Exit code 0 when promoted, 1 when refused. The gate table is printed either way.",
    )
    promote.add_argument("name", help="registered model name")
    promote.add_argument("version", help="candidate version number")
    promote.add_argument("--to", default="champion", help="alias to move (default champion)")
    promote.add_argument("--data", required=True, help="evaluation shard directory (both models are scored on it)")
    promote.add_argument("--metric", default="AP", help="gate metric (default AP)")
    promote.add_argument("--mode", choices=("max", "min"), default="max", help="max: higher gate metric wins (default)")
    promote.add_argument("--margin", type=float, default=0.0, help="the candidate must beat the champion by more than this")
    promote.add_argument("--guard", action="append", metavar="METRIC:max|min[:TOL]", help="add/replace a no-regression guard (defaults: AP50, duplicate_rate, latency_ms)")
    promote.add_argument("--no-guards", action="store_true", help="drop the default guards")
    promote.add_argument("--force", action="store_true", help="promote even if the gates refuse (needs --reason)")
    promote.add_argument("--reason", default=None, help="why --force; recorded on the version")
    promote.add_argument("--batch-size", type=int, default=8, help="images per inference batch (default 8)")
    promote.add_argument("--address", default=None, help="Ray cluster address for the evaluations")
    promote.add_argument("--executor", choices=EXECUTOR_CHOICES, default="auto", help=EXECUTOR_HELP)
    registry_options(promote)
    promote.set_defaults(run=_models_promote)

    back = models.add_parser("rollback", help="point the alias back at the previous champion")
    back.add_argument("name", help="registered model name")
    back.add_argument("--to", default="champion", help="alias to roll back (default champion)")
    registry_options(back)
    back.set_defaults(run=_models_rollback)

    serve = models.add_parser(
        "serve",
        help="serve a model over HTTP (MLflow's scoring server): base64 images in, detections out",
        description=(
            "POST {\"dataframe_split\": {\"columns\": [\"image\"], \"data\": [[\"<base64 JPEG/PNG bytes>\"]]}} "
            "to http://HOST:PORT/invocations; the answer has one record per detection in the image's pixels "
            "(image_index, category_id, category_name, score, x, y, width, height)."
        ),
    )
    serve.add_argument("model", help="NAME@ALIAS (shapes-onenet@champion), NAME/VERSION, or an MLflow model URI")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    serve.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    serve.add_argument("--format", choices=("torch", "onnx"), default="torch",
                       help="torch (default): the pyfunc model; onnx: the version's ONNX graph in onnxruntime, "
                       "without torch (add it first with `anchorless export --format onnx`)")
    registry_options(serve)
    serve.set_defaults(run=_models_serve)

    cluster = verbs.add_parser("cluster", help="bring a local cluster up/down; render cluster templates").add_subparsers(
        dest="action", required=True
    )
    up = cluster.add_parser("up", help="start a Ray head (token auth) and an MLflow server on this machine")
    up.add_argument("--local", action="store_true", required=True, help="on this machine (the only kind started from here)")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule (default: cores + 1, so data tasks fit beside training workers)")
    up.add_argument(
        "--object-store", action="store_true",
        help="also start a local S3 server (moto) with the bucket s3://anchorless: MLflow artifacts in s3://anchorless/mlflow, "
        "jobs read shards and write checkpoints there (AWS_ENDPOINT_URL and credentials reach every job; `export` lines printed)",
    )  # fmt: skip
    up.add_argument("--s3-port", type=int, default=None, help="the S3 server's port with --object-store (default: a free one)")
    for sub, text in ((up, None), (cluster.add_parser("status", help="is each service up?"), _cluster_status), (cluster.add_parser("down", help="stop the local cluster"), _cluster_down)):
        sub.add_argument("--cluster-dir", default=None, help="cluster state directory (default $ANCHORLESS_CLUSTER_DIR or workspace/cluster)")
        sub.set_defaults(run=text or _cluster_up)
    template = cluster.add_parser("template", help="render a Ray cluster-launcher or KubeRay template")
    template.add_argument("name", nargs="?", help="template name (omit to list them with their parameters)")
    template.add_argument("values", nargs="*", metavar="param=value", help="template parameters")
    template.add_argument("--override", action="append", help="a training key.path=value override for the job")
    template.add_argument("--out", default=None, help="output YAML path")
    template.set_defaults(run=_cluster_template)

    submit = verbs.add_parser(
        "submit",
        help="submit train/tune/evaluate to a Ray cluster as a job",
        description="Runs `anchorless KIND ARGS...` as a Ray job. submit's own options may come before KIND "
        "or after the command's arguments: `anchorless submit tune campaign.yaml --follow`.",
    )
    submit.add_argument("kind", choices=("train", "tune", "evaluate"), help="the anchorless command the job runs")
    submit.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    submit.add_argument("--address", default=None, help="job server (default $RAY_ADDRESS or the local cluster)")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument("--cluster-dir", default=None, help=argparse.SUPPRESS)
    submit.set_defaults(run=_submit)

    jobs = verbs.add_parser("jobs", help="list, inspect, follow and stop cluster jobs")
    jobs.add_argument("action", choices=("list", "status", "logs", "stop"), help="what to do")
    jobs.add_argument("job_id", nargs="?", help="the job (all but list need one)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jobs.add_argument("--address", default=None, help="job server (default $RAY_ADDRESS or the local cluster)")
    jobs.add_argument("--cluster-dir", default=None, help=argparse.SUPPRESS)
    jobs.set_defaults(run=_jobs)
    return parser


# Verbs that never touch Ray: they should not pay for importing it.
_WITHOUT_RAY = {"config"}


def _configure_logging(verbose: bool, verb: str | None = None) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )
    if verb not in _WITHOUT_RAY:
        # Importing ray sets its logger to INFO (once per process): import it first so
        # the levels below stick.
        import ray  # noqa: F401
    # Ray and DeepSpeed are chatty at INFO; a user wants our progress, not theirs.
    for name in ("ray", "deepspeed", "DeepSpeed", "mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Packaging a job's working_dir warns that .git/.venv are now excluded by default,
    # which is what a job wants.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.DEBUG if verbose else logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _enter_job_directory() -> None:
    """In a job on the local cluster, work where it was submitted from (see anchorless.jobs.submit)."""
    from anchorless.jobs.submit import JOB_CWD_ENV, JobError

    directory = os.environ.get(JOB_CWD_ENV)
    if not directory:
        return
    try:
        os.chdir(directory)
    except OSError as exc:
        raise JobError(f"${JOB_CWD_ENV}={directory}: cannot work there ({exc.strerror})") from None


def _join_local_cluster_with_its_token(args: argparse.Namespace) -> None:
    """`--address` (or $RAY_ADDRESS) naming the cluster `cluster up --local` started: join
    it with its token. Its Ray runs with token auth, and ray.init reads the mode and the
    token from the environment, which the user's shell does not carry."""
    from anchorless.cluster.local import default_state_dir, names_this_cluster, read_state

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address or os.environ.get("RAY_AUTH_MODE"):
        return
    state = read_state(default_state_dir())
    if state is None or not names_this_cluster(state, address):
        return
    args.address = state["ray_address"]  # the dashboard's URL is for jobs; ray.init wants the GCS
    os.environ["RAY_AUTH_MODE"] = "token"
    if not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_TOKEN_PATH"] = state["token_file"]


def _parse_with_overrides_anywhere(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``train CONFIG --restart a.b=1``: argparse ends a ``nargs="*"`` positional at the first
    option and rejects what follows it, so ``key=value`` words after an option are added to
    the command's overrides here (in order); anything else left over is still an error."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(word.startswith("-") or "=" not in word for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    from anchorless.errors import AnchorlessError

    from anchorless.platform.ray_session import keep_local_ray_on_loopback

    parser = build_parser()
    args = _parse_with_overrides_anywhere(parser, argv)
    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")):
        keep_local_ray_on_loopback()  # any Ray this command uses is one it starts: before `import ray`
    _configure_logging(args.verbose, args.verb)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        _enter_job_directory()
        if run in (_train, _evaluate, _tune, _models_promote):
            _join_local_cluster_with_its_token(args)
        if run not in (_models_promote, _models_rollback):  # they sign in as the admin themselves
            uri = _tracking_uri(args) if hasattr(args, "tracking_uri") else os.environ.get("MLFLOW_TRACKING_URI")
            _sign_in_to_local_registry(uri, args)
        return run(args)
    except AnchorlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
