"""Focal losses: torchvision's sigmoid focal loss, and CenterNet's penalty-reduced one on
Gaussian heatmaps."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from anchorless.detectors.losses.base import Normalizer, weighted_sum


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


class FocalLoss(nn.Module):
    """Sigmoid focal loss (torchvision) over logits and {0,1} targets of the same shape.

    ``label_smoothing`` (eps) turns the targets into eps/2 and 1 - eps/2; torchvision's loss
    takes such soft targets as they are.
    """

    def __init__(
        self, *, weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.weight, self.alpha, self.gamma = weight, alpha, gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
        if self.label_smoothing:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / 2
        loss = sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="sum")
        return weighted_sum(loss, self.weight, normalizer)


class GaussianFocalLoss(nn.Module):
    """CenterNet's penalty-reduced focal loss (alpha=2, beta=4) on clamped probabilities."""

    def __init__(self, *, weight: float = 1.0, alpha: float = 2.0, beta: float = 4.0) -> None:
        super().__init__()
        self.weight, self.alpha, self.beta = weight, alpha, beta

    def forward(self, prob: torch.Tensor, heatmap: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
        return weighted_sum(penalty_reduced_focal_loss(prob, heatmap, self.alpha, self.beta), self.weight, normalizer)
