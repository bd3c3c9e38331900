"""The DeepSpeed engine a training worker wraps its detector in, built from the config.

:func:`deepspeed_config` turns the ``training`` section into the DeepSpeed JSON (ZeRO
stage, precision, clipping, accumulation, optimizer); :class:`WarmupSchedule` is the
learning-rate factor (linear warmup, then cosine, step or constant); :func:`build_engine`
hands both to ``deepspeed.initialize``. The JSON actually used is written into the run
directory by the driver, so what ran can always be read back.

Choices, measured on this project's CPU machine:

* The optimizer is named in the JSON but DeepSpeed builds ``torch.optim.AdamW``
  (``torch_adam: true``, ``foreach``) or ``torch.optim.SGD``: DeepSpeed's own fused
  Adam compiles a C++ op on first use (54 s here) and saves ~20 ms of a ~0.8 s
  ResNet-18 step, so the compile would cost a short run more than it gains.
* The schedule is a ``torch.optim.lr_scheduler.LambdaLR`` passed to
  ``deepspeed.initialize``: DeepSpeed's schedulers have warmup+cosine but no
  warmup+milestone step schedule, and one plain factor function serves all three
  kinds and is easy to test. DeepSpeed steps it once per optimizer step (at
  gradient-accumulation boundaries) and saves it in every checkpoint.

Checkpoints cannot run code. A checkpoint file is a pickle, and PBT loads checkpoints other
trials wrote (and a shared bucket lets anyone who can write there write one), so every
file is read with ``torch.load(weights_only=True)``: tensors, plain data and the four
DeepSpeed types its checkpoints hold (:func:`deepspeed_checkpoint_types`), nothing that
can name a function to call. DeepSpeed's own loader asks for ``weights_only=False``, so
:func:`build_engine` gives the engine a checkpoint engine that reads through
:func:`load_checkpoint_file` instead. A file holding anything else is refused, naming it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import math
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from anchorless.errors import AnchorlessError
from anchorless.platform.config import ScheduleConfig, TrainingConfig

_log = logging.getLogger("anchorless.engine")

# Every Ray Train checkpoint directory holds one DeepSpeed checkpoint under this tag.
CHECKPOINT_SUBDIR = "deepspeed"
CHECKPOINT_TAG = "state"
# The EMA of the weights (training.ema) in a checkpoint's client state, which DeepSpeed keeps in
# rank 0's model-states file beside the trained weights.
EMA_WEIGHTS_KEY = "ema_module"
EMA_UPDATES_KEY = "ema_updates"
# DeepSpeed prints a line every `steps_per_print` steps; progress is ours to show.
_NEVER = 2**31 - 1


class CheckpointError(AnchorlessError):
    """A checkpoint that cannot be written (a full disk) or must not be read (it could run code)."""


def deepspeed_config(training: TrainingConfig, *, batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``world_size`` workers with ``batch_size`` images each per micro-step."""
    optimizer = training.optimizer
    if optimizer.name == "adamw":
        optimizer_json = {
            "type": "AdamW",
            "params": {
                "lr": optimizer.lr,
                "betas": list(optimizer.betas),
                "weight_decay": optimizer.weight_decay,
                "torch_adam": True,  # see the module docstring: no C++ compile
                "foreach": True,  # multi-tensor update, ~2x faster than the per-tensor loop on CPU
            },
        }
    else:
        optimizer_json = {
            "type": "SGD",  # not a DeepSpeed optimizer name: DeepSpeed builds torch.optim.SGD
            "params": {
                "lr": optimizer.lr,
                "momentum": optimizer.momentum,
                "weight_decay": optimizer.weight_decay,
            },
        }
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": training.grad_accum,
        "train_batch_size": batch_size * training.grad_accum * world_size,
        "gradient_clipping": training.grad_clip or 0.0,
        "optimizer": optimizer_json,
        "zero_optimization": {"stage": training.zero_stage},
        # ZeRO 1/2 accept any torch optimizer; DeepSpeed only warns it has not tested them all.
        "zero_allow_untested_optimizer": True,
        # On CPU bf16 is autocast around the forward (``training_autocast``), not DeepSpeed's
        # bf16 mode: that keeps bf16 weights and all-reduces bf16 gradients over gloo.
        "bf16": {"enabled": training.precision == "bf16" and training.use_gpu},
        "fp16": {"enabled": training.precision == "fp16"},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


@dataclass
class WarmupSchedule:
    """Learning-rate factor after ``step`` optimizer steps out of ``total_steps``.

    Linear warmup from ``warmup_factor`` to 1 over ``warmup_steps``, multiplied with the
    main schedule over the whole run: cosine from 1 to ``min_lr_ratio``, a step schedule
    multiplying by ``gamma`` at each milestone (fractions of the run), or constant.

    With a time budget (``budget_seconds``) the run's length is seconds, not steps: the
    main schedule's progress is ``seconds / budget_seconds``, where ``seconds`` is the
    training time so far that the worker sets after every step (:func:`set_schedule_clock`,
    a value all ranks agree on), and the warmup runs over ``warmup_seconds`` when given
    (else still ``warmup_steps``). The LR is at its final value once the budget is spent.
    A dataclass rather than a closure so ``LambdaLR.state_dict`` can save it (``seconds`` too).
    """

    total_steps: int
    kind: str = "cosine"
    warmup_steps: int = 0
    warmup_factor: float = 1.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    budget_seconds: float | None = None
    warmup_seconds: float | None = None
    seconds: float = 0.0  # training seconds so far; read only with a budget

    @classmethod
    def from_config(
        cls, schedule: ScheduleConfig, total_steps: int, budget_seconds: float | None = None
    ) -> "WarmupSchedule":
        return cls(
            total_steps=max(1, total_steps),
            kind=schedule.kind,
            warmup_steps=schedule.warmup_steps,
            warmup_factor=schedule.warmup_factor,
            milestones=tuple(schedule.milestones),
            gamma=schedule.gamma,
            min_lr_ratio=schedule.min_lr_ratio,
            budget_seconds=budget_seconds,
            warmup_seconds=schedule.warmup_seconds if budget_seconds else None,
        )

    def __call__(self, step: int) -> float:
        if self.budget_seconds:
            progress = min(self.seconds, self.budget_seconds) / self.budget_seconds
        else:
            progress = min(step, self.total_steps) / self.total_steps
        if self.kind == "cosine":
            factor = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        elif self.kind == "step":
            factor = self.gamma ** sum(progress >= milestone for milestone in self.milestones)
        else:
            factor = 1.0
        if self.warmup_seconds:
            warmup = min(1.0, self.seconds / self.warmup_seconds)
        else:
            warmup = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        return factor * (self.warmup_factor * (1 - warmup) + warmup)


def lr_scheduler_factory(
    schedule: ScheduleConfig, total_steps: int, budget_seconds: float | None = None
) -> Callable[[torch.optim.Optimizer], Any]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` calls with the optimizer it built."""
    factor = WarmupSchedule.from_config(schedule, total_steps, budget_seconds)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_schedule_clock(scheduler: torch.optim.lr_scheduler.LambdaLR, seconds: float) -> list[float]:
    """Tell a budgeted schedule the training seconds spent and apply the LR that follows now.

    DeepSpeed steps the scheduler inside ``engine.step()``, before the worker knows the
    step's time; re-applying here makes the next step's LR follow the clock without a
    step's lag, so the LR is at its final value the moment the budget is spent. ``seconds``
    must be the same on every rank. Returns the LRs now in force.
    """
    lrs = []
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        factor.seconds = seconds
        group["lr"] = lr = base_lr * factor(scheduler.last_epoch)
        lrs.append(lr)
    scheduler._last_lr = lrs  # what get_last_lr() reports (logging, checkpoints' metrics)
    return lrs


def quiet_deepspeed() -> None:
    """DeepSpeed logs its set-up at INFO on every rank; keep warnings and errors only."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency
        pass


def use_this_environments_ninja() -> None:
    """Put this Python environment's scripts directory, with the ``ninja`` DeepSpeed installs,
    first on this process's PATH.

    DeepSpeed builds its CPU communication op with torch's extension builder, which runs the
    first ``ninja`` on PATH into one shared build cache. A process whose PATH lacks the
    environment's scripts (a worker of a Ray started by ``python -m``) found the system's
    ninja instead; two ninja versions each take the other's build log as stale, so runs
    alternating between them rebuilt the op every time (~40 s on two cores).
    """
    scripts = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(scripts, "ninja")) and path.split(os.pathsep)[0] != scripts:
        os.environ["PATH"] = os.pathsep.join([scripts, path]) if path else scripts


def build_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    schedule: ScheduleConfig,
    total_steps: int,
    budget_seconds: float | None = None,
) -> tuple[Any, torch.optim.lr_scheduler.LRScheduler]:
    """Wrap ``model`` in a DeepSpeed engine; the process group must already exist (Ray Train made it)."""
    use_this_environments_ninja()
    quiet_deepspeed()
    # DeepSpeed prints its op builds to stdout on every rank; the exceptions still surface.
    with contextlib.redirect_stdout(io.StringIO()):
        import deepspeed

        quiet_deepspeed()  # importing deepspeed may have reset its logger
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lr_scheduler_factory(schedule, total_steps, budget_seconds),
        )
    engine.checkpoint_engine = _weights_only_checkpoint_engine(engine.checkpoint_engine)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # Alone, DeepSpeed would still flatten every gradient and all-reduce it with itself
        # (~40 ms of a ~500 ms ResNet-18 step on one CPU thread). ZeRO's optimizer gathers
        # its gradients in that same call, so it keeps it.
        engine.enable_backward_allreduce = False
    return engine, scheduler


def training_autocast(training: TrainingConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the training forward runs in: bf16 autocast for ``precision=bf16`` on CPU.

    On GPU bf16/fp16 are DeepSpeed's modes (the model itself is cast), so nothing is added.
    The detectors keep their losses in float32 under it.
    """
    if training.precision != "bf16" or device.type != "cpu":
        return contextlib.nullcontext()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # torch's own test for native bf16 kernels
        _log.warning("precision=bf16: this CPU has no native bf16 (AVX512-BF16/AMX); training will be slower than fp32")
    return torch.autocast("cpu", dtype=torch.bfloat16)


BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def average_batchnorm_statistics(model: torch.nn.Module) -> int:
    """Average BatchNorm running means and variances over ranks, in one all-reduce.

    Each rank updates its running statistics from its own batches and neither DeepSpeed
    nor the optimizer step syncs buffers, so without this every rank would hold a slightly
    different model: validation (each rank predicts its share) would score a blend of them,
    and the checkpoint keeps rank 0's alone. Called before every evaluation and checkpoint,
    so the scored model is the saved one. Returns the number of tensors averaged.
    """
    buffers = [
        stat for module in model.modules() if isinstance(module, BATCHNORMS)
        for stat in (module.running_mean, module.running_var) if stat is not None
    ]  # fmt: skip
    if not buffers or not torch.distributed.is_initialized() or torch.distributed.get_world_size() < 2:
        return 0
    flat = torch.cat([stat.detach().float().flatten() for stat in buffers])  # averaged in float32
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    # copy_ in place (not torch's vector_to_parameters, which rebinds .data): each buffer keeps
    # its own dtype and the tensor DeepSpeed and the optimizer already hold.
    for stat, averaged in zip(buffers, flat.split([stat.numel() for stat in buffers])):
        stat.copy_(averaged.view_as(stat))
    return len(buffers)


@functools.cache
def deepspeed_checkpoint_types() -> tuple[type, ...]:
    """The non-tensor types DeepSpeed pickles into the checkpoints of ZeRO 0-2 (found by loading
    each file it writes with ``weights_only=True``): plain classes and an enum, constructed
    from their fields, never called with arguments a file chooses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def load_checkpoint_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """One checkpoint file, read with ``weights_only=True``; a :class:`CheckpointError` naming it
    for a file that holds anything that could run code, or is not a checkpoint at all."""
    import torch.serialization

    try:
        with torch.serialization.safe_globals(list(deepspeed_checkpoint_types())):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(exc))
        detail = found.group(1) if found else str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain data ({detail.strip()}); "
            "a checkpoint that could run code is never loaded. Was it written by another program, or changed?"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except (RuntimeError, EOFError, OSError) as exc:  # torch's zip reader on a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint file ({str(exc).splitlines()[0]})") from None


def _weights_only_checkpoint_engine(current: Any) -> Any:
    """DeepSpeed's torch checkpoint engine, reading every file through :func:`load_checkpoint_file`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(current) is not TorchCheckpointEngine:  # our config never asks for another one
        raise CheckpointError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}; only torch's is read safely")
    current.__class__ = _weights_only_engine_class()  # the same settings (serialisation, name), a safe load
    return current


@functools.cache
def _weights_only_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch.save/torch.load engine, loading with ``weights_only=True``."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_checkpoint_file(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine


def save_engine(engine: Any, checkpoint_dir: str | Path, client_state: dict[str, Any]) -> None:
    """Every rank writes its part of the DeepSpeed checkpoint (model, optimizer, LR schedule).

    A write that fails (a full disk) removes the part it left and raises a
    :class:`CheckpointError`: a half-written checkpoint never looks like one, and the
    checkpoints written before are untouched (each lives in its own directory).
    """
    target = Path(checkpoint_dir) / CHECKPOINT_SUBDIR
    existed = target.exists()
    try:
        engine.save_checkpoint(str(target), tag=CHECKPOINT_TAG, client_state=client_state)
    except OSError as exc:
        if not existed:
            shutil.rmtree(target, ignore_errors=True)
        reason = "the file system is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(
            f"{checkpoint_dir}: cannot write the training checkpoint ({reason}); "
            "nothing of it is kept, and the previous checkpoint is intact and resumable"
        ) from exc


def load_engine(engine: Any, checkpoint_dir: str | Path) -> dict[str, Any]:
    """Restore model, optimizer and LR schedule; returns the client state saved with them.

    Every file is read with ``weights_only=True`` (the engine came from :func:`build_engine`).
    """
    path, client_state = engine.load_checkpoint(str(Path(checkpoint_dir) / CHECKPOINT_SUBDIR), tag=CHECKPOINT_TAG)
    if path is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no DeepSpeed checkpoint under {CHECKPOINT_SUBDIR}/{CHECKPOINT_TAG}")
    return client_state or {}


def model_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The detector's weights from a checkpoint directory, without DeepSpeed or a process group.

    With ZeRO 0/1/2 rank 0's model-states file holds the whole module; under bf16/fp16
    its tensors are in that precision and are returned as float32. A run with
    ``training.ema`` on saved the EMA beside them, and the EMA is what is returned: the
    model that was evaluated is the one exported.
    """
    states = Path(checkpoint_dir) / CHECKPOINT_SUBDIR / CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: not a training checkpoint (no {states.relative_to(checkpoint_dir)})")
    saved = load_checkpoint_file(states)
    weights = saved.get(EMA_WEIGHTS_KEY) or saved["module"]
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment for the training workers: DeepSpeed told the accelerator instead of probing for it."""
    env = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    # Warnings from torch.distributed's C++ side repeat on every rank; keep errors.
    env.setdefault("TORCH_CPP_LOG_LEVEL", os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"))
    return env
