"""The last step of every detector: score threshold, optional class-wise NMS, top-k.

Every detector ends in :meth:`Postprocess.finalize` (or :meth:`Postprocess.select`), so NMS
can be switched on or off by config for any of them, which is how the NMS-free claim is
measured.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import batched_nms


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
