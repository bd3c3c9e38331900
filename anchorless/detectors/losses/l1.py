"""L1 loss, summed and optionally weighted per row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anchorless.detectors.losses.base import Normalizer, weighted_sum


class L1Loss(nn.Module):
    """Summed absolute error, optionally weighted per row."""

    def __init__(self, *, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        normalizer: Normalizer,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = F.l1_loss(pred, target, reduction="none")  # (N, D)
        return weighted_sum(loss, self.weight, normalizer, weights)
