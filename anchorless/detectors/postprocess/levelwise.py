"""Per-level decoding of dense pyramid detectors (FCOS; GFL to come): score threshold and
top-k per level, box decoding of the candidates, then NMS over all levels and the top-k.

Shapes: B images, C classes, R = locations of all levels, R_l those of level l.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import clip_boxes_to_image

from anchorless.detectors.postprocess.base import Postprocess
from anchorless.detectors.postprocess.box_coding import decode_ltrb


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

    def forward(
        self,
        cls_probs: torch.Tensor,
        ltrb: torch.Tensor,
        points: torch.Tensor,
        level_sizes: Sequence[int],
        image_size: tuple[int, int],
        quality: torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image, at most ``topk`` each, best first.

        Args:
            cls_probs: (B, R, C) class probabilities, the levels one after another.
            ltrb: (B, R, 4) distances in pixels from each location to its box's sides.
            points: (R, 2) the locations (x, y) in input pixels.
            level_sizes: R_l of each level, summing to R.
            image_size: (height, width) the boxes are clipped to.
            quality: (B, R) probabilities that multiply the class probability (FCOS's
                centerness), or None. The threshold applies to the class probability
                alone; with a quality, the final score is sqrt(class * quality), the
                geometric mean, as the official FCOS reports it.
        """
        detections = []
        for i in range(cls_probs.shape[0]):
            qualities = quality[i].split(level_sizes) if quality is not None else [None] * len(level_sizes)
            levels = zip(
                cls_probs[i].split(level_sizes), ltrb[i].split(level_sizes), points.split(level_sizes), qualities
            )
            kept_boxes, kept_scores, kept_labels = [], [], []
            for probs, distances, locations, level_quality in levels:  # (R_l, C), (R_l, 4), (R_l, 2), (R_l,)
                point_idx, labels = torch.nonzero(probs > self.score_threshold, as_tuple=True)  # (N,)
                scores = probs[point_idx, labels]  # (N,)
                if level_quality is not None:
                    scores = scores * level_quality[point_idx]
                if scores.numel() > self.pre_nms_topk:
                    scores, top = scores.topk(self.pre_nms_topk)
                    point_idx, labels = point_idx[top], labels[top]
                kept_boxes.append(decode_ltrb(locations[point_idx], distances[point_idx]))  # (N, 4)
                kept_scores.append(scores)
                kept_labels.append(labels)
            boxes = clip_boxes_to_image(torch.cat(kept_boxes), image_size)  # (N, 4) over all levels
            scores = torch.cat(kept_scores)  # (N,)
            if quality is not None:
                scores = scores.sqrt()
            detections.append(self.select(boxes, scores, torch.cat(kept_labels)))
        return detections
