"""Turn a config into a trained, evaluated, tracked and registered model on Ray.

The driver side of training, in the order it happens:

1. :func:`~anchorless.platform.training.plan.plan_run` checks everything a worker
   would trip over later (shard directories, manifest checksums, class count, steps
   per epoch) and decides whether this is a fresh run or the resumption of one with
   the same name.
2. :func:`~anchorless.platform.ray_session.connect_ray` joins ``address`` / ``$RAY_ADDRESS`` or starts a local Ray.
3. The MLflow run is created (or reopened) here on the driver, so worker restarts
   and resumed runs log into the same run; its id is kept in the run directory.
4. :func:`build_trainer` makes the ``TorchTrainer`` running
   :func:`anchorless.platform.training.worker.train_loop_per_worker` on every worker.
5. The latest checkpoint is exported, logged and registered in MLflow, and a
   one-line summary is returned.

A run lives in ``<workspace>/runs/<run name>/``: Ray Train's checkpoints and state
next to ``run.json`` (MLflow run id), ``config.yaml``, ``deepspeed_config.json``,
``model.pt`` (the export), ``summary.json`` and, after a tracking outage, the outboxes
(``tracking_outbox.*.jsonl``) of what waits for MLflow; a run started from another run's
checkpoint (a PBT exploit) keeps its copy of that checkpoint under ``start/``. With
``training.checkpoint.storage`` (a directory or ``s3://...``), Ray Train's checkpoints and
state live there under the run's name instead (starting from another run's checkpoint
needs them on a local path).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from anchorless.files import write_atomic, write_json_atomic
from anchorless.platform.config import ConfigError, ExperimentConfig
from anchorless.platform.data.pipeline import build_dataset
from anchorless.platform.models.export import export_checkpoint
from anchorless.platform.models.pyfunc import log_and_register
from anchorless.platform.progress import QUIET_WORKER_ENV, ProgressDisplay, create_queue
from anchorless.platform.ray_session import connect_ray
from anchorless.platform.tracking.tracker import Outbox, Tracker
from anchorless.platform.training.engine import model_state_dict, worker_env
from anchorless.platform.training.handover import WorkerPlan
from anchorless.platform.training.plan import (
    DRIVER_OUTBOX,
    RANK0_OUTBOX,
    RUN_FILE,
    SUMMARY_FILE,
    RunPlan,
    TrainingError,
    adopt_start_checkpoint,
    category_table,
    fault_from_env,
    plan_run,
)
from anchorless.platform.training.worker import STATE_FILE, train_loop_per_worker

log = logging.getLogger(__name__)

EXPORT_FILE = "model.pt"
# How long a run that ends during a tracking outage waits for the store before it gives up
# (its metrics stay on disk in the outbox, delivered when the run is resumed).
END_OF_RUN_PATIENCE_SECONDS = 600.0
SUMMARY_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "duplicate_rate")


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


# Ray Train's controller looks at its workers every 2 s by default, so it learns of a
# finished run (or a dead worker) up to 2 s late: seconds of every short run, measured
# 3.3 s from the workers' last step to `fit()` returning, 1.0 s at 0.5 s. The controller
# reads this variable, which Ray Train copies from the process calling `fit()`; a value
# set by the user wins.
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_SECONDS = "0.5"


def poll_workers_often() -> None:
    """Have the next ``fit()``'s controller poll its workers every CONTROLLER_POLL_SECONDS."""
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_SECONDS)


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

    DataContext.get_current().enable_progress_bars = False  # the driver shows one bar, ours
    poll_workers_often()
    seed = cfg.training.seed
    datasets = {"train": build_dataset(plan.train_dir, cfg.data, train=True, seed=seed, max_passes=_epochs_between_evaluations(cfg, plan))}
    if plan.val_dir:
        datasets["val"] = build_dataset(plan.val_dir, cfg.data, train=False, seed=seed)
    training = cfg.training
    resources = {"CPU": training.cpus_per_worker}
    if training.use_gpu:
        resources["GPU"] = training.gpus_per_worker
    scored = plan.val_dir is not None
    worker_plan = WorkerPlan(
        run_id=run_id,
        tracking_uri=tracking_uri,
        deepspeed_config=plan.deepspeed_config,
        total_steps=plan.total_steps,
        micro_steps_per_epoch=plan.micro_steps_per_epoch,
        val_dir=plan.val_dir,
        label_to_category_id=[coco_id for _, coco_id, _ in category_table(plan.manifest)],
        progress_queue=progress_queue,
        fault=fault_from_env(plan.run_dir),
        start_checkpoint=str(start_checkpoint) if start_checkpoint else None,
        outbox=str(plan.run_dir / RANK0_OUTBOX),
        quiet=not logging.getLogger("ray").isEnabledFor(logging.DEBUG),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "plan": worker_plan},
        torch_config=TorchConfig(backend="nccl" if training.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=training.num_workers, use_gpu=training.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=plan.name,
            storage_path=plan.storage_path or str(plan.run_dir.parent),
            storage_filesystem=plan.storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=training.checkpoint.keep_best,
                checkpoint_score_attribute=training.checkpoint.metric if scored else None,
                checkpoint_score_order=training.checkpoint.mode,
            ),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": {**worker_env(training.use_gpu), **(QUIET_WORKER_ENV if worker_plan.quiet else {})}},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )


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

    start_checkpoint = adopt_start_checkpoint(plan.run_dir, plan.start_from) if plan.start_from else None
    tracker = Tracker.start(
        cfg, resume_run_id=plan.resume_run_id, parent_run_id=parent_run_id, tags=run_tags,
        outbox=Outbox(plan.run_dir / DRIVER_OUTBOX),
    )  # fmt: skip
    if plan.resume_run_id and run_tags:
        tracker.set_tags(run_tags)
    run_record = {"run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri, "name": plan.name, "config": cfg.to_dict()}
    write_json_atomic(plan.run_dir / RUN_FILE, run_record)
    write_atomic(plan.run_dir / "config.yaml", cfg.to_yaml())
    write_json_atomic(plan.run_dir / "deepspeed_config.json", plan.deepspeed_config)
    tracker.log_params_and_config(cfg, plan.deepspeed_config, plan.manifest)

    verbose = logging.getLogger("ray").isEnabledFor(logging.DEBUG)
    if not verbose:  # the driver materialises small data sets itself; Ray Data narrates that at INFO
        for name in ("ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    started_ray = connect_ray(address, cpus_needed=cfg.training.num_workers * cfg.training.cpus_per_worker, verbose=verbose)
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
    if result.checkpoint is None:
        raise TrainingError(f"training run {plan.name!r} reported no checkpoint")
    # What rank 0 could not deliver before it ended (an outage to the last epoch) goes now, then
    # ours; registering the model needs the store anyway, so an outage at the end is waited out.
    rank0 = tracker.flush(Outbox(plan.run_dir / RANK0_OUTBOX), patience_seconds=END_OF_RUN_PATIENCE_SECONDS)
    driver = tracker.flush(patience_seconds=END_OF_RUN_PATIENCE_SECONDS)
    tracking = {f"tracking_{key}": rank0[key] + driver[key] for key in ("late", "dropped", "pending")}
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
        "checkpoint": plan.checkpoint_uri(result.checkpoint.path),
        "export": str(export_path),
        "tracking_uri": tracker.tracking_uri,
        "epoch": metrics.get("epoch"),
        "step": metrics.get("step"),
        "minutes": round(minutes, 2),
        "nonfinite_steps": metrics.get("nonfinite_steps", 0),
        "images_per_s": metrics.get("images_per_s"),  # training throughput of the last epoch
        **{key: metrics[key] for key in SUMMARY_METRICS if key in metrics},
        **tracking,  # tracking calls an MLflow outage delivered late, lost past the outbox's bound, still waiting
    }
    write_json_atomic(plan.run_dir / SUMMARY_FILE, summary)
    return summary
