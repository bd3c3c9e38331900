"""NMS-free selection for dense one-to-one detectors (OneNet): the top-k (location, class) pairs."""

from __future__ import annotations

import torch


def topk_dense(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k over all (location, class) pairs of one image; no NMS.

    scores (R, C) -> (top_scores (K,), point_idx (K,), labels (K,)) with K = min(k, R*C),
    highest first.
    """
    num_classes = scores.shape[1]
    top_scores, flat_idx = scores.flatten().topk(min(k, scores.numel()))  # (K,)
    return top_scores, flat_idx // num_classes, flat_idx % num_classes
