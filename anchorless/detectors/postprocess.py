"""Post-processing: NMS-free top-k, 3x3 max-pool peaks, and class-wise NMS.

Every detector ends in :meth:`Postprocess.finalize`, so NMS can be switched on or off
by config for any of them, which is how the NMS-free claim is measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms


def topk_dense(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k over all (location, class) pairs of one image; no NMS.

    scores (R, C) -> (top_scores (K,), point_idx (K,), labels (K,)) with K = min(k, R*C),
    highest first.
    """
    num_classes = scores.shape[1]
    top_scores, flat_idx = scores.flatten().topk(min(k, scores.numel()))  # (K,)
    return top_scores, flat_idx // num_classes, flat_idx % num_classes


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


class Postprocess(nn.Module):
    """The last step of every detector: score threshold, optional NMS, top-k.

    Args:
        topk: detections kept per image (100, the COCO maximum).
        nms: apply class-wise NMS (torchvision batched_nms). Off for the NMS-free
            detectors; on it measures what NMS would still remove.
        nms_iou: IoU above which NMS removes the lower-scoring box.
        score_threshold: detections scoring below it are dropped first.
    """

    def __init__(
        self,
        *,
        topk: int = 100,
        nms: bool = False,
        nms_iou: float = 0.6,
        score_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not 0 < nms_iou <= 1:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        self.topk, self.nms, self.nms_iou, self.score_threshold = topk, nms, nms_iou, score_threshold

    def finalize(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """boxes (N, 4), scores (N,), labels (N,) -> dict of at most topk detections, best first."""
        keep = scores >= self.score_threshold  # (N,)
        return self.select(boxes[keep], scores[keep], labels[keep])

    def select(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Optional NMS, then the topk best; no score threshold."""
        if self.nms:
            keep = batched_nms(boxes, scores, labels, self.nms_iou)  # sorted by score
        else:
            keep = scores.argsort(descending=True)
        keep = keep[: self.topk]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


class LevelwisePostprocess(Postprocess):
    """FCOS-style post-processing: candidates are first limited per pyramid level.

    Args:
        pre_nms_topk: candidates kept per level before NMS (1000).
        score_threshold: here applied to the classification probability before it is
            combined with centerness (0.05, as the official FCOS does).
        (topk, nms, nms_iou as in :class:`Postprocess`; NMS on at IoU 0.6 for FCOS.)
    """

    def __init__(
        self,
        *,
        topk: int = 100,
        nms: bool = True,
        nms_iou: float = 0.6,
        score_threshold: float = 0.05,
        pre_nms_topk: int = 1000,
    ) -> None:
        super().__init__(topk=topk, nms=nms, nms_iou=nms_iou, score_threshold=score_threshold)
        if pre_nms_topk < 1:
            raise ValueError(f"pre_nms_topk must be >= 1, got {pre_nms_topk}")
        self.pre_nms_topk = pre_nms_topk
