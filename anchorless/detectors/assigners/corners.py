"""CornerNet's targets (and the centre keypoints of CenterNet keypoint triplets): a Gaussian
per object on its class's top-left and bottom-right heatmaps (and centre heatmap), the
sub-cell offset of each keypoint, and which top-left and bottom-right belong together.

Shapes: M ground-truth boxes, K of them kept, C classes, h x w the output map.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from anchorless.detectors.assigners.gaussian import check_radius_settings, draw_gaussians, object_radii



class KeypointTargets(NamedTuple):
    """The targets of one kind of keypoint in one image."""

    heatmap: torch.Tensor  # (C, h, w) Gaussians, exactly 1 at each object's cell
    cells: torch.Tensor  # (K,) int64 flat index (y * w + x) of each object's cell
    offsets: torch.Tensor  # (K, 2) the keypoint minus its cell, x then y, in [0, 1)


class CornerTargets(NamedTuple):
    """Per keypoint kind (``tl``, ``br``, ``ct``) its :class:`KeypointTargets`; the k-th cell
    of each kind belongs to the same (k-th kept) object, which is the embedding pairing."""

    tl: KeypointTargets
    br: KeypointTargets
    ct: KeypointTargets
    gt_idx: torch.Tensor  # (K,) the kept objects, indices into M


class CornerTarget(nn.Module):
    """CornerNet's targets: boxes are clipped to the image (as the official data loader),
    divided by the stride; each corner's cell is its floor, its offset the remainder; the
    Gaussian radius is ``max(0, int(gaussian_radius(ceil(h), ceil(w), min_overlap)))`` of
    the box in output cells, the same for both corners (and the centre).

    Args:
        min_overlap: IoU a box whose corners move within the radius keeps (0.3, CornerNet).
        radius_formula: "original" (the official codes, default) or "corrected"; see
            :func:`~anchorless.detectors.assigners.gaussian_radius`.
    """

    def __init__(
        self, *, min_overlap: float = 0.3, radius_formula: Literal["original", "corrected"] = "original"
    ) -> None:
        super().__init__()
        check_radius_settings(min_overlap, radius_formula)
        self.min_overlap, self.radius_formula = min_overlap, radius_formula

    @torch.no_grad()
    def forward(
        self,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        num_classes: int,
        output_size: tuple[int, int],
        stride: int,
    ) -> CornerTargets:
        """gt_boxes (M, 4) xyxy in input pixels, gt_labels (M,); output_size (h, w) of the map.
        A box with no width or height once clipped is dropped."""
        out_h, out_w = output_size
        boxes = gt_boxes.float().clone()  # (M, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w * stride - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h * stride - 1)
        boxes = boxes / stride  # (M, 4) in output cells
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (M,)
        boxes, labels = boxes[keep], gt_labels[keep]  # K kept
        box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # (K,)
        radius = object_radii(box_w, box_h, self.min_overlap, self.radius_formula)  # (K,)
        points = {
            "tl": boxes[:, :2],
            "br": boxes[:, 2:],
            "ct": (boxes[:, :2] + boxes[:, 2:]) / 2,
        }  # each (K, 2) x, y
        targets = {}
        for kind, point in points.items():
            cells = point.floor()  # (K, 2)
            heatmap = draw_gaussians(cells, radius, labels, num_classes, output_size)  # (C, h, w)
            flat = cells[:, 1].long() * out_w + cells[:, 0].long()  # (K,)
            targets[kind] = KeypointTargets(heatmap, flat, point - cells)
        return CornerTargets(**targets, gt_idx=torch.nonzero(keep).squeeze(1))
