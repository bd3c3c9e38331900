"""Training tricks beside the engine: an EMA of the weights, and label smoothing.

:class:`WeightEma` (``training.ema``) is torch's ``AveragedModel`` with an EMA whose decay
warms up as ``decay * (1 - exp(-updates / tau))`` (YOLOX's ramp). It is updated after every
optimizer step from the parameters the step left, which are the same on every rank: plain
data parallelism and ZeRO stages 1 and 2 end each step with the full updated parameters on
every rank (the config allows no stage 3, whose ranks each hold a slice). BatchNorm running
statistics are averaged too (``use_buffers``); those differ between ranks (each sees its own
batches), and since the average is linear with the same decay everywhere, averaging the
EMA's statistics over ranks before it is scored or saved
(:func:`~anchorless.platform.training.engine.average_batchnorm_statistics`) gives exactly
the EMA of the rank-averaged statistics: the same model on every rank.

:func:`apply_label_smoothing` (``training.label_smoothing``) sets the smoothing of every
sigmoid focal classification loss of a detector (OneNet, FCOS and their kin).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from anchorless.detectors.losses.focal import FocalLoss
from anchorless.platform.config import ConfigError, EmaConfig
from anchorless.platform.training.engine import EMA_UPDATES_KEY, EMA_WEIGHTS_KEY


def ema_decay(decay: float, tau: float, updates: int) -> float:
    """The decay of update number ``updates`` (0 for the first): small at first, ``decay`` in the end."""
    return decay * (1 - math.exp(-updates / tau))


class WeightEma:
    """An exponential moving average of a model's parameters and buffers, kept in float32."""

    def __init__(self, model: torch.nn.Module, config: EmaConfig) -> None:
        self.decay, self.tau = config.decay, config.tau
        self._step_decay = 0.0
        # A per-tensor avg_fn rather than torch's get_ema_multi_avg_fn: that one has a fixed
        # decay, needs the average and the model in one dtype (a bf16 engine's module is not:
        # an EMA kept in bf16 would lose every update smaller than bf16's precision), and has
        # no answer for integer buffers (BatchNorm's num_batches_tracked).
        self.averaged = AveragedModel(model, avg_fn=self._average, use_buffers=True).float()
        self.averaged.requires_grad_(False)

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current
        return torch.lerp(averaged, current.to(averaged.dtype), 1 - self._step_decay)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged detector (what is evaluated, checkpointed and exported)."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold in the model as the last optimizer step left it (the first update copies it)."""
        self._step_decay = ema_decay(self.decay, self.tau, self.updates)
        self.averaged.update_parameters(model)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (tensors and an int: read back with ``weights_only``)."""
        return {EMA_WEIGHTS_KEY: self.module.state_dict(), EMA_UPDATES_KEY: self.updates}

    def load_state(self, saved: dict[str, Any]) -> bool:
        """Restore from a checkpoint's client state; False (and a fresh start) when it has no EMA."""
        if EMA_WEIGHTS_KEY not in saved:
            return False
        self.module.load_state_dict(saved[EMA_WEIGHTS_KEY])
        self.averaged.n_averaged.fill_(int(saved[EMA_UPDATES_KEY]))
        return True


def apply_label_smoothing(model: torch.nn.Module, epsilon: float) -> int:
    """Smooth the targets of every sigmoid focal classification loss in ``model``; returns how many.

    A detector without one refuses a non-zero ``epsilon``: CenterNet's and CornerNet's
    Gaussian heatmaps are soft targets already, and GFL's quality focal loss trains
    towards the IoU, not towards 1.
    """
    losses = [module for module in model.modules() if isinstance(module, FocalLoss)]
    if epsilon and not losses:
        raise ConfigError(
            f"training.label_smoothing={epsilon:g}: {type(model).__name__} has no sigmoid focal classification "
            "loss to smooth (Gaussian heatmap and quality focal losses have soft targets already); set it to 0"
        )
    for loss in losses:
        loss.label_smoothing = epsilon
    return len(losses)
