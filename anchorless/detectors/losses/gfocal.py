"""Generalized Focal Loss (Li et al., NeurIPS 2020): Quality Focal Loss on a joint
classification-quality score, Distribution Focal Loss on discretised box sides.

Hand-written: torchvision has neither (its focal loss takes hard {0, 1} targets only).
Shapes: N locations, C classes, n + 1 bins of a side's distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anchorless.detectors.losses.base import Normalizer, weighted_sum


def quality_focal_loss(
    pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0, *, from_logits: bool = True
) -> torch.Tensor:
    """QFL = -|y - s|^beta ((1 - y) log(1 - s) + y log s), elementwise, not reduced.

    ``pred`` (N, C) logits (GFL v1) or, with ``from_logits=False``, probabilities (v2's
    classification times quality); ``target`` (N, C) soft labels y in [0, 1]: 0 for every
    negative, the IoU of its decoded box with its ground truth at a positive's class.
    With y in {0, 1} it is the focal loss without alpha.
    """
    if from_logits:
        score = pred.sigmoid()
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    else:
        score = pred
        bce = F.binary_cross_entropy(pred, target, reduction="none")
    return bce * (target - score).abs().pow(beta)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL: cross-entropy towards the two bins around a continuous target, each weighted by
    its nearness: -((y_r - y) log S_l + (y - y_l) log S_r) with y_l = floor(y), y_r = y_l + 1.

    logits (N, n + 1) over the bins 0..n; target (N,) in [0, n) (a target of exactly n has
    no right neighbour: callers clamp below n). Returns (N,).
    """
    left = target.long()  # (N,)
    right = left + 1
    weight_left = right.to(target.dtype) - target  # (N,)
    weight_right = target - left.to(target.dtype)
    return (
        F.cross_entropy(logits, left, reduction="none") * weight_left
        + F.cross_entropy(logits, right, reduction="none") * weight_right
    )


class QualityFocalLoss(nn.Module):
    """:func:`quality_focal_loss` summed, times ``weight``, over the normaliser.

    Args:
        weight: loss weight (1).
        beta: the modulating exponent (2).
    """

    def __init__(self, *, weight: float = 1.0, beta: float = 2.0) -> None:
        super().__init__()
        self.weight, self.beta = weight, beta

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, normalizer: Normalizer, *, from_logits: bool = True
    ) -> torch.Tensor:
        return weighted_sum(quality_focal_loss(pred, target, self.beta, from_logits=from_logits), self.weight, normalizer)


class DistributionFocalLoss(nn.Module):
    """:func:`distribution_focal_loss` summed (optionally weighted per row), times ``weight``,
    over the normaliser."""

    def __init__(self, *, weight: float = 0.25) -> None:
        super().__init__()
        self.weight = weight

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        normalizer: Normalizer,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return weighted_sum(distribution_focal_loss(logits, target), self.weight, normalizer, weights)
