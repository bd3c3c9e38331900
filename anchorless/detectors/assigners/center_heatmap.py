"""CenterNet's targets: a Gaussian per object at its centre cell, and the box size and
sub-cell offset to regress there.

Shapes: M ground-truth boxes, K of them kept, C classes, h x w the output map.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from anchorless.detectors.assigners.base import AssignResult
from anchorless.detectors.assigners.gaussian import check_radius_settings, draw_gaussians, object_radii


class CenterHeatmapTarget(nn.Module):
    """CenterNet's targets: a Gaussian per object at its centre cell, on its class channel.

    Boxes are mapped to the output map (divided by the stride) and clipped to it; the
    radius is ``floor(gaussian_radius(ceil(h), ceil(w), min_overlap))`` (at least
    ``min_radius``), sigma = diameter / 6 with diameter = 2r + 1, the Gaussian is cut to
    the (2r+1)^2 window, and overlapping Gaussians of one class take the element-wise max.

    Args:
        min_overlap: IoU a box shifted within the radius must keep (0.7 in the paper).
        radius_formula: "original" (CornerNet/CenterNet code, default) or "corrected";
            see :func:`gaussian_radius` for why.
        min_radius: lower bound on the radius in cells (0 as in the official code).
    """

    def __init__(
        self,
        *,
        min_overlap: float = 0.7,
        radius_formula: Literal["original", "corrected"] = "original",
        min_radius: int = 0,
    ) -> None:
        super().__init__()
        check_radius_settings(min_overlap, radius_formula)
        self.min_overlap = min_overlap
        self.radius_formula = radius_formula
        self.min_radius = min_radius

    @torch.no_grad()
    def forward(
        self,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        num_classes: int,
        output_size: tuple[int, int],
        stride: int,
    ) -> AssignResult:
        """gt_boxes (M, 4) in input pixels, gt_labels (M,); output_size (h, w) of the map.

        One pair per kept box (K <= M: a box with no area once clipped to the map is
        dropped): its centre cell and its index in M. ``heatmap`` holds the Gaussians,
        ``box_targets`` (K, 4) the box width and height, then the centre minus its
        integer cell (in [0, 1)), all in output cells.
        """
        out_h, out_w = output_size
        boxes = gt_boxes.float() / stride  # (M, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h - 1)
        box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # (M,)
        keep = (box_w > 0) & (box_h > 0)  # (M,)
        boxes, box_w, box_h, labels = boxes[keep], box_w[keep], box_h[keep], gt_labels[keep]  # K kept

        radius = object_radii(box_w, box_h, self.min_overlap, self.radius_formula, self.min_radius)  # (K,)
        centers = torch.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], dim=1) / 2  # (K, 2)
        cells = centers.floor()  # (K, 2)

        heatmap = draw_gaussians(cells, radius, labels, num_classes, output_size)  # (C, h, w)
        cells = cells.long()  # (K, 2)
        return AssignResult(
            pred_idx=cells[:, 1] * out_w + cells[:, 0],  # (K,) the centre cells, flat
            gt_idx=torch.nonzero(keep).squeeze(1),  # (K,)
            num_preds=out_h * out_w,
            heatmap=heatmap,
            box_targets=torch.cat([torch.stack([box_w, box_h], dim=1), centers - cells], dim=1),  # (K, 4)
        )
