"""Heatmap decoding (CenterNet, and the corner heatmaps to come): 3x3 max-pool peaks, then top-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def heatmap_peaks(heatmap: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Keep a cell only where it is the maximum of its kernel x kernel window (CenterNet).

    heatmap (B, C, H, W) -> same shape, non-peak cells set to 0.
    """
    pooled = F.max_pool2d(heatmap, kernel, stride=1, padding=(kernel - 1) // 2)  # (B, C, H, W)
    return heatmap * (pooled == heatmap)


def topk_heatmap(
    heatmap: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k cells of one image's (C, H, W) map -> (scores, labels, ys, xs), each (K,)."""
    _, height, width = heatmap.shape
    scores, flat_idx = heatmap.flatten().topk(min(k, heatmap.numel()))  # (K,)
    labels = flat_idx // (height * width)
    cell = flat_idx % (height * width)
    return scores, labels, cell // width, cell % width
