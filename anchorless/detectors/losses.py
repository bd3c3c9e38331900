"""Losses: each formula is a plain function on tensors, each module adds only a
``weight`` and takes the normaliser (number of positives etc.) as an argument.

Every module returns ``weight * sum(loss) / normalizer``: the normaliser is explicit
and computed by the detector (averaged across ranks), never an accident of ``mean()``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)

Normalizer = float | torch.Tensor


def penalty_reduced_focal_loss(
    prob: torch.Tensor, heatmap: torch.Tensor, alpha: float = 2.0, beta: float = 4.0
) -> torch.Tensor:
    """CenterNet's focal loss on a Gaussian heatmap, summed (hand-written: no library has it).

    At cells where the target is exactly 1: -(1-p)^alpha log p. Elsewhere:
    -(1-y)^beta p^alpha log(1-p); the (1-y)^beta factor reduces the penalty near a centre.
    ``prob`` must already be clamped away from 0 and 1 (CenterNet clamps to [1e-4, 1-1e-4]).
    """
    pos = heatmap.eq(1)
    pos_loss = -torch.log(prob) * (1 - prob) ** alpha
    neg_loss = -torch.log(1 - prob) * prob**alpha * (1 - heatmap) ** beta
    return torch.where(pos, pos_loss, neg_loss).sum()


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """FCOS centerness sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) for (N, 4) ltrb distances."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]  # (N, 2) each
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values) * (tb.min(dim=1).values / tb.max(dim=1).values)
    return torch.sqrt(ratio.clamp(min=0))


class FocalLoss(nn.Module):
    """Sigmoid focal loss (torchvision) over logits and {0,1} targets of the same shape."""

    def __init__(self, *, weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.weight, self.alpha, self.gamma = weight, alpha, gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
        loss = sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="sum")
        return self.weight * loss / normalizer


class GaussianFocalLoss(nn.Module):
    """CenterNet's penalty-reduced focal loss (alpha=2, beta=4) on clamped probabilities."""

    def __init__(self, *, weight: float = 1.0, alpha: float = 2.0, beta: float = 4.0) -> None:
        super().__init__()
        self.weight, self.alpha, self.beta = weight, alpha, beta

    def forward(self, prob: torch.Tensor, heatmap: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
        return self.weight * penalty_reduced_focal_loss(prob, heatmap, self.alpha, self.beta) / normalizer


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
        if weights is not None:
            loss = loss * weights[:, None]
        return self.weight * loss.sum() / normalizer


_IOU_LOSSES = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}


class IoULoss(nn.Module):
    """GIoU / DIoU / CIoU loss between matched xyxy boxes (torchvision.ops), weighted per box."""

    def __init__(self, *, weight: float = 1.0, kind: Literal["giou", "diou", "ciou"] = "giou") -> None:
        super().__init__()
        if kind not in _IOU_LOSSES:
            raise ValueError(f"kind must be one of {', '.join(_IOU_LOSSES)}, got {kind!r}")
        self.weight, self.kind = weight, kind

    def forward(
        self,
        pred_boxes: torch.Tensor,
        target_boxes: torch.Tensor,
        normalizer: Normalizer,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = _IOU_LOSSES[self.kind](pred_boxes, target_boxes, reduction="none")  # (N,)
        if weights is not None:
            loss = loss * weights
        return self.weight * loss.sum() / normalizer


class CenternessLoss(nn.Module):
    """FCOS centerness: binary cross-entropy between a logit and the centerness target."""

    def __init__(self, *, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
        return self.weight * F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / normalizer
