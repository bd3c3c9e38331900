"""ATSS, adaptive training sample selection (Zhang et al., CVPR 2020): each object sets its
own IoU threshold from the statistics of its nearest locations.

Shapes: R = locations of all levels of one image, M = its ground-truth boxes, L = levels,
K = candidates per ground truth (topk per level, summed over levels).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_iou

from anchorless.detectors.assigners.base import AssignResult

# The official code requires a positive's centre to lie inside its box by more than this
# (pixels), so a location on the border is not positive.
INSIDE_MARGIN = 0.01


class ATSSAssigner(nn.Module):
    """ATSS: positives are the nearest locations whose anchor IoU beats mean + std.

    Every location carries one square anchor box of side ``anchor_scale * stride`` centred on
    it ("FCOS + ATSS" of the paper and GFL: scale 8). For each ground truth: (1) on every
    level, the ``topk`` locations whose centres are closest (L2) to the box centre are the
    candidates; (2) the threshold is the mean plus the (unbiased) standard deviation of the
    candidates' anchor IoUs with the box; (3) a candidate is positive when its IoU reaches the
    threshold and its centre lies inside the box; (4) a location several ground truths claim
    goes to the one of highest IoU. Hand-written: no library has it.

    Args:
        topk: candidates per level and ground truth (9).
        anchor_scale: side of each location's anchor box, in strides (8).
    """

    def __init__(self, *, topk: int = 9, anchor_scale: float = 8.0) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if anchor_scale <= 0:
            raise ValueError(f"anchor_scale must be > 0, got {anchor_scale}")
        self.topk, self.anchor_scale = topk, anchor_scale

    def anchors(self, points: torch.Tensor, point_strides: torch.Tensor) -> torch.Tensor:
        """(R, 4) xyxy: the square anchor box of each location."""
        half = (point_strides.to(points.dtype) * self.anchor_scale / 2)[:, None]  # (R, 1)
        return torch.cat([points - half, points + half], dim=1)

    @torch.no_grad()
    def forward(
        self,
        points: torch.Tensor,
        point_strides: torch.Tensor,
        point_levels: torch.Tensor,
        gt_boxes: torch.Tensor,
    ) -> AssignResult:
        """points (R, 2) xy, point_strides (R,), point_levels (R,), gt_boxes (M, 4): one ground
        truth per positive location, the pairs ordered by location (as :class:`PointAssigner`)."""
        num_points, num_gt = points.shape[0], gt_boxes.shape[0]
        if num_gt == 0 or num_points == 0:
            return AssignResult.empty(num_points, points.device)
        ious = box_iou(gt_boxes, self.anchors(points, point_strides))  # (M, R)
        centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (M, 2)
        distances = torch.cdist(centers, points)  # (M, R)

        # A loop over levels: each contributes its own k nearest, whatever its size.
        candidates = []
        for level in torch.unique(point_levels).tolist():
            in_level = torch.nonzero(point_levels == level).squeeze(1)  # (R_l,)
            k = min(self.topk, in_level.numel())
            nearest = distances[:, in_level].topk(k, dim=1, largest=False).indices  # (M, k)
            candidates.append(in_level[nearest])
        candidates = torch.cat(candidates, dim=1)  # (M, K)

        candidate_ious = ious.gather(1, candidates)  # (M, K)
        spread = candidate_ious.std(dim=1) if candidates.shape[1] > 1 else torch.zeros_like(candidate_ious[:, 0])
        threshold = candidate_ious.mean(dim=1) + spread  # (M,)
        x, y = points[candidates, 0], points[candidates, 1]  # (M, K) each
        sides = torch.stack(
            [x - gt_boxes[:, 0:1], y - gt_boxes[:, 1:2], gt_boxes[:, 2:3] - x, gt_boxes[:, 3:4] - y], dim=2
        )  # (M, K, 4)
        positive = (candidate_ious >= threshold[:, None]) & (sides.min(dim=2).values > INSIDE_MARGIN)  # (M, K)

        claims = torch.full_like(ious, -1.0)  # (M, R): a positive's IoU, -1 where no claim
        claims.scatter_(1, candidates, torch.where(positive, candidate_ious, torch.full_like(candidate_ious, -1.0)))
        best, matched = claims.max(dim=0)  # (R,)
        return AssignResult.from_matched_gt(torch.where(best >= 0, matched, torch.full_like(matched, -1)))
