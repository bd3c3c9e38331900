"""Turn a config into a trained, evaluated, tracked and registered model on Ray.

The driver side of training, in the order it happens:

1. :func:`plan_run` checks everything a worker would trip over later (shard
   directories, manifest checksums, class count, steps per epoch) and decides
   whether this is a fresh run or the resumption of one with the same name.
2. :func:`connect_ray` joins ``address`` / ``$RAY_ADDRESS`` or starts a local Ray.
3. The MLflow run is created (or reopened) here on the driver, so worker restarts
   and resumed runs log into the same run; its id is kept in the run directory.
4. :func:`build_trainer` makes the ``TorchTrainer`` running
   :func:`anchorless.platform.worker.train_loop_per_worker` on every worker.
5. The latest checkpoint is exported, logged and registered in MLflow, and a
   one-line summary is returned.

A run lives in ``<workspace>/runs/<run name>/``: Ray Train's checkpoints and state
next to ``run.json`` (MLflow run id), ``config.yaml``, ``deepspeed_config.json``,
``model.pt`` (the export) and ``summary.json``; a run started from another run's
checkpoint (a PBT exploit) keeps its copy of that checkpoint under ``start/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anchorless.platform.config import ConfigError, ExperimentConfig
from anchorless.platform.engine import deepspeed_config, worker_env
from anchorless.platform.errors import AnchorlessError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
EXPORT_FILE = "model.pt"
START_DIR = "start"  # copies of other runs' checkpoints this run was started from
SUMMARY_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "duplicate_rate")
# Test hook, once per run: "kill:RANK:STEP" kills that worker process before that optimizer
# step; "nan:RANK:STEP:TERM" makes that loss term NaN there.
FAULT_ENV = "ANCHORLESS_FAULT"


class TrainingError(AnchorlessError):
    """Training could not finish (non-finite loss, workers failing past max_failures)."""


@dataclass
class RunPlan:
    """What the driver decided before any worker starts."""

    name: str
    run_dir: Path
    train_dir: str
    val_dir: str | None
    manifest: dict[str, Any]
    world_size: int
    micro_steps_per_epoch: int  # batches per rank per epoch
    steps_per_epoch: int  # optimizer steps (micro-steps / grad_accum)
    total_steps: int
    deepspeed_config: dict[str, Any]
    resume_run_id: str | None = None
    finished_summary: dict[str, Any] | None = None
    start_from: Path | None = None  # another run's checkpoint this run continues from


# --- before Ray -----------------------------------------------------------------------------------


def run_name(cfg: ExperimentConfig) -> str:
    name = cfg.tracking.run_name or cfg.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"run name {name!r} (tracking.run_name or name): use letters, digits, '.', '_', '-'")
    return name


def runs_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.workspace).resolve() / "runs"


def _read_shards(shard_dir: str | None, key: str) -> dict[str, Any]:
    from anchorless.platform.errors import DataError
    from anchorless.platform.shards import read_manifest

    if not shard_dir:
        raise ConfigError(f"{key}: no shard directory given (set {key}=PATH, made by `anchorless data shard`)")
    if "://" not in shard_dir and not Path(shard_dir).is_dir():
        raise DataError(f"{shard_dir}: no such shard directory ({key})")
    return read_manifest(shard_dir, verify=True)


def _category_table(manifest: dict[str, Any]) -> list[tuple[int, int, str]]:
    return [(c["label"], c["coco_id"], c["name"]) for c in sorted(manifest["categories"], key=lambda c: c["label"])]


def plan_run(cfg: ExperimentConfig, *, restart: bool = False, start_from: str | os.PathLike[str] | None = None) -> RunPlan:
    """Every check that can fail before a worker starts, each with one clear message.

    With ``start_from`` (another run's checkpoint) this run's own checkpoints will be
    discarded, so they are not checked against the config; the checkpoint must exist
    and have the same ZeRO layout.
    """
    from anchorless.platform.data import steps_per_epoch
    from anchorless.platform.errors import DataError

    name = run_name(cfg)
    manifest = _read_shards(cfg.data.train, "data.train")
    categories = _category_table(manifest)
    num_classes = cfg.detector.get("num_classes")
    if num_classes != len(categories):
        names = ", ".join(category_name for _, _, category_name in categories)
        raise ConfigError(
            f"detector.num_classes is {num_classes} but the train shards ({cfg.data.train}) have "
            f"{len(categories)} categories ({names}); set detector.num_classes={len(categories)}"
        )
    val_dir = cfg.data.val
    if val_dir:
        val_manifest = _read_shards(val_dir, "data.val")
        if _category_table(val_manifest) != categories:
            raise DataError(
                f"{val_dir}/manifest.json: its categories differ from the train shards' ({cfg.data.train}); "
                "shard both splits from the same COCO category table"
            )
    else:
        log.warning("data.val is not set: training without evaluation")

    world_size = cfg.training.num_workers
    micro_steps = steps_per_epoch(manifest["num_images"], world_size, cfg.data.batch_size)
    optimizer_steps = micro_steps // cfg.training.grad_accum
    if optimizer_steps < 1:
        raise ConfigError(
            f"{cfg.data.train} has {manifest['num_images']} images: too few for {world_size} workers x "
            f"data.batch_size={cfg.data.batch_size} x training.grad_accum={cfg.training.grad_accum} per step"
        )
    ds_config = deepspeed_config(cfg.training, batch_size=cfg.data.batch_size, world_size=world_size)

    run_dir = runs_root(cfg) / name
    resume_run_id = finished = None
    source = _check_start_from(cfg, run_dir, start_from) if start_from is not None else None
    if restart and run_dir.exists():
        _remove_run_dir(run_dir)
    elif (run_dir / RUN_FILE).is_file():
        saved = json.loads((run_dir / RUN_FILE).read_text())
        if source is None:
            _check_resumable(cfg, run_dir, saved)
        resume_run_id = saved.get("run_id")
        if source is None and (run_dir / SUMMARY_FILE).is_file():
            summary = json.loads((run_dir / SUMMARY_FILE).read_text())
            # A finished run asked for more epochs continues; otherwise there is nothing to do.
            finished = summary if (summary.get("epoch") or 0) >= cfg.training.epochs else None
    return RunPlan(
        name=name,
        run_dir=run_dir,
        train_dir=_absolute(cfg.data.train),
        val_dir=_absolute(val_dir) if val_dir else None,
        manifest=manifest,
        world_size=world_size,
        micro_steps_per_epoch=micro_steps,
        steps_per_epoch=optimizer_steps,
        total_steps=optimizer_steps * cfg.training.epochs,
        deepspeed_config=ds_config,
        resume_run_id=resume_run_id,
        finished_summary=finished,
        start_from=source,
    )


def _absolute(location: str) -> str:
    # Workers run in their own working directories.
    return location if "://" in location else str(Path(location).resolve())


def _layout_problems(cfg: ExperimentConfig, before: dict[str, Any]) -> list[str]:
    """How the optimizer state's layout in a checkpoint written under ``before`` differs from ``cfg``'s."""
    problems = []
    if cfg.training.zero_stage and before.get("training", {}).get("num_workers") != cfg.training.num_workers:
        problems.append("training.num_workers (ZeRO partitions the optimizer state per worker)")
    if before.get("training", {}).get("zero_stage") != cfg.training.zero_stage:
        problems.append("training.zero_stage")
    return problems


def _check_resumable(cfg: ExperimentConfig, run_dir: Path, saved: dict[str, Any]) -> None:
    """Resuming loads the old weights and optimizer state: the model and their layout must match."""
    before = saved.get("config", {})
    problems = []
    if before.get("detector") != cfg.to_dict()["detector"]:
        problems.append("the detector section")
    problems += _layout_problems(cfg, before)
    if problems:
        raise ConfigError(
            f"run {run_dir.name!r} exists ({run_dir}) with a different {' and '.join(problems)}; "
            "resume it with its own config, pick another run name, or pass --restart to start afresh"
        )


def _check_start_from(cfg: ExperimentConfig, run_dir: Path, start_from: str | os.PathLike[str]) -> Path:
    """The checkpoint another run wrote, checked; its weights must load into this config's model
    (DeepSpeed refuses mismatched shapes itself) with the same optimizer-state layout."""
    from anchorless.platform.engine import CHECKPOINT_SUBDIR

    source = Path(start_from).resolve()
    if not (source / CHECKPOINT_SUBDIR).is_dir() and not _start_copy(run_dir, source).is_dir():
        raise TrainingError(
            f"{source}: no training checkpoint to start run {run_dir.name!r} from (deleted by its own run's "
            "training.checkpoint.keep_best, or not a checkpoint directory)"
        )
    if source.is_relative_to(run_dir):
        raise ConfigError(f"{source}: a checkpoint of run {run_dir.name!r} itself; resume the run instead")
    donor_record = source.parent / RUN_FILE
    if donor_record.is_file():
        problems = _layout_problems(cfg, json.loads(donor_record.read_text()).get("config", {}))
        if problems:
            raise ConfigError(f"{source}: written with a different {' and '.join(problems)} than run {run_dir.name!r}")
    return source


def _start_copy(run_dir: Path, source: Path) -> Path:
    """Where this run keeps its copy of ``source``: named after the run and checkpoint it came from."""
    return run_dir / START_DIR / f"{source.parent.name}.{source.name}"


def _adopt_start_checkpoint(run_dir: Path, source: Path) -> Path:
    """Copy ``source`` into ``run_dir/start/`` and discard the run's own training state.

    The copy keeps the start point while the run that wrote it deletes old checkpoints
    (``keep_best``), and makes this run self-contained. The old state must go, or Ray
    Train would resume this run's own abandoned checkpoints; ``run.json`` (the MLflow
    run) stays, and so does an earlier copy of the same start (a retried trial).
    """
    target = _start_copy(run_dir, source)
    name = target.name
    staged = None
    if not target.is_dir():
        # Copied beside the run first: nothing is discarded unless the copy is complete.
        staged = run_dir.with_name(f".{run_dir.name}.{name}.{os.getpid()}.tmp")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged)
    if run_dir.exists():
        doomed = run_dir.with_name(f".{run_dir.name}.discarding-{os.getpid()}")
        os.replace(run_dir, doomed)
        run_dir.mkdir()
        if (doomed / RUN_FILE).is_file():
            os.replace(doomed / RUN_FILE, run_dir / RUN_FILE)
        if staged is None:
            target.parent.mkdir(parents=True)
            os.replace(doomed / START_DIR / name, target)
        shutil.rmtree(doomed, ignore_errors=True)
    if staged is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
    log.info("run %r starts from %s (copied to %s)", run_dir.name, source, target)
    return target


def _remove_run_dir(run_dir: Path) -> None:
    # Renamed first so a half-deleted run is never mistaken for a resumable one.
    doomed = run_dir.with_name(f".{run_dir.name}.deleting-{os.getpid()}")
    os.replace(run_dir, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    log.info("--restart: removed the previous run directory %s", run_dir)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- Ray ------------------------------------------------------------------------------------------


def connect_ray(address: str | None, cfg: ExperimentConfig, *, verbose: bool = False) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a local Ray; True when started here.

    Unless ``verbose``, worker output is not forwarded to the driver (``log_to_driver``):
    Ray, Ray Data and DeepSpeed narrate every start-up, and what matters reaches the
    driver anyway (the progress display, our own warnings, a failing worker's exception).
    """
    import ray

    from anchorless.platform.progress import QUIET_WORKER_ENV, quiet_driver_console, quiet_ray_notices

    if not verbose:
        quiet_driver_console()
    if ray.is_initialized():
        return False

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    output = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster's job may carry its own runtime_env (working_dir, ...): leave it alone.
        ray.init(address=address, **output)
        return True
    quiet_ray_notices()
    needed = cfg.training.num_workers * cfg.training.cpus_per_worker
    quiet = {} if verbose else {
        "env_vars": dict(QUIET_WORKER_ENV),
        "worker_process_setup_hook": "anchorless.platform.progress.quiet_worker_logs",
    }
    ray.init(
        address="local",  # a new Ray of our own, never one a `ray start` on this machine left behind
        # Logical CPUs: Ray Data's decode tasks must be schedulable beside the training workers
        # even when those take every core (the workers spend their time in torch's own threads).
        num_cpus=max(os.cpu_count() or 1, needed + 1),
        include_dashboard=False,
        runtime_env=quiet,
        **output,
    )
    return True


def _epochs_between_evaluations(cfg: ExperimentConfig, plan: RunPlan) -> int:
    """Epochs the training stream runs before the workers stop it to evaluate (and at most the run's).

    Every evaluation ends the training stream's Ray Data execution (see ``EpochStream``),
    discarding what it decoded ahead, so one execution need not cover more passes than that.
    """
    epochs = [cfg.training.epochs, cfg.training.checkpoint.every_epochs]  # a checkpoint is always scored
    if plan.val_dir:
        epochs.append(cfg.evaluation.every_epochs)
        if cfg.evaluation.every_steps:
            micro_steps = cfg.evaluation.every_steps * cfg.training.grad_accum
            epochs.append(max(1, micro_steps // max(1, plan.micro_steps_per_epoch)))
    return max(1, min(epochs))


def _check_cluster(cfg: ExperimentConfig) -> None:
    import ray

    resources = ray.cluster_resources()
    training = cfg.training
    wanted = {"CPU": training.num_workers * training.cpus_per_worker}
    if training.use_gpu:
        wanted["GPU"] = training.num_workers * training.gpus_per_worker
    for kind, amount in wanted.items():
        if resources.get(kind, 0) < amount:
            raise ConfigError(
                f"training.num_workers={training.num_workers} needs {amount:g} {kind} but the Ray cluster has "
                f"{resources.get(kind, 0):g}; lower training.num_workers or training.cpus_per_worker"
            )


def _data_config() -> Any:
    """Train split equally (same steps on every rank); validation split without dropping rows."""
    from ray.train import DataConfig

    class TrainEqualValComplete(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            split = super().configure(
                {k: v for k, v in datasets.items() if k != "val"}, world_size, worker_handles, worker_node_ids, **kwargs
            )
            if "val" in datasets:
                val = datasets["val"].copy(datasets["val"])
                val.context.execution_options = self._resolve_execution_options("val")
                # equal=False: every validation image is scored exactly once, whatever the counts.
                for shard, iterator in zip(split, val.streaming_split(world_size, equal=False)):
                    shard["val"] = iterator
            return split

    return TrainEqualValComplete()


def build_trainer(
    cfg: ExperimentConfig,
    plan: RunPlan,
    *,
    run_id: str,
    tracking_uri: str,
    progress_queue: Any = None,
    callbacks: list[Any] | None = None,
    start_checkpoint: Path | None = None,
) -> Any:
    """The ``TorchTrainer`` for this run: workers, datasets, storage, failures, checkpoints.

    ``start_checkpoint`` is where the workers start when the run has no checkpoint of
    its own yet. Train V2 dropped ``resume_from_checkpoint``; its migration guide passes
    the checkpoint in the loop config, which is what this does.
    """
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchConfig, TorchTrainer

    from anchorless.platform.data import build_dataset
    from anchorless.platform.progress import QUIET_WORKER_ENV
    from anchorless.platform.worker import train_loop_per_worker

    DataContext.get_current().enable_progress_bars = False  # the driver shows one bar, ours
    seed = cfg.training.seed
    datasets = {"train": build_dataset(plan.train_dir, cfg.data, train=True, seed=seed, max_passes=_epochs_between_evaluations(cfg, plan))}
    if plan.val_dir:
        datasets["val"] = build_dataset(plan.val_dir, cfg.data, train=False, seed=seed)
    training = cfg.training
    resources = {"CPU": training.cpus_per_worker}
    if training.use_gpu:
        resources["GPU"] = training.gpus_per_worker
    scored = plan.val_dir is not None
    worker_plan = {
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "deepspeed_config": plan.deepspeed_config,
        "total_steps": plan.total_steps,
        "micro_steps_per_epoch": plan.micro_steps_per_epoch,
        "val_dir": plan.val_dir,
        "label_to_category_id": [coco_id for _, coco_id, _ in _category_table(plan.manifest)],
        "progress_queue": progress_queue,
        "fault": _fault_from_env(plan.run_dir),
        "start_checkpoint": str(start_checkpoint) if start_checkpoint else None,
        "quiet": not logging.getLogger("ray").isEnabledFor(logging.DEBUG),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "plan": worker_plan},
        torch_config=TorchConfig(backend="nccl" if training.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=training.num_workers, use_gpu=training.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=plan.name,
            storage_path=str(plan.run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=training.checkpoint.keep_best,
                checkpoint_score_attribute=training.checkpoint.metric if scored else None,
                checkpoint_score_order=training.checkpoint.mode,
            ),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": {**worker_env(training.use_gpu), **(QUIET_WORKER_ENV if worker_plan["quiet"] else {})}},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )


def _fault_from_env(run_dir: Path) -> dict[str, Any] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, rank, step, *term = spec.split(":")
    if kind not in ("kill", "nan") or (kind == "nan") != bool(term):
        raise ConfigError(f"${FAULT_ENV}={spec!r}: expected kill:RANK:STEP or nan:RANK:STEP:TERM")
    marker = run_dir / f".fault_{kind}_injected"
    return {"kind": kind, "rank": int(rank), "step": int(step), "term": term[0] if term else None, "marker": str(marker)}


# --- the whole job ------------------------------------------------------------------------------


def train(
    cfg: ExperimentConfig,
    *,
    address: str | None = None,
    restart: bool = False,
    progress: bool = True,
    callbacks: list[Any] | None = None,
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
    start_from: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on Ray and return the summary the CLI prints as its last line.

    Re-running with the same run name (``tracking.run_name`` or ``name``) resumes the
    interrupted run from its latest checkpoint, in the same MLflow run; a finished run
    is not trained again (its summary is returned) unless ``restart`` is given, which
    deletes the old run directory and starts afresh.

    Returns ``{run_id, run_name, model_uri, checkpoint, export, tracking_uri, epoch,
    step, minutes, nonfinite_steps, images_per_s, AP, AP50, AP75, APs, APm, APl, AR100, duplicate_rate}``.
    Raises ConfigError / DataError / TrackingError before any worker starts, and
    TrainingError when training cannot finish.

    ``callbacks`` are Ray Train callbacks (a Tune trial passes one that reports to Tune);
    ``parent_run_id`` nests a new MLflow run and ``run_tags`` tag it (a resumed one too).

    ``start_from`` is another run's checkpoint directory (a PBT donor's) to continue
    from: its weights, optimizer moments, step and epoch, trained on with this config's
    hyperparameters for the epochs left. It is copied into this run's directory and the
    run's own checkpoints are discarded; the MLflow run stays the same.
    """
    started = time.monotonic()
    plan = plan_run(cfg, restart=restart, start_from=start_from)
    if plan.finished_summary is not None:
        log.info("run %r already finished (%s); pass restart=True (--restart) to train it again", plan.name, plan.run_dir)
        return plan.finished_summary

    from anchorless.platform.tracking import Tracker

    start_checkpoint = _adopt_start_checkpoint(plan.run_dir, plan.start_from) if plan.start_from else None
    tracker = Tracker.start(cfg, resume_run_id=plan.resume_run_id, parent_run_id=parent_run_id, tags=run_tags)
    if plan.resume_run_id and run_tags:
        tracker.set_tags(run_tags)
    run_record = {"run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri, "name": plan.name, "config": cfg.to_dict()}
    _write_atomic(plan.run_dir / RUN_FILE, json.dumps(run_record, indent=2))
    _write_atomic(plan.run_dir / "config.yaml", cfg.to_yaml())
    _write_atomic(plan.run_dir / "deepspeed_config.json", json.dumps(plan.deepspeed_config, indent=2))
    tracker.log_params_and_config(cfg, plan.deepspeed_config, plan.manifest)

    verbose = logging.getLogger("ray").isEnabledFor(logging.DEBUG)
    if not verbose:  # the driver materialises small data sets itself; Ray Data narrates that at INFO
        for name in ("ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    started_ray = connect_ray(address, cfg, verbose=verbose)
    try:
        if started_ray and not (address or os.environ.get("RAY_ADDRESS")):
            _check_cluster(cfg)  # a real cluster may autoscale to fit; a local Ray never will
        result = _fit(cfg, plan, tracker, progress=progress, callbacks=callbacks, start_checkpoint=start_checkpoint)
        summary = _finish(cfg, plan, tracker, result, minutes=(time.monotonic() - started) / 60)
    except BaseException as exc:
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    tracker.finish("FINISHED")
    return summary


def _fit(
    cfg: ExperimentConfig,
    plan: RunPlan,
    tracker: Any,
    *,
    progress: bool,
    callbacks: list[Any] | None = None,
    start_checkpoint: Path | None = None,
) -> Any:
    from ray.train import TrainingFailedError

    from anchorless.platform.progress import ProgressDisplay, create_queue

    queue = create_queue()
    trainer = build_trainer(
        cfg,
        plan,
        run_id=tracker.run_id,
        tracking_uri=tracker.tracking_uri,
        progress_queue=queue,
        callbacks=callbacks,
        start_checkpoint=start_checkpoint,
    )
    display = ProgressDisplay(
        queue, total_steps=plan.total_steps, epochs=cfg.training.epochs, enabled=progress,
        budget_minutes=cfg.training.time_budget_minutes,
    )  # fmt: skip
    try:
        with display:
            result = trainer.fit()
    except TrainingFailedError as exc:
        raise TrainingError(f"training run {plan.name!r} failed: {_root_cause(exc)}") from exc
    finally:
        queue.shutdown()
    stopped = result.return_value if isinstance(result.return_value, dict) else None
    if stopped and stopped.get("stopped"):
        raise TrainingError(stopped["message"])
    return result


def _root_cause(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, error = sorted(failures.items())[0]
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return f"rank {rank}: {lines[-1] if lines else type(error).__name__}"
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _finish(cfg: ExperimentConfig, plan: RunPlan, tracker: Any, result: Any, *, minutes: float) -> dict[str, Any]:
    """Export the latest checkpoint, log and register it, write the summary."""
    from anchorless.platform.engine import model_state_dict
    from anchorless.platform.export import export_checkpoint, log_and_register
    from anchorless.platform.worker import STATE_FILE

    if result.checkpoint is None:
        raise TrainingError(f"training run {plan.name!r} reported no checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:  # a local path, or a download from remote storage
        state = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
        weights = model_state_dict(checkpoint_dir)
    # The checkpoint's own metrics first: a resumed run that had nothing left to train reports none.
    metrics = dict(state.get("metrics", {}))
    metrics.update({k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))})
    export_path = export_checkpoint(weights, cfg, plan.manifest, plan.run_dir / EXPORT_FILE)
    model_uri = log_and_register(tracker, export_path, cfg, metrics)
    summary = {
        "run_id": tracker.run_id,
        "run_name": plan.name,
        "model_uri": model_uri,
        "checkpoint": result.checkpoint.path,
        "export": str(export_path),
        "tracking_uri": tracker.tracking_uri,
        "epoch": metrics.get("epoch"),
        "step": metrics.get("step"),
        "minutes": round(minutes, 2),
        "nonfinite_steps": metrics.get("nonfinite_steps", 0),
        "images_per_s": metrics.get("images_per_s"),  # training throughput of the last epoch
        **{key: metrics[key] for key in SUMMARY_METRICS if key in metrics},
    }
    _write_atomic(plan.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary
