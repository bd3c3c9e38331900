"""Heatmap decoding (CenterNet, and CornerNet's corner and centre heatmaps): 3x3 max-pool
peaks, then the top-k cells, and reading other maps at those cells.

Decoding reads the plain sigmoid: the [1e-4, 1 - 1e-4] clamp of the official codes belongs
to the focal loss alone (at inference it ties neighbouring confident cells, and both would
survive the max-pool).
"""

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
    scores, labels, ys, xs = topk_heatmap_batched(heatmap[None], k)
    return scores[0], labels[0], ys[0], xs[0]


def topk_heatmap_batched(
    heatmap: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k cells of each image of a (B, C, H, W) map -> (scores, labels, ys, xs), each
    (B, K) with K = min(k, C*H*W), best first; fixed shapes, so it traces into a graph."""
    _, _, height, width = heatmap.shape
    cells = height * width
    scores, flat_idx = heatmap.flatten(1).topk(min(k, heatmap[0].numel()), dim=1)  # (B, K)
    labels, cell = flat_idx // cells, flat_idx % cells  # (B, K)
    return scores, labels, cell // width, cell % width


def gather_cells(feature: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """The D values of a (B, D, H, W) map at cells (B, K) -> (B, K, D)."""
    cell = (ys * feature.shape[-1] + xs).unsqueeze(1).expand(-1, feature.shape[1], -1)  # (B, D, K)
    return feature.flatten(2).gather(2, cell).transpose(1, 2)
