"""What the driver decides before any worker starts, and what it hands every worker.

:func:`plan_run` checks everything a worker would trip over later (shard directories,
manifest checksums, class count, steps per epoch) and decides whether this is a fresh
run, the resumption of one with the same name, or a run started from another run's
checkpoint. :class:`WorkerPlan` is what each Ray Train worker receives beside the config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anchorless.detectors import build_detector
from anchorless.errors import AnchorlessError, DataError
from anchorless.platform.config import ConfigError, ExperimentConfig
from anchorless.platform.data.pipeline import steps_per_epoch
from anchorless.platform.data.shards import read_manifest, resolve_location
from anchorless.platform.training.engine import CHECKPOINT_SUBDIR, deepspeed_config
from anchorless.platform.training.handover import Fault
from anchorless.platform.training.tricks import apply_label_smoothing

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
# Tracking calls an MLflow outage held back (see tracking.tracker.Outbox), one file per writer.
DRIVER_OUTBOX = "tracking_outbox.driver.jsonl"
RANK0_OUTBOX = "tracking_outbox.rank0.jsonl"
START_DIR = "start"  # copies of other runs' checkpoints this run was started from
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
    storage_path: str | None = None  # Ray Train's storage (checkpoints) when not <workspace>/runs
    storage_filesystem: Any = None  # its pyarrow filesystem, for a URI (s3://...)

    def checkpoint_uri(self, path: str) -> str:
        """A checkpoint path Ray Train reports, as a URI when the storage is remote."""
        if self.storage_filesystem is None or self.storage_filesystem.type_name == "local":
            return path
        return f"{self.storage_filesystem.type_name}://{path}"


def run_name(cfg: ExperimentConfig) -> str:
    name = cfg.tracking.run_name or cfg.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"run name {name!r} (tracking.run_name or name): use letters, digits, '.', '_', '-'")
    return name


def runs_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.workspace).resolve() / "runs"


def _read_shards(shard_dir: str | None, key: str) -> dict[str, Any]:
    if not shard_dir:
        raise ConfigError(f"{key}: no shard directory given (set {key}=PATH, made by `anchorless data shard`)")
    if "://" not in shard_dir and not Path(shard_dir).is_dir():
        raise DataError(f"{shard_dir}: no such shard directory ({key})")
    return read_manifest(shard_dir, verify=True)


def category_table(manifest: dict[str, Any]) -> list[tuple[int, int, str]]:
    return [(c["label"], c["coco_id"], c["name"]) for c in sorted(manifest["categories"], key=lambda c: c["label"])]


def plan_run(cfg: ExperimentConfig, *, restart: bool = False, start_from: str | os.PathLike[str] | None = None) -> RunPlan:
    """Every check that can fail before a worker starts, each with one clear message.

    With ``start_from`` (another run's checkpoint) this run's own checkpoints will be
    discarded, so they are not checked against the config; the checkpoint must exist
    and have the same ZeRO layout.
    """
    name = run_name(cfg)
    manifest = _read_shards(cfg.data.train, "data.train")
    categories = category_table(manifest)
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
        if category_table(val_manifest) != categories:
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
    if cfg.training.label_smoothing:  # refused here, before any worker starts, by a detector without a focal loss
        apply_label_smoothing(build_detector(cfg.detector), cfg.training.label_smoothing)

    run_dir = runs_root(cfg) / name
    storage_filesystem, storage_path = _checkpoint_storage(cfg)
    resume_run_id = finished = None
    source = _check_start_from(cfg, run_dir, start_from) if start_from is not None else None
    if restart and storage_filesystem is not None:
        _remove_remote_run(storage_filesystem, f"{storage_path}/{name}", cfg.training.checkpoint.storage)
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
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
    )


def _checkpoint_storage(cfg: ExperimentConfig) -> tuple[Any, str | None]:
    """``training.checkpoint.storage`` as (pyarrow filesystem, path in it); (None, None) for the default."""
    storage = cfg.training.checkpoint.storage
    if not storage:
        return None, None
    if "://" not in storage:
        from pyarrow import fs as pafs

        return pafs.LocalFileSystem(), str(Path(storage).resolve())
    return resolve_location(storage)


def _remove_remote_run(filesystem: Any, path: str, shown: str | None) -> None:
    """--restart with checkpoints kept elsewhere: Ray Train would resume what is there."""
    from pyarrow import fs as pafs

    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        filesystem.delete_dir(path)
        log.info("--restart: removed the previous run's checkpoints under %s", shown)


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


def adopt_start_checkpoint(run_dir: Path, source: Path) -> Path:
    """Copy ``source`` into ``run_dir/start/`` and discard the run's own training state.

    The copy keeps the start point while the run that wrote it deletes old checkpoints
    (``keep_best``), and makes this run self-contained. The old state must go, or Ray
    Train would resume this run's own abandoned checkpoints; ``run.json`` (the MLflow
    run) and its tracking outboxes stay, and so does an earlier copy of the same start
    (a retried trial).
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
        for outbox in doomed.glob("tracking_outbox.*"):  # tracking calls still waiting for MLflow
            os.replace(outbox, run_dir / outbox.name)
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


def fault_from_env(run_dir: Path) -> Fault | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, rank, step, *term = spec.split(":")
    if kind not in ("kill", "nan") or (kind == "nan") != bool(term):
        raise ConfigError(f"${FAULT_ENV}={spec!r}: expected kill:RANK:STEP or nan:RANK:STEP:TERM")
    marker = run_dir / f".fault_{kind}_injected"
    return Fault(kind=kind, rank=int(rank), step=int(step), term=term[0] if term else None, marker=str(marker))
