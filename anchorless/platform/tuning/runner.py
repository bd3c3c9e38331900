"""Tuning campaigns: Ray Tune over full distributed training runs.

Each trial is one call of :func:`anchorless.platform.training.driver.train` from a small
Tune driver function (the Ray Train V2 pattern): the trial builds its own
``TorchTrainer``, so a trial can use several workers and DeepSpeed, and a Train
callback hands every epoch's metrics back to Tune for the scheduler.

With every checkpointed epoch Tune also gets a checkpoint of its own: a pointer
(a small JSON file) to the Ray Train checkpoint, which stays in the trial's run
directory. That is what PBT copies on exploit: the exploited trial starts a new
``TorchTrainer`` from the donor's weights, optimizer moments and epoch, with its
new hyperparameters, logging on into its own MLflow run.

In MLflow a campaign is a parent run; each trial is a nested child run with its
own params and metrics. At the end the parent gets the campaign summary (a table
of trials, the best config, a plot of the metric against each searched parameter)
and the best trial's model is registered.

A campaign lives in ``<workspace>/campaigns/<name>/``; re-running an interrupted
campaign restores Tune's state from there instead of starting over.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from anchorless.platform.tuning.campaign import (
    Campaign,
    KeepInRange,
    absolute_path_overrides,
    load_campaign,
    to_pbt_mutations,
    to_tune_space,
)
from anchorless.errors import AnchorlessError
from anchorless.files import atomic_path, write_atomic, write_json_atomic
from anchorless.platform.ray_session import connect_ray

log = logging.getLogger(__name__)

CAMPAIGN_FILE = "campaign.json"
TUNER_DIR = "tuner"
TAG_CAMPAIGN = "anchorless.campaign"
TAG_TRIAL = "anchorless.trial"
TAG_EXPLOIT = "anchorless.pbt.exploit"  # + ".epochNNNN": which trial this one was cloned from, and its new params
TAG_EARLY_STOPPED = "anchorless.early_stopped"  # "true" on trials the scheduler stopped before their last epoch
POINTER_FILE = "train_checkpoint.json"  # the whole content of a trial's Tune checkpoint
TRIAL_DRIVER_CPUS = 0.01  # a trial's driver only waits on its TorchTrainer; Tune refuses zero resources


class TuningError(AnchorlessError):
    """A campaign that could not run or produced no usable trial."""


def campaign_dir(campaign: Campaign) -> Path:
    return Path(campaign.base.workspace).resolve() / "campaigns" / campaign.spec.name


def trial_run_name(campaign_name: str, trial_id: str) -> str:
    return f"{campaign_name}-{trial_id}"


def trials_that_fit(requested: int, worker_cpus: float, cluster_cpus: float) -> int:
    """How many of ``requested`` concurrent trials a cluster of ``cluster_cpus`` CPUs runs.

    Each trial holds its training workers' CPUs and its driver's sliver, and Ray Data's
    decode tasks (one whole CPU each) must still find a CPU beside them: without one every
    running trial waits for data forever (two one-worker trials on three CPUs did). At least
    one, even where that one does not fit (a cluster that autoscales gets its CPUs later).
    """
    fitting = math.floor((cluster_cpus - 1 + 1e-9) / (worker_cpus + TRIAL_DRIVER_CPUS))
    return max(1, min(requested, fitting))


def _searcher(campaign: Campaign, max_concurrent: int) -> Any:
    spec = campaign.spec
    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=spec.metric, mode=spec.mode, seed=spec.search.seed)
        if max_concurrent > 1:
            from ray.tune.search import ConcurrencyLimiter

            return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
        return searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # random and grid both come from Tune's variant generator: grid dimensions are
    # expanded, sampled ones drawn; a seed makes the draws repeatable.
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=max_concurrent)


def _scheduler(campaign: Campaign) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec, epochs = campaign.spec, campaign.base.training.epochs
    if spec.scheduler.kind == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            # One past the last epoch: ASHA stops a trial that reaches max_t at once, which
            # would kill its driver before it exports and logs the trained model.
            max_t=epochs + 1,
            grace_period=min(spec.scheduler.grace_period, epochs),
            reduction_factor=spec.scheduler.reduction_factor,
        )
    if spec.scheduler.kind == "pbt":
        if spec.search.algorithm != "random":
            raise TuningError("scheduler.kind=pbt works with search.algorithm=random (PBT does its own search)")
        from anchorless.platform.tuning.schedulers import PopulationBasedTrainingToTheEnd

        return PopulationBasedTrainingToTheEnd(
            last_epoch=epochs,
            time_attr="epoch",
            perturbation_interval=spec.scheduler.perturbation_interval,
            hyperparam_mutations=to_pbt_mutations(spec.search_space),
            custom_explore_fn=KeepInRange(spec.search_space),
            quantile_fraction=spec.scheduler.quantile_fraction,
            synch=spec.scheduler.synch,
        )
    return FIFOScheduler()


def write_pointer(directory: str | Path, *, checkpoint: str, run_name: str, trial_id: str, epoch: int, step: int) -> Path:
    """Write the Tune checkpoint of one epoch: where that epoch's Ray Train checkpoint is, and whose it is."""
    record = {"checkpoint": checkpoint, "run_name": run_name, "trial_id": trial_id, "epoch": epoch, "step": step}
    return write_json_atomic(Path(directory) / POINTER_FILE, record)


def read_pointer(directory: str | Path) -> dict[str, Any]:
    """The record :func:`write_pointer` wrote into ``directory``."""
    path = Path(directory) / POINTER_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TuningError(f"{path}: not a trial checkpoint of this project ({exc})") from None
    missing = {"checkpoint", "run_name", "trial_id", "epoch", "step"} - set(record)
    if missing:
        raise TuningError(f"{path}: trial checkpoint without {', '.join(sorted(missing))}")
    return record


def _report_to_trial(reports: Any) -> Any:
    """A Ray Train callback (it runs in the Train controller) that puts each report on
    ``reports``: rank 0's metrics, the path of the persisted checkpoint (or None), and
    the controller's own handle, so that the trial can abort the run.

    Ray's ``TuneReportCallback`` forwards metrics only, with no Tune checkpoint, so
    PBT would have nothing to clone; this one lets the trial driver report both.
    """
    import ray
    from ray.train import UserCallback

    class ReportToTrial(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            # A queue of one: the controller waits while Tune digests the previous report,
            # as with Ray's callback, so a scheduler's decision lands before training runs on.
            path = checkpoint.path if checkpoint is not None else None
            reports.put((dict(metrics[0]), path, ray.get_runtime_context().current_actor))

    return ReportToTrial()


class _RunningFit:
    """The fit running in this trial process (one trial per actor): its report queue and,
    once it has reported, its Train controller."""

    reports: Any = None
    controller: Any = None


def _abort_training() -> None:
    """Abort this trial's Train run, if one is running: its workers stop and their
    placement group is freed, as Ray Train's own Ctrl-C handler does it.

    Tune stops a trial (ASHA) or pauses it (PBT exploit) by ending its actor, and the
    Train controller the actor owns goes with it, but not its workers' placement group:
    Ray Train's detached cleaner finds dead controllers through the dashboard's state
    API, which a local Ray started here runs without. The CPUs would stay taken until
    the campaign ends and the next trial's data pipeline would wait for them forever.
    """
    import ray
    from ray.util.queue import Empty

    handle, reports = _RunningFit.controller, _RunningFit.reports
    _RunningFit.controller = _RunningFit.reports = None
    if handle is None:
        return
    try:  # a report waiting to be taken would hold the controller in its callback
        while True:
            reports.get_nowait()
    except Empty:
        pass
    try:
        # TrainController.abort is not public API; it is what Ray's SIGINT handler calls.
        ray.get(handle.abort.remote(), timeout=120)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass  # the controller exits as it aborts (or was gone already)


class _AbortTrainingOnStop:
    """Mixin for the trial's Tune trainable (Tune's ``__mixins__`` hook): Tune calls
    ``cleanup`` in the actor before it ends, so the Train run is aborted there."""

    def cleanup(self) -> None:
        try:
            _abort_training()
        finally:
            super().cleanup()  # type: ignore[misc]


def _fit_reporting_to_tune(
    run_training: Callable[[list[Any]], dict[str, Any]], *, run_name: str, trial_id: str, metric: str, only_checkpoints: bool
) -> dict[str, Any]:
    """Run ``run_training(callbacks)`` in a thread; report what it reports to Tune from this one.

    ``tune.report`` must be called from the trial's own thread (Tune stops a trial by
    raising ``SystemExit`` there), while ``TorchTrainer.fit`` blocks until training ends:
    so the fit runs beside it and its reports come over a queue. With
    ``only_checkpoints`` (PBT), reports without a checkpoint are not passed on: PBT
    needs its metric and a checkpoint in every result it sees.
    """
    from ray import tune
    from ray.util.queue import Empty

    from anchorless.platform.progress import create_queue

    reports = _RunningFit.reports = create_queue(maxsize=1)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["summary"] = run_training([_report_to_trial(reports)])
        except BaseException as exc:  # handed to the trial's thread below
            outcome["error"] = exc

    fitting = threading.Thread(target=fit, name="anchorless-trial-fit", daemon=True)
    fitting.start()
    while True:
        try:
            metrics, checkpoint_path, _RunningFit.controller = reports.get(timeout=1.0)
        except Empty:
            if fitting.is_alive():
                continue
            try:  # the fit is over; its last report may have come in since
                metrics, checkpoint_path, _ = reports.get_nowait()
            except Empty:
                break
        if metric not in metrics:
            # An epoch the config does not evaluate (evaluation.every_epochs > 1): Tune
            # refuses a result without the campaign's metric, and a scheduler has nothing to rank.
            continue
        if checkpoint_path is None:
            if not only_checkpoints:
                tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory(prefix="anchorless-trial-checkpoint-") as pointer_dir:
            write_pointer(
                pointer_dir,
                checkpoint=checkpoint_path,
                run_name=run_name,
                trial_id=trial_id,
                epoch=int(metrics.get("epoch", 0)),
                step=int(metrics.get("step", 0)),
            )
            tune.report({**metrics, "checkpoint_path": checkpoint_path}, checkpoint=tune.Checkpoint.from_directory(pointer_dir))
    fitting.join()
    _RunningFit.controller = _RunningFit.reports = None  # finished: nothing to abort
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]


def _run_trial(params: dict[str, Any], campaign_path: str, campaign_overrides: list[str], parent_run_id: str) -> None:
    """One Tune trial: the campaign's base config with ``params``, trained by ``train()``.

    Started with a Tune checkpoint, the trial either resumes its own run (Tune restored
    or un-paused it: ``train()`` picks up the run directory) or, when the checkpoint is
    another trial's (a PBT exploit), starts from that trial's Train checkpoint.
    """
    import ray.tune

    from anchorless.platform.training.driver import train

    campaign = load_campaign(campaign_path, campaign_overrides)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = campaign.trial(params)
    run_name = cfg.tracking.run_name = trial_run_name(campaign.spec.name, trial_id)
    # Trials log their model; only the campaign's best is registered.
    cfg.tracking.registered_model = None
    if campaign.spec.scheduler.kind == "pbt":
        # PBT may start another trial from any checkpoint this one reported, later than
        # Ray Train's keep_best would delete it (a fast donor is epochs ahead): keep them all.
        cfg.training.checkpoint.keep_best = max(cfg.training.checkpoint.keep_best, cfg.training.epochs)
    tags = {TAG_TRIAL: trial_id, TAG_CAMPAIGN: campaign.spec.name}
    start_from = None
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as pointer_dir:
            pointer = read_pointer(pointer_dir)
        if pointer["run_name"] != run_name:
            start_from = pointer["checkpoint"]
            tags[f"{TAG_EXPLOIT}.epoch{pointer['epoch']:04d}"] = json.dumps(
                {"donor_trial": pointer["trial_id"], "donor_run": pointer["run_name"], "step": pointer["step"], "params": params},
                default=str,
            )[:5000]
            log.info("trial %s starts from trial %s's epoch %d with %s", trial_id, pointer["trial_id"], pointer["epoch"], params)

    _fit_reporting_to_tune(
        lambda callbacks: train(
            cfg, progress=False, callbacks=callbacks, parent_run_id=parent_run_id, run_tags=tags, start_from=start_from
        ),
        run_name=run_name,
        trial_id=trial_id,
        metric=campaign.spec.metric,
        only_checkpoints=campaign.spec.scheduler.kind == "pbt",
    )


_run_trial.__mixins__ = (_AbortTrainingOnStop,)  # type: ignore[attr-defined]


def _tuner(
    campaign: Campaign, root: Path, parent_run_id: str, overrides: Sequence[str], restart: bool, max_concurrent: int
) -> Any:
    from ray import tune

    spec = campaign.spec
    trainable = tune.with_parameters(
        _run_trial,
        campaign_path=str(campaign.path.resolve()),
        campaign_overrides=[*overrides, *absolute_path_overrides(campaign.base)],
        parent_run_id=parent_run_id,
    )
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPUS})  # the workers hold the CPUs
    tuner_path = root / TUNER_DIR
    if not restart and tune.Tuner.can_restore(str(tuner_path)):
        log.info("resuming campaign %r from %s", spec.name, tuner_path)
        return tune.Tuner.restore(str(tuner_path), trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(spec.search_space),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=_searcher(campaign, max_concurrent),
            scheduler=_scheduler(campaign),
            num_samples=spec.num_samples,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=TUNER_DIR,
            storage_path=str(root),
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=1,
        ),
    )


def tune_campaign(
    campaign_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    address: str | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a campaign; returns its summary, including the registered best model."""
    import shutil

    from anchorless.platform.tracking.tracker import Tracker

    campaign = load_campaign(campaign_path, overrides)
    spec = campaign.spec
    root = campaign_dir(campaign)
    if restart and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / CAMPAIGN_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {}

    parent_cfg = campaign.base.model_copy(deep=True)
    parent_cfg.tracking.run_name = spec.name
    parent = Tracker.start(parent_cfg, resume_run_id=record.get("parent_run_id"))
    parent.set_tags({TAG_CAMPAIGN: spec.name})
    if not record:
        parent.client.log_batch(
            parent.run_id,
            params=[
                *_params({f"search_space.{k}": json.dumps(v) for k, v in spec.search_space.items()}),
                *_params({"search.algorithm": spec.search.algorithm, "scheduler.kind": spec.scheduler.kind,
                          "num_samples": spec.num_samples, "metric": spec.metric, "mode": spec.mode}),
            ],
        )
        parent.log_artifact(str(campaign.path))
    record = {"parent_run_id": parent.run_id, "tracking_uri": parent.tracking_uri, "name": spec.name}
    write_json_atomic(record_path, record)

    # A local Ray must fit every concurrent trial's workers plus the trial drivers' slivers,
    # and still leave whole CPUs for Ray Data's decode tasks (connect_ray adds one).
    worker_cpus = campaign.base.training.num_workers * campaign.base.training.cpus_per_worker
    trial_cpus = worker_cpus + TRIAL_DRIVER_CPUS
    started_ray = connect_ray(address, cpus_needed=math.ceil(spec.max_concurrent_trials * trial_cpus))
    try:
        import ray

        cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
        max_concurrent = trials_that_fit(spec.max_concurrent_trials, worker_cpus, cluster_cpus)
        if max_concurrent < spec.max_concurrent_trials:
            log.warning(
                "campaign %r runs %d trial(s) at a time, not max_concurrent_trials=%d: each holds %g CPUs "
                "(its training workers and driver) and Ray Data's decoding needs a whole CPU beside them; "
                "the cluster has %g CPUs",
                spec.name, max_concurrent, spec.max_concurrent_trials, trial_cpus, cluster_cpus,
            )  # fmt: skip
        results = _tuner(campaign, root, parent.run_id, overrides, restart, max_concurrent).fit()
        summary = _summarise(campaign, root, parent, results)
    except BaseException:
        parent.finish("FAILED")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    parent.finish("FINISHED")
    return summary


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in values.items()]


def _summarise(campaign: Campaign, root: Path, parent: Any, results: Any) -> dict[str, Any]:
    """Table of trials, best config, metric-vs-parameter plots; register the best model."""
    spec = campaign.spec
    client = parent.client
    children = {
        run.data.tags.get(TAG_TRIAL): run
        for run in client.search_runs(
            [parent.experiment_id or client.get_run(parent.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
            max_results=1000,
        )
    }
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id")  # Tune fills it in every result
        child = children.get(trial_id)
        row = {
            "trial_id": trial_id,
            "run_id": child.info.run_id if child else None,
            "status": "error" if result.error else "done",
            "epochs": metrics.get("epoch"),
            spec.metric: metrics.get(spec.metric),
            **{f"param.{k}": v for k, v in (result.config or {}).items()},
        }
        rows.append(row)
        if child is None:
            continue
        # What Tune last saw decides, not the MLflow run: a stopped trial's Train run may
        # log an epoch or two more before its abort lands.
        early_stopped = not result.error and (row["epochs"] or 0) < campaign.base.training.epochs
        client.set_tag(child.info.run_id, TAG_EARLY_STOPPED, str(early_stopped).lower())
        # Stopped by the scheduler: left running, or failed as its Train run was aborted.
        if child.info.status == "RUNNING" or (child.info.status != "FINISHED" and not result.error):
            client.set_terminated(child.info.run_id, status="FINISHED" if not result.error else "FAILED")
    # Only trials that ran every epoch have a logged model to register.
    scored = [
        row
        for row in rows
        if row["epochs"] == campaign.base.training.epochs
        and isinstance(row[spec.metric], (int, float))
        and not math.isnan(row[spec.metric])
    ]
    if not scored:
        raise TuningError(f"campaign {spec.name!r}: no trial completed with {spec.metric}; see {root / TUNER_DIR}")
    # Ties go to the earliest trial, so a restored campaign names the same best.
    scored.sort(key=lambda row: str(row["trial_id"]))
    best = (max if spec.mode == "max" else min)(scored, key=lambda row: row[spec.metric])
    best_config = campaign.trial({k.removeprefix("param."): v for k, v in best.items() if k.startswith("param.")})

    write_json_atomic(root / "trials.json", rows, default=str)
    parent.log_artifact(str(root / "trials.json"))
    best_path = root / "best_config.yaml"
    write_atomic(best_path, best_config.to_yaml())
    parent.log_artifact(str(best_path))
    plot = _plot_metric_vs_params(rows, spec.metric, list(spec.search_space), root / "metric_vs_params.png")
    if plot:
        parent.log_artifact(str(plot))
    parent.log_metrics({f"best_{spec.metric}": float(best[spec.metric])}, step=0)

    model_uri = None
    registered_name = campaign.base.tracking.registered_model
    if spec.register_best and registered_name and best["run_id"]:
        model_uri = _register_best(parent, best, registered_name, spec.name)
    summary = {
        "campaign": spec.name,
        "parent_run_id": parent.run_id,
        "tracking_uri": parent.tracking_uri,
        "trials": len(rows),
        "completed": sum(1 for row in rows if row["epochs"] == campaign.base.training.epochs),
        "best_trial": best["trial_id"],
        "best_run_id": best["run_id"],
        f"best_{spec.metric}": best[spec.metric],
        "best_params": {k.removeprefix("param."): v for k, v in best.items() if k.startswith("param.")},
        "model_uri": model_uri,
    }
    write_json_atomic(root / "summary.json", summary, default=str)
    return summary


def _register_best(parent: Any, best: dict[str, Any], name: str, campaign_name: str) -> str:
    import mlflow

    from anchorless.platform.models.pyfunc import MLFLOW_MODEL_NAME

    client = parent.client
    # A restored campaign that ends with the same best names the version it registered.
    for registered in client.search_model_versions(f"name='{name}' and run_id='{best['run_id']}'"):
        if registered.tags.get(TAG_CAMPAIGN) == campaign_name:
            return f"models:/{name}/{registered.version}"
    mlflow.set_tracking_uri(parent.tracking_uri)
    mlflow.set_registry_uri(parent.tracking_uri)
    version = mlflow.register_model(f"runs:/{best['run_id']}/{MLFLOW_MODEL_NAME}", name, await_registration_for=120)
    run = client.get_run(best["run_id"])
    for key, value in run.data.metrics.items():
        client.set_model_version_tag(name, version.version, key, f"{value:.6f}")
    client.set_model_version_tag(name, version.version, TAG_CAMPAIGN, campaign_name)
    client.set_model_version_tag(name, version.version, TAG_TRIAL, str(best["trial_id"]))
    return f"models:/{name}/{version.version}"


def _plot_metric_vs_params(rows: list[dict[str, Any]], metric: str, params: list[str], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [row for row in rows if isinstance(row.get(metric), (int, float))]
    if not points:
        return None
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.4), squeeze=False)
    for ax, param in zip(axes[0], params):
        xs = [row.get(f"param.{param}") for row in points]
        ax.scatter(xs, [row[metric] for row in points], s=28)
        ax.set_xlabel(param.rsplit(".", 1)[-1] if len(param) > 28 else param, fontsize=8)
        ax.set_ylabel(metric)
        if all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} against each searched parameter")
    fig.tight_layout()
    with atomic_path(out, mode=0o644) as tmp:
        fig.savefig(tmp, dpi=110, format="png")  # the temporary name has no .png to go by
    plt.close(fig)
    return out
