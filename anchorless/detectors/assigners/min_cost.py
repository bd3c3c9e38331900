"""OneNet's minimum-cost assignment: one positive location per ground truth.

Shapes: R = prediction locations of one image, M = its ground-truth boxes, C = classes.
Matching picks targets and is never differentiated, so it runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from anchorless.detectors.assigners.base import AssignResult, inside_center_region
from anchorless.detectors.assigners.costs import BoxL1Cost, FocalClassCost, IoUCost
from anchorless.detectors.losses.iou import IoUKind


# Added to the cost of locations outside the centre region: above any real cost (each term is
# bounded by a few units times its weight), so a location inside always wins when there is one.
CENTER_PENALTY = 1e4


class MinCostAssigner(nn.Module):
    """OneNet's minimum-cost assignment: one positive location per ground truth.

    cost = cost_cls * C_cls + cost_l1 * C_L1 + cost_giou * C_iou for every (ground truth,
    location) pair, C_iou being -GIoU (or minus 1 - the box loss of another kind).
    ``mode="min"`` (OneNet) gives each ground truth the location of minimum cost,
    independently, so two ground truths may take the same location;
    ``mode="hungarian"`` solves the one-to-one problem with scipy's linear_sum_assignment
    (DETR-style), which is what "min" approximates at a fraction of the cost.
    :meth:`one_to_many` gives an auxiliary head several positives per object on the same
    cost (dual assignment, as in DeFCN and YOLOv10).

    Args:
        iou_kind: kind of the IoU-family cost; not a config key: the detector passes its box
            loss's kind (``detector.loss.box_loss``), so matching and loss agree.
        cost_cls: weight of the focal-style classification cost.
        cost_l1: weight of the L1 cost between size-normalised xyxy boxes.
        cost_giou: weight of the IoU-family cost (named for its default kind, -GIoU).
        mode: "min" or "hungarian".
        focal_alpha, focal_gamma: focal parameters of the classification cost.
        center_radius: 0 (OneNet): the one-to-one positive may be any location. > 0: a
            spatial prior (DeFCN's): only locations inside the box and within this many
            strides of its centre may be chosen, unless none is (a box smaller than a
            stride), then any. On objects many cells wide, unrestricted matching lets the
            positive wander between equally good cells from step to step, and the
            classifier chases it.
    """

    def __init__(
        self,
        iou_kind: IoUKind = "giou",
        *,
        cost_cls: float = 2.0,
        cost_l1: float = 5.0,
        cost_giou: float = 2.0,
        mode: Literal["min", "hungarian"] = "min",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        center_radius: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("min", "hungarian"):
            raise ValueError(f"mode must be 'min' or 'hungarian', got {mode!r}")
        if center_radius < 0:
            raise ValueError(f"center_radius must be >= 0, got {center_radius}")
        self.center_radius = center_radius
        if cost_cls == 0 and cost_l1 == 0 and cost_giou == 0:
            raise ValueError("at least one of cost_cls, cost_l1, cost_giou must be non-zero")
        self.mode = mode
        self.cls_cost = FocalClassCost(weight=cost_cls, alpha=focal_alpha, gamma=focal_gamma)
        self.l1_cost = BoxL1Cost(weight=cost_l1)
        self.iou_cost = IoUCost(weight=cost_giou, kind=iou_kind)

    # The config names, readable as attributes too: assigner.cost_giou etc.
    @property
    def cost_cls(self) -> float:
        return self.cls_cost.weight

    @property
    def cost_l1(self) -> float:
        return self.l1_cost.weight

    @property
    def cost_giou(self) -> float:
        return self.iou_cost.weight

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
            + self.iou_cost(pred_boxes, gt_boxes)
        )  # (M, R)

    @torch.no_grad()
    def solve(self, cost: torch.Tensor) -> AssignResult:
        """Match on a given (M, R) cost; the pairs are ordered by ground truth."""
        num_gt, num_preds = cost.shape
        if num_gt == 0 or num_preds == 0:
            return AssignResult.empty(num_preds, cost.device)
        if self.mode == "min":
            gt_idx = torch.arange(num_gt, device=cost.device)  # (M,)
            if cost.device.type == "cpu":  # numpy's argmin is SIMD-vectorised, ~10x torch's on CPU
                return AssignResult(torch.from_numpy(cost.numpy().argmin(axis=1)), gt_idx, num_preds)  # K = M
            return AssignResult(cost.argmin(dim=1), gt_idx, num_preds)  # K = M
        # Imported here: only the Hungarian mode needs scipy, and a bare GPU box may lack it.
        from scipy.optimize import linear_sum_assignment

        gt_idx, pred_idx = linear_sum_assignment(cost.cpu().numpy())  # K = min(M, R) pairs, by gt
        return AssignResult(
            torch.as_tensor(pred_idx, dtype=torch.long, device=cost.device),
            torch.as_tensor(gt_idx, dtype=torch.long, device=cost.device),
            num_preds,
        )

    @torch.no_grad()
    def forward(
        self,
        cls_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        image_size: tuple[int, int],
        points: torch.Tensor | None = None,
        stride: float | None = None,
    ) -> AssignResult:
        """Assign for one image: one pair per ground truth ("min"), or K = min(M, R) ("hungarian").

        ``points`` (R, 2), the locations' (x, y), and ``stride`` are needed with ``center_radius``.
        """
        if gt_boxes.shape[0] == 0:
            return self.solve(cls_logits.new_zeros(0, cls_logits.shape[0]))
        cost = self.cost_matrix(cls_logits, pred_boxes, gt_boxes, gt_labels, image_size)  # (M, R)
        if self.center_radius > 0:
            if points is None or stride is None:
                raise ValueError("center_radius needs the locations' points and the stride")
            # A finite penalty, not inf: a box with no location near its centre still gets its
            # cheapest one, and scipy's Hungarian solver refuses infinite rows.
            cost = cost + CENTER_PENALTY * ~self.center_region(points, gt_boxes, stride)
        return self.solve(cost)

    @torch.no_grad()
    def center_region(self, points: torch.Tensor, gt_boxes: torch.Tensor, stride: float) -> torch.Tensor:
        """(M, R) bool: the location lies inside the box and within ``center_radius`` strides of its centre."""
        return inside_center_region(points, gt_boxes, self.center_radius * stride).T

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
    ) -> AssignResult:
        """The auxiliary one-to-many assignment on the same cost: each ground truth takes its
        ``topk`` cheapest locations among those inside its box (its cheapest location
        anywhere when none lies inside, e.g. a box smaller than a stride); a location two
        ground truths claim keeps the cheaper. ``points`` (R, 2) are the locations' (x, y).

        The pairs are ordered by location; K <= topk * M.
        """
        num_gt, num_points = gt_boxes.shape[0], points.shape[0]
        if num_gt == 0 or num_points == 0:
            return AssignResult.empty(num_points, points.device)
        cost = self.cost_matrix(cls_logits, pred_boxes, gt_boxes, gt_labels, image_size)  # (M, R)
        inside = inside_center_region(points, gt_boxes, math.inf).T  # (M, R); an unbounded region: the whole box
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
        return AssignResult(pred_idx[first], gt_idx[first], num_points)
