"""What the driver hands every Ray Train worker beside the config, in a module that imports
nothing but the standard library.

Ray Train's controller unpickles the workers' loop config only to pass it on, and unpickling
a class imports its module: when these lived beside the driver's planning code, the
controller of every run imported the detectors, torch and the data pipeline with it (2.9
CPU-s of a two-CPU machine per run, read from Ray's worker logs with
``PYTHONPROFILEIMPORTTIME=1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fault:
    """A fault to inject once (test hook, from ``$ANCHORLESS_FAULT``); ``marker`` records it happened."""

    kind: str  # "kill" (SIGKILL the worker) or "nan" (make a loss term NaN)
    rank: int
    step: int  # the optimizer step it happens before
    term: str | None  # the loss term, for "nan"
    marker: str


@dataclass(frozen=True)
class WorkerPlan:
    """What every Ray Train worker is handed beside the config: the driver's decisions."""

    run_id: str  # the MLflow run rank 0 logs to
    tracking_uri: str
    deepspeed_config: dict[str, Any]
    total_steps: int  # optimizer steps of the whole run (the LR schedule's length)
    micro_steps_per_epoch: int  # batches per rank per epoch, the same on every rank
    val_dir: str | None
    label_to_category_id: list[int]  # COCO category id of each contiguous label
    progress_queue: Any = None  # the driver's progress display
    fault: Fault | None = None
    start_checkpoint: str | None = None  # another run's checkpoint to start from until this run has its own
    outbox: str | None = None  # where rank 0 keeps the tracking calls an MLflow outage held back
    quiet: bool = True  # keep Ray's, Ray Data's and DeepSpeed's start-up chatter out of the worker logs
