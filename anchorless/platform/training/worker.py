"""The loop every Ray Train worker runs: DeepSpeed steps, evaluation, checkpoints, resume.

``train_loop_per_worker`` is what :func:`anchorless.platform.training.driver.train` hands
to the ``TorchTrainer``; it reads in four steps, like Ray's own ``train_func`` examples:

1. :func:`_start` builds the detector and its DeepSpeed engine, loads the latest
   reported checkpoint (or, for a run started from another run's checkpoint, a PBT
   exploit, that one until it has its own) and, meanwhile, fetches the first batch and
   opens rank 0's MLflow run;
2. :func:`_train_one_epoch` streams this rank's equal share of the train split
   through the engine;
3. :func:`_evaluate_and_checkpoint`: at each checkpoint epoch all ranks predict their
   part of the validation split, rank 0 scores the gathered predictions, every rank
   writes its part of the DeepSpeed checkpoint and all report it to Ray Train;
4. a run out of time or epochs ends there.

On a restart training continues with the next epoch; the hyperparameters are always
this run's config's, continued at the loaded step (:func:`load_keeping_hyperparameters`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from anchorless.detectors import build_detector
from anchorless.platform.config import ExperimentConfig
from anchorless.platform.data.pipeline import EpochStream, multiscale_size, resize_batch, to_model_inputs
from anchorless.platform.data.shards import coco_ground_truth
from anchorless.platform.evaluation.metrics import pycocotools_quiet, score_detections
from anchorless.platform.evaluation.plots import log_evaluation
from anchorless.platform.models.predict import batch_to_original_pixels
from anchorless.platform.progress import ProgressSender, forward_worker_warnings, quiet_worker_logs
from anchorless.platform.tracking.tracker import Outbox, Tracker
from anchorless.platform.training.engine import (
    average_batchnorm_statistics,
    build_engine,
    load_engine,
    save_engine,
    set_schedule_clock,
    training_autocast,
)
from anchorless.platform.training.handover import Fault, WorkerPlan
from anchorless.platform.training.tricks import WeightEma, apply_label_smoothing

log = logging.getLogger(__name__)

STATE_FILE = "anchorless_state.json"
NUM_SAMPLE_IMAGES = 8  # validation images drawn with their detections in MLflow


@dataclass
class LoopState:
    epoch: int = 0  # completed epochs
    nonfinite_steps: int = 0
    loss_sums: dict[str, float] = field(default_factory=dict)
    micro_steps: int = 0
    data_wait_s: float = 0.0
    train_seconds: float = 0.0  # training time of the whole run, kept across restarts (time budget)
    epoch_start: float = 0.0  # perf_counter at the start of this epoch

    def add(self, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value
        self.micro_steps += 1

    def epoch_losses(self) -> dict[str, float]:
        return {name: total / max(1, self.micro_steps) for name, total in self.loss_sums.items()}


@dataclass
class WorkerRun:
    """One worker's view of the run: what every step of the loop reads and updates."""

    cfg: ExperimentConfig
    plan: WorkerPlan
    rank: int
    world_size: int
    engine: Any  # the DeepSpeed engine wrapping the detector
    scheduler: Any  # its LR schedule
    forward_precision: Any  # autocast context, re-entered every step
    state: LoopState
    stream: EpochStream
    val_shard: Any
    ema: WeightEma | None = None  # training.ema: the model scored, saved and exported
    tracker: Tracker | None = None  # rank 0 only
    progress: ProgressSender | None = None  # rank 0 only
    # Rank 0's tracking (every MLflow write, the progress messages) runs beside training, in
    # order: a slow or unreachable store (retries, then the outbox) never holds up a step.
    side_work: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="anchorless-log")
    )

    def beside(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """``fn(*args, **kwargs)`` on the side-work thread, after what was queued before it;
        a failure there is a warning on the driver, not the end of the run."""
        self.side_work.submit(fn, *args, **kwargs).add_done_callback(_warn_if_failed)

    @property
    def images_per_step(self) -> int:
        return self.cfg.data.batch_size * self.world_size

    @property
    def scored_model(self) -> torch.nn.Module:
        """The model that is evaluated and exported: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.engine.module

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Validation metrics (rank 0; ``{}`` elsewhere) of the model as it will be saved."""
        average_batchnorm_statistics(self.engine.module)  # every rank scores, and rank 0 saves, the same model
        if self.ema is not None:  # its statistics are each rank's own too (see tricks.WeightEma)
            average_batchnorm_statistics(self.ema.module)
        if self.val_shard is not None:
            self.stream.close()  # its paused decode tasks hold CPU slots the validation stream needs
        return _evaluate(self, epoch)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    cfg = ExperimentConfig.model_validate(config["cfg"])
    plan: WorkerPlan = config["plan"]
    run, resumed_from_elsewhere = _start(cfg, plan)
    try:
        if resumed_from_elsewhere is not None and run.state.epoch >= cfg.training.epochs:
            # Started from a final checkpoint: nothing left to train.
            _report_as_result(resumed_from_elsewhere, run.rank, run.tracker)
            return None
        for epoch in range(run.state.epoch, cfg.training.epochs):
            stopped, out_of_time = _train_one_epoch(run, epoch)
            if stopped is not None:
                return stopped
            _evaluate_and_checkpoint(run, epoch, out_of_time=out_of_time)
            if out_of_time:
                if run.progress is not None:
                    budget = cfg.training.time_budget_minutes
                    run.beside(run.progress.send, "message", text=f"time budget of {budget:g} min spent at step {run.engine.global_steps}")
                break
        return None
    finally:
        run.stream.close()  # an execution still in flight (a run with nothing left to train started one)
        run.side_work.shutdown(wait=True)  # the last logs are out
        if run.tracker is not None:
            run.tracker.flush()  # a last try at what an outage held back; the driver tries again after


def _start(cfg: ExperimentConfig, plan: WorkerPlan) -> tuple[WorkerRun, ray.train.Checkpoint | None]:
    """Build the engine, load the checkpoint to continue from, open rank 0's tracking.

    Returns the run and, when it starts from another run's checkpoint, that checkpoint.
    """
    if plan.quiet:
        quiet_worker_logs()  # here too: Ray Train configures a worker's logging after any setup hook
    training = cfg.training
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(training.torch_threads or training.cpus_per_worker)
    torch.manual_seed(training.seed)  # same initial weights everywhere (DeepSpeed also broadcasts rank 0's)
    device = ray.train.torch.get_device()
    forward_worker_warnings(plan.progress_queue, rank)

    # One stream for the whole run: with the split cached, a Ray Data execution spans many epochs.
    stream = EpochStream(
        ray.train.get_dataset_shard("train"),
        batch_size=cfg.data.batch_size,
        steps=plan.micro_steps_per_epoch,  # the same on every rank
        device=device,
        prefetch_batches=cfg.data.prefetch_batches,
    )
    # The first batch and rank 0's MLflow run come while the engine is built (each is seconds of waiting).
    early = ThreadPoolExecutor(max_workers=2, thread_name_prefix="anchorless-start")
    try:
        first_batch = early.submit(stream.fetch_ahead)
        tracker = None
        if rank == 0:
            outbox = Outbox(plan.outbox) if plan.outbox else None
            tracker = early.submit(Tracker.attach, cfg, plan.run_id, plan.tracking_uri, outbox=outbox)
        engine, scheduler, ema, state, checkpoint, started_elsewhere = _build_and_load(cfg, plan, device, world_size)
        first_batch.result()
    finally:
        early.shutdown(wait=False)  # a failed build does not wait for a batch that may never come
    run = WorkerRun(
        cfg=cfg, plan=plan, rank=rank, world_size=world_size, engine=engine, scheduler=scheduler,
        forward_precision=training_autocast(training, device), state=state, stream=stream,
        val_shard=ray.train.get_dataset_shard("val"), ema=ema,
    )  # fmt: skip
    if tracker is not None:
        run.tracker = tracker.result()
        run.progress = ProgressSender(plan.progress_queue)
        run.progress.send(
            "start", epoch=state.epoch, step=engine.global_steps, resumed=checkpoint is not None,
            train_seconds=state.train_seconds,
        )  # fmt: skip
    return run, checkpoint if started_elsewhere else None


def _build_and_load(cfg: ExperimentConfig, plan: WorkerPlan, device: torch.device, world_size: int) -> tuple[Any, ...]:
    """The engine, its schedule, the EMA and the loop state, from the checkpoint to continue from.

    Returns ``(engine, scheduler, ema, state, checkpoint, started_elsewhere)``.
    """
    training = cfg.training
    model = build_detector(cfg.detector)
    apply_label_smoothing(model, training.label_smoothing)
    if training.sync_batchnorm and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    budget_s = training.time_budget_minutes * 60.0 if training.time_budget_minutes else None
    engine, scheduler = build_engine(model.to(device), plan.deepspeed_config, training.schedule, plan.total_steps, budget_s)
    ema = WeightEma(engine.module, training.ema) if training.ema.enabled else None
    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    started_elsewhere = checkpoint is None and plan.start_checkpoint is not None
    if started_elsewhere:
        checkpoint = ray.train.Checkpoint(plan.start_checkpoint)
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            saved = load_keeping_hyperparameters(engine, scheduler, checkpoint_dir)
        state.epoch, state.nonfinite_steps = saved["epoch"], saved.get("nonfinite_steps", 0)
        state.train_seconds = saved.get("train_seconds", 0.0)
        if ema is not None:
            ema.load_state(saved)  # a checkpoint without an EMA: it starts from the loaded weights
    if budget_s is not None:
        set_schedule_clock(scheduler, state.train_seconds)  # the same saved value on every rank
    return engine, scheduler, ema, state, checkpoint, started_elsewhere


def _train_one_epoch(run: WorkerRun, epoch: int) -> tuple[dict[str, Any] | None, bool]:
    """One pass over this rank's share of the train split; (stop result or None, out of time).

    A non-finite averaged loss stops every rank together (``on_nonfinite: stop``, the
    returned dict is the run's result) or skips the step; the time budget ends the
    epoch early on every rank at the same step, and its clock drives the LR schedule.
    With ``data.multiscale`` each step's batch is resized to that step's size; with
    ``training.ema`` the EMA is updated after each optimizer step.
    """
    cfg, engine, state = run.cfg, run.engine, run.state
    training = cfg.training
    budget_s = training.time_budget_minutes * 60.0 if training.time_budget_minutes else None
    state.loss_sums, state.micro_steps = {}, 0
    state.epoch_start = window_start = tick = time.perf_counter()
    window_steps = 0
    out_of_time = False
    multiscale = cfg.data.multiscale
    for images, targets, _ in _timed(run.stream.epoch(), state):
        step = engine.global_steps + 1
        if multiscale.enabled:  # every rank draws the same size: a function of (seed, step) alone
            images, targets = resize_batch(images, targets, multiscale_size(multiscale.sizes, seed=training.seed, step=step))
        with run.forward_precision:
            losses = engine(images, targets)
        losses = _maybe_inject_fault(run.plan.fault, losses, rank=run.rank, step=step)
        averaged = _mean_over_ranks(losses)
        bad = [name for name, value in averaged.items() if not math.isfinite(value)]
        if bad:
            message = _nonfinite_message(bad, averaged, step=step, epoch=epoch + 1)
            if training.on_nonfinite == "stop":
                # Every rank sees the same averages, so all stop here together; the
                # driver reads rank 0's return value. No checkpoint of this state is kept.
                return {"stopped": "nonfinite", "message": message, "step": step, "epoch": epoch + 1}, False
            state.nonfinite_steps += 1
            engine.zero_grad()
            continue
        engine.backward(losses["loss"])
        engine.step()
        if run.ema is not None and engine.global_steps == step:  # an optimizer step, not an accumulation
            run.ema.update(engine.module)
        state.add(averaged)
        window_steps += 1
        if run.rank == 0 and engine.is_gradient_accumulation_boundary() and engine.global_steps % training.log_every_steps == 0:
            now = time.perf_counter()
            speed = window_steps * run.images_per_step / (now - window_start)
            window_start, window_steps = now, 0
            _log_step(run, epoch, averaged, speed)
        now = time.perf_counter()
        state.train_seconds, tick = state.train_seconds + now - tick, now
        if budget_s is not None and state.micro_steps % training.grad_accum == 0:
            # Every rank reads the same clock: the LR follows it, and all stop at the same step.
            elapsed = _agreed_seconds(state.train_seconds)
            set_schedule_clock(run.scheduler, elapsed)
            out_of_time = elapsed >= budget_s
            if out_of_time:
                break
        if cfg.evaluation.every_steps and engine.global_steps % cfg.evaluation.every_steps == 0:
            ray.train.report(run.evaluate(epoch))
            tick = time.perf_counter()
    return None, out_of_time


def _warn_if_failed(done: Future) -> None:
    if done.exception() is not None:
        log.warning("rank 0's tracking beside training failed", exc_info=done.exception())


def _log_step(run: WorkerRun, epoch: int, averaged: dict[str, float], speed: float) -> None:
    """Rank 0: this step's losses, LR and throughput to the progress display and MLflow, off the training thread."""
    lr, step = run.scheduler.get_last_lr()[0], run.engine.global_steps
    run.beside(
        run.progress.send, "step", epoch=epoch + 1, step=step, losses=averaged, lr=lr, images_per_s=speed,
        train_seconds=run.state.train_seconds,
    )  # fmt: skip
    run.beside(run.tracker.log_metrics, {**averaged, "lr": lr, "images_per_s": speed}, step=step)


def _evaluate_and_checkpoint(run: WorkerRun, epoch: int, *, out_of_time: bool) -> None:
    """The epoch's metrics (scored at evaluation and checkpoint epochs) reported to Ray Train,
    with every rank's part of a DeepSpeed checkpoint at checkpoint epochs and at the end."""
    cfg, engine, state = run.cfg, run.engine, run.state
    training = cfg.training
    train_seconds = time.perf_counter() - state.epoch_start
    state.epoch = epoch + 1
    metrics = {
        "epoch": state.epoch,
        "step": engine.global_steps,
        "lr": run.scheduler.get_last_lr()[0],
        "images_per_s": state.micro_steps * run.images_per_step / max(train_seconds, 1e-9),
        "data_wait_s": state.data_wait_s,  # time this rank waited for batches: the pipeline's share
        "nonfinite_steps": state.nonfinite_steps,
        "train_seconds": state.train_seconds,
        **state.epoch_losses(),
    }
    if run.tracker is not None:  # epoch means, named apart from the per-step values; after the step logs
        run.beside(run.tracker.log_metrics, _epoch_summary(metrics), step=engine.global_steps)
    last = state.epoch == training.epochs or out_of_time
    save = last or state.epoch % training.checkpoint.every_epochs == 0
    if save or state.epoch % cfg.evaluation.every_epochs == 0:
        # A checkpoint is always scored: Ray Train keeps the best ones by that score.
        metrics.update(run.evaluate(epoch))
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="anchorless-ckpt-") as tmp:
        client_state = {"epoch": state.epoch, "nonfinite_steps": state.nonfinite_steps, "train_seconds": state.train_seconds}
        save_engine(engine, tmp, {**client_state, **(run.ema.state() if run.ema is not None else {})})
        if run.rank == 0:
            state_json = {**client_state, "step": engine.global_steps, "run_id": run.plan.run_id, "metrics": metrics}
            Path(tmp, STATE_FILE).write_text(json.dumps(state_json, indent=2, default=float))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=_checkpoint_dir_name(state.epoch, engine.global_steps),
        )


def load_keeping_hyperparameters(engine: Any, scheduler: Any, checkpoint_dir: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights, optimizer moments and step, keeping this run's hyperparameters.

    DeepSpeed's ``load_checkpoint`` also restores the optimizer's param-group settings
    (lr, weight decay, betas or momentum) and the LR schedule (base LRs, shape). After a
    PBT exploit the checkpoint is another trial's and this config's values must win:
    the schedule becomes this config's, continued at the loaded step. On a plain resume
    the two agree. Returns the client state saved with the checkpoint.
    """
    optimizer = scheduler.optimizer  # the torch optimizer DeepSpeed steps (inside any ZeRO/bf16 wrapper)
    own_groups = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    own_schedule = scheduler.state_dict()
    # load_state_dict updates the schedule objects in place, so keep copies of this config's.
    own_factors = [copy.copy(factor) for factor in scheduler.lr_lambdas]
    saved = load_engine(engine, checkpoint_dir)
    loaded = scheduler.state_dict()
    step = loaded["last_epoch"]
    lrs = [base * factor(step) for base, factor in zip(own_schedule["base_lrs"], own_factors)]
    scheduler.load_state_dict(
        {**own_schedule, "last_epoch": step, "_step_count": loaded["_step_count"], "_last_lr": lrs}
    )
    for group, own, lr in zip(optimizer.param_groups, own_groups, lrs):
        group.update(own, lr=lr)
    return saved


def _report_as_result(checkpoint: ray.train.Checkpoint, rank: int, tracker: Any) -> None:
    """Report the start checkpoint as this run's own, with the metrics it was saved with.

    Every rank reports (Ray Train waits for all); rank 0 hands over the directory, which
    holds every rank's part, and logs those metrics to this run's MLflow run, so that its
    latest values describe the model it ends with.
    """
    state = json.loads((Path(checkpoint.path) / STATE_FILE).read_text())
    if tracker is not None:
        tracker.log_metrics(_epoch_summary(state.get("metrics", {})), step=state["step"])
    ray.train.report(
        state.get("metrics", {}),
        checkpoint=checkpoint if rank == 0 else None,
        checkpoint_dir_name=_checkpoint_dir_name(state["epoch"], state["step"]),
    )


def _epoch_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """An epoch's metrics as MLflow gets them: the epoch means of values also logged per step
    (throughput, LR, every loss term) are named apart, ``epoch_lr``, ``epoch_loss_cls``, ..."""
    return {f"epoch_{k}" if k in ("images_per_s", "lr") or k.startswith("loss") else k: v for k, v in metrics.items()}


def _checkpoint_dir_name(epoch: int, step: int) -> str:
    return f"checkpoint_epoch{epoch:04d}_step{step:07d}"


def _timed(batches: Iterator[Any], state: LoopState) -> Iterator[Any]:
    """The batches, adding the time spent waiting for each to ``state.data_wait_s`` (reset per epoch)."""
    state.data_wait_s = 0.0
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        state.data_wait_s += time.perf_counter() - start
        yield batch


def _agreed_seconds(seconds: float) -> float:
    """The largest of the ranks' training seconds, on every rank: their clocks differ by a few
    milliseconds, and ranks must take the same LR and stop at the same step (or the next
    collective hangs)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _mean_over_ranks(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each loss term averaged over ranks, in one all-reduce; every rank gets the same numbers."""
    names = sorted(losses)
    values = torch.stack([losses[name].detach().float().reshape(()) for name in names])  # (T,)
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.to(_collective_device())
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(names, values.tolist()))


def _collective_device() -> torch.device:
    """Where a small all-reduce's tensor must live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _nonfinite_message(bad: list[str], averaged: dict[str, float], *, step: int, epoch: int) -> str:
    # `loss` is the sum, so it is bad whenever a term is; name the terms when they are known.
    terms = [name for name in bad if name != "loss"] or bad
    values = ", ".join(f"{name}={averaged[name]}" for name in terms)
    return (
        f"non-finite loss at step {step} (epoch {epoch}): {values}; the last good checkpoint is kept. "
        "Lower training.optimizer.lr, raise training.schedule.warmup_steps, or set training.on_nonfinite=skip"
    )


def _maybe_inject_fault(
    fault: Fault | None, losses: dict[str, torch.Tensor], *, rank: int, step: int
) -> dict[str, torch.Tensor]:
    """Test hook, once per run (a marker file says "done"): at ``step`` on ``rank``, either
    SIGKILL this worker process or make one loss term NaN."""
    if fault is None or fault.rank != rank or fault.step != step:
        return losses
    marker = Path(fault.marker)
    if marker.exists():
        return losses
    marker.write_text(f"{fault.kind} on rank {rank} at step {step}\n")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    poisoned = dict(losses)
    poisoned[fault.term] = losses[fault.term] * float("nan")
    poisoned["loss"] = sum(value for name, value in poisoned.items() if name != "loss")
    return poisoned


def _evaluate(run: WorkerRun, epoch: int) -> dict[str, Any]:
    """Predict this rank's part of the validation split; rank 0 scores all of it.

    Returns the metrics on rank 0 and ``{}`` elsewhere (Ray Train keeps rank 0's).
    """
    if run.val_shard is None:
        return {}
    cfg, engine = run.cfg, run.engine
    model = run.scored_model
    dtype = next(model.parameters()).dtype
    predictions: list[tuple[int, dict[str, Any]]] = []  # (image id, detections in original pixels)
    samples: list[dict[str, Any]] = []
    for batch in run.val_shard.iter_batches(
        batch_size=cfg.evaluation.batch_size, batch_format="numpy", prefetch_batches=cfg.data.prefetch_batches
    ):
        images, _, meta = to_model_inputs(batch, engine.device)
        # Clipped to the image as offline evaluation does: the letterbox padding is not image.
        detections = batch_to_original_pixels(model.predict(images.to(dtype)), meta)
        for i, original in enumerate(detections):
            image_id, scale = int(meta["image_id"][i]), float(meta["scale"][i])
            predictions.append((image_id, {k: v.numpy() for k, v in original.items()}))
            if run.rank == 0 and len(samples) < NUM_SAMPLE_IMAGES:
                samples.append({"image": batch["image"][i], "image_id": image_id, "scale": scale})
    gathered: list[Any] = [predictions]
    if run.world_size > 1:
        gathered = [None] * run.world_size
        dist.all_gather_object(gathered, predictions)
    if run.rank != 0:
        return {}
    with pycocotools_quiet():
        return _score(run, gathered, samples, epoch)


def _score(run: WorkerRun, gathered: list[Any], samples: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    """Rank 0: COCO AP and duplicate rate of all ranks' predictions, logged to MLflow."""
    everything = [item for part in gathered for item in part]
    image_ids = [image_id for image_id, _ in everything]
    detections = [{k: torch.from_numpy(v) for k, v in detection.items()} for _, detection in everything]
    coco_gt = _ground_truth(run.plan.val_dir)
    summary, results = score_detections(
        coco_gt, detections, image_ids, run.plan.label_to_category_id,
        duplicate_score_threshold=run.cfg.evaluation.duplicate_score_threshold,
        duplicate_iou_threshold=run.cfg.evaluation.duplicate_iou_threshold,
    )  # fmt: skip
    summary["num_images"] = len(image_ids)
    metrics = {key: value for key, value in summary.items() if isinstance(value, (int, float))}
    step = run.engine.global_steps
    if run.tracker is not None:
        run.beside(run.tracker.log_metrics, metrics, step=step)
        run.beside(log_evaluation, run.tracker, summary, step, coco_gt, results, samples)
    if run.progress is not None:
        run.beside(run.progress.send, "evaluation", epoch=epoch + 1, step=step, metrics=metrics)
    return metrics


_GROUND_TRUTH: dict[str, dict[str, Any]] = {}


def _ground_truth(val_dir: str) -> dict[str, Any]:
    """The validation split's COCO ground truth, read once per worker process."""
    if val_dir not in _GROUND_TRUTH:
        _GROUND_TRUTH[val_dir] = coco_ground_truth(val_dir)
    return _GROUND_TRUTH[val_dir]
