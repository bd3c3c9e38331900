"""FCOS's assignment: a location learns a box it lies in whose size suits its pyramid level.

Shapes: R = locations of all levels of one image, M = its ground-truth boxes, L = levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from anchorless.detectors.assigners.base import AssignResult, inside_center_region


class PointAssigner(nn.Module):
    """FCOS: a location is positive for a box it falls inside whose size suits its level.

    A location at (x, y) on level i may take box g when (1) it lies inside g, or, with centre
    sampling, inside the square of half-side ``center_sampling_radius * stride_i`` around
    g's centre (clipped to g), and (2) max(l, t, r, b) to g's sides lies in
    [size_ranges[i], size_ranges[i+1]]. Among several such boxes the smallest area wins.

    Args:
        size_ranges: level boundaries on max(l, t, r, b), one more entry than levels.
        center_sampling_radius: in strides; 0 disables centre sampling (FCOS v1). 1.5 is
            the value of the FCOS journal version, the official "imprv" configs,
            detectron2 and torchvision.
    """

    def __init__(
        self,
        *,
        size_ranges: Sequence[float] = (-1.0, 64.0, 128.0, 256.0, 512.0, math.inf),
        center_sampling_radius: float = 1.5,
    ) -> None:
        super().__init__()
        if list(size_ranges) != sorted(size_ranges) or len(size_ranges) < 2:
            raise ValueError(f"size_ranges must be increasing with at least 2 entries, got {list(size_ranges)}")
        if center_sampling_radius < 0:
            raise ValueError(f"center_sampling_radius must be >= 0, got {center_sampling_radius}")
        self.size_ranges = tuple(float(s) for s in size_ranges)
        self.center_sampling_radius = center_sampling_radius

    @property
    def num_levels(self) -> int:
        return len(self.size_ranges) - 1

    @torch.no_grad()
    def forward(
        self,
        points: torch.Tensor,
        point_strides: torch.Tensor,
        point_levels: torch.Tensor,
        gt_boxes: torch.Tensor,
    ) -> AssignResult:
        """points (R, 2) xy, point_strides (R,), point_levels (R,) in 0..levels-1, gt_boxes (M, 4).

        At most one ground truth per location; the pairs are ordered by location.
        """
        num_points = points.shape[0]
        if gt_boxes.shape[0] == 0:
            return AssignResult.empty(num_points, points.device)
        x, y = points[:, 0:1], points[:, 1:2]  # (R, 1)
        x1, y1, x2, y2 = gt_boxes.unbind(dim=1)  # (M,)
        ltrb = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=2)  # (R, M, 4)

        if self.center_sampling_radius > 0:
            radius = point_strides[:, None].to(points.dtype) * self.center_sampling_radius  # (R, 1)
            inside = inside_center_region(points, gt_boxes, radius)  # (R, M)
        else:
            inside = ltrb.min(dim=2).values > 0  # (R, M)

        ranges = torch.tensor(self.size_ranges, dtype=points.dtype, device=points.device)  # (L+1,)
        lower, upper = ranges[point_levels][:, None], ranges[point_levels + 1][:, None]  # (R, 1)
        max_side = ltrb.max(dim=2).values  # (R, M)
        in_range = (max_side >= lower) & (max_side <= upper)  # (R, M)

        area = ((x2 - x1) * (y2 - y1))[None, :].expand(num_points, -1)  # (R, M)
        area = torch.where(inside & in_range, area, torch.full_like(area, math.inf))  # (R, M)
        min_area, matched = area.min(dim=1)  # (R,)
        return AssignResult.from_matched_gt(torch.where(torch.isinf(min_area), torch.full_like(matched, -1), matched))
