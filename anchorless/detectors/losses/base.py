"""The reduction every loss module shares: ``weight * sum(loss) / normalizer``.

The normaliser (number of positives etc.) is explicit and computed by the detector
(averaged across ranks), never an accident of ``mean()``.
"""

from __future__ import annotations

import torch

Normalizer = float | torch.Tensor


def weighted_sum(
    loss: torch.Tensor, weight: float, normalizer: Normalizer, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight * sum(loss) / normalizer``; ``weights`` (N,) scales each row of ``loss`` (N, ...) first."""
    if weights is not None:
        loss = loss * weights.view(-1, *([1] * (loss.dim() - 1)))
    return weight * loss.sum() / normalizer
