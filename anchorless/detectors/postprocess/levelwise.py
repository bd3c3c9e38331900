"""Per-level decoding of dense pyramid detectors (FCOS, GFL): score threshold and top-k per
level, box decoding of the candidates, then NMS over all levels and the top-k.

Shapes: B images, C classes, R = locations of all levels, R_l those of level l.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import clip_boxes_to_image

from anchorless.detectors.postprocess.base import Postprocess
from anchorless.detectors.postprocess.box_coding import decode_ltrb
from anchorless.detectors.postprocess.nms import NMSKind


class LevelwisePostprocess(Postprocess):
    """FCOS-style post-processing: candidates are first limited per pyramid level.

    Args:
        pre_nms_topk: candidates kept per level before NMS (1000).
        score_threshold: here applied to the classification probability before it is
            combined with centerness (0.05, as the official FCOS does).
        (topk, nms, nms_iou, nms_sigma, nms_beta, nms_min_score as in :class:`Postprocess`;
        hard NMS at IoU 0.6 for FCOS and GFL.)
    """

    def __init__(
        self,
        *,
        nms: bool | NMSKind = True,
        score_threshold: float = 0.05,
        pre_nms_topk: int = 1000,
        **postprocess: Any,
    ) -> None:
        super().__init__(nms=nms, score_threshold=score_threshold, **postprocess)
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

    def forward_padded(
        self,
        cls_probs: torch.Tensor,
        ltrb: torch.Tensor,
        points: torch.Tensor,
        level_sizes: Sequence[int],
        image_size: tuple[int, int],
        quality: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` batch-wide with fixed shapes (see ``select_padded``): a location under
        the threshold scores 0 instead of leaving the batch, and each level gives its
        ``pre_nms_topk`` best (location, class) pairs."""
        num_classes = cls_probs.shape[-1]
        qualities = quality.split(level_sizes, dim=1) if quality is not None else [None] * len(level_sizes)
        levels = zip(cls_probs.split(level_sizes, dim=1), ltrb.split(level_sizes, dim=1), points.split(level_sizes), qualities)
        kept_boxes, kept_scores, kept_labels = [], [], []
        for probs, distances, locations, level_quality in levels:  # (B, R_l, C), (B, R_l, 4), (R_l, 2), (B, R_l)
            scores = probs * (probs > self.score_threshold)  # (B, R_l, C)
            if level_quality is not None:
                scores = scores * level_quality.unsqueeze(-1)
            top, flat_idx = scores.flatten(1).topk(min(self.pre_nms_topk, probs[0].numel()), dim=1)  # (B, N_l)
            point_idx, labels = flat_idx // num_classes, flat_idx % num_classes  # (B, N_l)
            chosen = distances.gather(1, point_idx.unsqueeze(-1).expand(-1, -1, 4))  # (B, N_l, 4)
            kept_boxes.append(decode_ltrb(locations[point_idx], chosen))  # (B, N_l, 4)
            kept_scores.append(top)
            kept_labels.append(labels)
        boxes = clip_boxes_to_image(torch.cat(kept_boxes, dim=1), image_size)  # (B, N, 4) over all levels
        scores = torch.cat(kept_scores, dim=1)  # (B, N)
        if quality is not None:
            scores = scores.sqrt()
        return self.select_padded(boxes, scores, torch.cat(kept_labels, dim=1))
