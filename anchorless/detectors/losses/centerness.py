"""FCOS centerness: its target from ltrb distances, and its binary cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anchorless.detectors.losses.base import Normalizer, weighted_sum


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """FCOS centerness sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) for (N, 4) ltrb distances."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]  # (N, 2) each
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values) * (tb.min(dim=1).values / tb.max(dim=1).values)
    return torch.sqrt(ratio.clamp(min=0))


class CenternessLoss(nn.Module):
    """FCOS centerness: binary cross-entropy between a logit and the centerness target."""

    def __init__(self, *, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        return weighted_sum(loss, self.weight, normalizer)
