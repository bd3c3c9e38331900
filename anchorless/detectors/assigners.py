"""Label assigners: which prediction (location) learns which ground-truth box.

Shapes used throughout: R = prediction locations of one image, M = ground-truth boxes
of that image, C = classes. Boxes are xyxy in input pixels. Every assigner runs under
``torch.no_grad()``: matching picks targets, it is never differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

# --------------------------------------------------------------------------- OneNet
# Costs are laid out (M, R), one row per ground truth: "min" then reduces along contiguous
# memory, and scipy's solver gets M <= R rows as it prefers.


class FocalClassCost(nn.Module):
    """Classification cost at the ground-truth class, shaped like the focal loss.

    cost = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p)): the focal loss of
    calling this location positive minus that of calling it negative (OneNet, DETR-style).
    """

    def __init__(self, *, weight: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.weight, self.alpha, self.gamma = weight, alpha, gamma

    def forward(self, cls_logits: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
        prob = cls_logits.T[gt_labels].sigmoid()  # (M, R)
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()  # (M, R)
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()  # (M, R)
        return self.weight * (pos - neg)


class BoxL1Cost(nn.Module):
    """L1 distance between xyxy boxes, both divided by the image size (so it is in [0, 4])."""

    def __init__(self, *, weight: float = 5.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        h, w = image_size
        scale = pred_boxes.new_tensor([w, h, w, h])  # (4,)
        pred = (pred_boxes / scale).T.contiguous()  # (4, R)
        gt = gt_boxes / scale  # (M, 4)
        # One (M, R) term per coordinate: ~20x faster on CPU than torch.cdist(p=1) or an
        # (M, R, 4) broadcast, and no (M, R, 4) temporary.
        cost = (gt[:, 0:1] - pred[0]).abs_()  # (M, R)
        for k in range(1, 4):
            cost += (gt[:, k : k + 1] - pred[k]).abs_()
        return cost.mul_(self.weight)


class GIoUCost(nn.Module):
    """Negative generalised IoU (torchvision's pairwise generalized_box_iou)."""

    def __init__(self, *, weight: float = 2.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        return -self.weight * generalized_box_iou(gt_boxes, pred_boxes)  # (M, R)


class MinCostAssigner(nn.Module):
    """OneNet's minimum-cost assignment: one positive location per ground truth.

    cost = cost_cls * C_cls + cost_l1 * C_L1 + cost_giou * C_giou for every (ground truth,
    location) pair. ``mode="min"`` (OneNet) gives each ground truth the location of
    minimum cost, independently, so two ground truths may take the same location;
    ``mode="hungarian"`` solves the one-to-one problem with scipy's linear_sum_assignment
    (DETR-style), which is what "min" approximates at a fraction of the cost.
    :meth:`one_to_many` gives an auxiliary head several positives per object on the same
    cost (dual assignment, as in DeFCN and YOLOv10).

    Args:
        cost_cls: weight of the focal-style classification cost.
        cost_l1: weight of the L1 cost between size-normalised xyxy boxes.
        cost_giou: weight of the -GIoU cost.
        mode: "min" or "hungarian".
        focal_alpha, focal_gamma: focal parameters of the classification cost.
    """

    def __init__(
        self,
        *,
        cost_cls: float = 2.0,
        cost_l1: float = 5.0,
        cost_giou: float = 2.0,
        mode: Literal["min", "hungarian"] = "min",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if mode not in ("min", "hungarian"):
            raise ValueError(f"mode must be 'min' or 'hungarian', got {mode!r}")
        if cost_cls == 0 and cost_l1 == 0 and cost_giou == 0:
            raise ValueError("at least one of cost_cls, cost_l1, cost_giou must be non-zero")
        self.mode = mode
        self.cls_cost = FocalClassCost(weight=cost_cls, alpha=focal_alpha, gamma=focal_gamma)
        self.l1_cost = BoxL1Cost(weight=cost_l1)
        self.giou_cost = GIoUCost(weight=cost_giou)

    # The config names, readable as attributes too: assigner.cost_giou etc.
    @property
    def cost_cls(self) -> float:
        return self.cls_cost.weight

    @property
    def cost_l1(self) -> float:
        return self.l1_cost.weight

    @property
    def cost_giou(self) -> float:
        return self.giou_cost.weight

    @torch.no_grad()
    def cost_matrix(
        self,
        cls_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        image_size: tuple[int, int],
    ) -> torch.Tensor:
        """(M, R) total matching cost. cls_logits (R, C), pred_boxes (R, 4), gt_boxes (M, 4)."""
        return (
            self.cls_cost(cls_logits, gt_labels)
            + self.l1_cost(pred_boxes, gt_boxes, image_size)
            + self.giou_cost(pred_boxes, gt_boxes)
        )  # (M, R)

    @torch.no_grad()
    def solve(self, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Match on a given (M, R) cost: (pred_idx (K,), gt_idx (K,)), ordered by ground truth."""
        num_gt = cost.shape[0]
        if num_gt == 0 or cost.shape[1] == 0:
            empty = torch.zeros(0, dtype=torch.long, device=cost.device)
            return empty, empty
        if self.mode == "min":
            gt_idx = torch.arange(num_gt, device=cost.device)  # (M,)
            if cost.device.type == "cpu":  # numpy's argmin is SIMD-vectorised, ~10x torch's on CPU
                return torch.from_numpy(cost.numpy().argmin(axis=1)), gt_idx  # (M,)
            return cost.argmin(dim=1), gt_idx  # (M,)
        gt_idx, pred_idx = linear_sum_assignment(cost.cpu().numpy())  # K = min(M, R) pairs, by gt
        return (
            torch.as_tensor(pred_idx, dtype=torch.long, device=cost.device),
            torch.as_tensor(gt_idx, dtype=torch.long, device=cost.device),
        )

    @torch.no_grad()
    def forward(
        self,
        cls_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Assign for one image; returns (pred_idx (K,), gt_idx (K,)) into R and M."""
        if gt_boxes.shape[0] == 0:
            return self.solve(cls_logits.new_zeros(0, cls_logits.shape[0]))
        return self.solve(self.cost_matrix(cls_logits, pred_boxes, gt_boxes, gt_labels, image_size))


    @torch.no_grad()
    def one_to_many(
        self,
        cls_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        image_size: tuple[int, int],
        points: torch.Tensor,
        topk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary one-to-many assignment on the same cost: each ground truth takes its
        ``topk`` cheapest locations among those inside its box (its cheapest location
        anywhere when none lies inside, e.g. a box smaller than a stride); a location two
        ground truths claim keeps the cheaper. ``points`` (R, 2) are the locations' (x, y).

        Returns (pred_idx (K,), gt_idx (K,)), ordered by location; K <= topk * M.
        """
        num_gt, num_points = gt_boxes.shape[0], points.shape[0]
        if num_gt == 0 or num_points == 0:
            empty = torch.zeros(0, dtype=torch.long, device=points.device)
            return empty, empty
        cost = self.cost_matrix(cls_logits, pred_boxes, gt_boxes, gt_labels, image_size)  # (M, R)
        x, y = points[:, 0], points[:, 1]  # (R,) each
        inside = (
            (x > gt_boxes[:, 0:1]) & (x < gt_boxes[:, 2:3]) & (y > gt_boxes[:, 1:2]) & (y < gt_boxes[:, 3:4])
        )  # (M, R)
        costs, pred_idx = cost.masked_fill(~inside, math.inf).topk(min(topk, num_points), dim=1, largest=False)  # (M, k)
        keep = torch.isfinite(costs)  # (M, k)
        outside_only = ~keep[:, 0]  # (M,)
        pred_idx[outside_only, 0] = cost[outside_only].argmin(dim=1)
        keep[:, 0] = True
        gt_idx = torch.arange(num_gt, device=cost.device)[:, None].expand_as(pred_idx)[keep]  # (K,)
        pred_idx = pred_idx[keep]  # (K,)
        # One ground truth per location: sort by cost, then (stably) by location; the first
        # of each location's run is its cheapest claim.
        by_cost = cost[gt_idx, pred_idx].argsort()
        gt_idx, pred_idx = gt_idx[by_cost], pred_idx[by_cost]
        by_location = pred_idx.argsort(stable=True)
        gt_idx, pred_idx = gt_idx[by_location], pred_idx[by_location]
        first = torch.ones_like(pred_idx, dtype=torch.bool)
        first[1:] = pred_idx[1:] != pred_idx[:-1]
        return pred_idx[first], gt_idx[first]


# --------------------------------------------------------------------------- FCOS


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
    ) -> torch.Tensor:
        """points (R, 2) xy, point_strides (R,), point_levels (R,) in 0..levels-1, gt_boxes (M, 4).

        Returns matched_gt (R,) int64: index into M, or -1 for background.
        """
        num_points = points.shape[0]
        if gt_boxes.shape[0] == 0:
            return torch.full((num_points,), -1, dtype=torch.long, device=points.device)
        x, y = points[:, 0:1], points[:, 1:2]  # (R, 1)
        x1, y1, x2, y2 = gt_boxes.unbind(dim=1)  # (M,)
        ltrb = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=2)  # (R, M, 4)

        if self.center_sampling_radius > 0:
            radius = point_strides[:, None].to(points.dtype) * self.center_sampling_radius  # (R, 1)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2  # (M,)
            region = torch.stack(
                [
                    x - torch.maximum(cx - radius, x1),
                    y - torch.maximum(cy - radius, y1),
                    torch.minimum(cx + radius, x2) - x,
                    torch.minimum(cy + radius, y2) - y,
                ],
                dim=2,
            )  # (R, M, 4)
            inside = region.min(dim=2).values > 0  # (R, M)
        else:
            inside = ltrb.min(dim=2).values > 0  # (R, M)

        ranges = torch.tensor(self.size_ranges, dtype=points.dtype, device=points.device)  # (L+1,)
        lower, upper = ranges[point_levels][:, None], ranges[point_levels + 1][:, None]  # (R, 1)
        max_side = ltrb.max(dim=2).values  # (R, M)
        in_range = (max_side >= lower) & (max_side <= upper)  # (R, M)

        area = ((x2 - x1) * (y2 - y1))[None, :].expand(num_points, -1)  # (R, M)
        area = torch.where(inside & in_range, area, torch.full_like(area, math.inf))  # (R, M)
        min_area, matched = area.min(dim=1)  # (R,)
        return torch.where(torch.isinf(min_area), torch.full_like(matched, -1), matched)


# --------------------------------------------------------------------------- CenterNet


def gaussian_radius(
    height: torch.Tensor | float,
    width: torch.Tensor | float,
    min_overlap: float = 0.7,
    formula: Literal["original", "corrected"] = "original",
) -> torch.Tensor:
    """Radius r such that a box whose corners move by up to r keeps IoU >= min_overlap.

    CornerNet solves three quadratics a r^2 - b r + c = 0 (both corners moved inward,
    both outward, one each way) and takes the smallest root. Its code, copied by CenterNet,
    uses (b + sqrt(b^2 - 4ac)) / 2 for all three: the wrong root for the first two and a
    missing factor 1/a (princeton-vl/CornerNet issue 110). In practice the minimum is
    then the third case times a3 = 4 * min_overlap (2.8 at 0.7): about three times the
    radius the geometry asks for. ``formula="corrected"`` uses the right roots (as
    mmdetection does).

    Default "original": it is what the CenterNet paper's COCO numbers and its loss
    weights (heatmap 1, size 0.1) were obtained with; the corrected radius shrinks the
    Gaussians about 3x (small objects become single-pixel peaks at stride 4), which
    changes the positive/negative balance of the penalty-reduced focal loss the paper tuned.
    """
    h = torch.as_tensor(height, dtype=torch.float64)
    w = torch.as_tensor(width, dtype=torch.float64)
    o = min_overlap
    a1, b1, c1 = 1.0, h + w, w * h * (1 - o) / (1 + o)
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - o) * w * h
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    sq1 = torch.sqrt(b1**2 - 4 * a1 * c1)
    sq2 = torch.sqrt(b2**2 - 4 * a2 * c2)
    sq3 = torch.sqrt(b3**2 - 4 * a3 * c3)
    if formula == "original":
        r1, r2, r3 = (b1 + sq1) / 2, (b2 + sq2) / 2, (b3 + sq3) / 2
    elif formula == "corrected":
        r1, r2, r3 = (b1 - sq1) / (2 * a1), (b2 - sq2) / (2 * a2), (b3 + sq3) / (2 * a3)
    else:
        raise ValueError(f"formula must be 'original' or 'corrected', got {formula!r}")
    return torch.minimum(torch.minimum(r1, r2), r3)


@dataclass
class CenterTargets:
    """CenterNet targets of one image on its stride-4 output map (K = kept boxes)."""

    heatmap: torch.Tensor  # (C, h, w) in [0, 1], exactly 1 at each object's centre cell
    indices: torch.Tensor  # (K,) flat index cy * w + cx of each centre cell
    sizes: torch.Tensor  # (K, 2) box width, height in output cells
    offsets: torch.Tensor  # (K, 2) centre minus its integer cell, in [0, 1)
    labels: torch.Tensor  # (K,)


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
        if not 0 < min_overlap < 1:
            raise ValueError(f"min_overlap must be in (0, 1), got {min_overlap}")
        if radius_formula not in ("original", "corrected"):
            raise ValueError(f"radius_formula must be 'original' or 'corrected', got {radius_formula!r}")
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
    ) -> CenterTargets:
        """gt_boxes (M, 4) in input pixels, gt_labels (M,); output_size (h, w) of the map."""
        out_h, out_w = output_size
        device = gt_boxes.device
        boxes = gt_boxes.float() / stride  # (M, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h - 1)
        box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # (M,)
        keep = (box_w > 0) & (box_h > 0)  # (M,)
        boxes, box_w, box_h, labels = boxes[keep], box_w[keep], box_h[keep], gt_labels[keep]  # K kept

        radius = gaussian_radius(box_h.ceil(), box_w.ceil(), self.min_overlap, self.radius_formula)  # (K,)
        radius = radius.floor().clamp(min=self.min_radius).to(torch.float32).to(device)  # (K,)
        centers = torch.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], dim=1) / 2  # (K, 2)
        cells = centers.floor()  # (K, 2)

        sigma = (2 * radius + 1) / 6  # (K,)
        dx = torch.arange(out_w, device=device, dtype=torch.float32)[None, :] - cells[:, 0:1]  # (K, w)
        dy = torch.arange(out_h, device=device, dtype=torch.float32)[None, :] - cells[:, 1:2]  # (K, h)
        gx = torch.exp(-(dx**2) / (2 * sigma[:, None] ** 2)) * (dx.abs() <= radius[:, None])  # (K, w)
        gy = torch.exp(-(dy**2) / (2 * sigma[:, None] ** 2)) * (dy.abs() <= radius[:, None])  # (K, h)
        gaussians = gy[:, :, None] * gx[:, None, :]  # (K, h, w)

        heatmap = torch.zeros(num_classes, out_h * out_w, device=device)  # (C, h*w)
        if labels.numel() > 0:
            index = labels[:, None].expand(-1, out_h * out_w)  # (K, h*w)
            heatmap.scatter_reduce_(0, index, gaussians.reshape(len(labels), -1), reduce="amax")
        cells = cells.long()  # (K, 2)
        return CenterTargets(
            heatmap=heatmap.view(num_classes, out_h, out_w),
            indices=cells[:, 1] * out_w + cells[:, 0],
            sizes=torch.stack([box_w, box_h], dim=1),
            offsets=centers - cells,
            labels=labels,
        )
