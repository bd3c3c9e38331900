"""IoU-family box losses on xyxy boxes: IoU (-ln IoU), linear IoU (1 - IoU), GIoU, DIoU, CIoU.

GIoU, DIoU and CIoU are torchvision.ops' losses; torchvision has no elementwise plain-IoU
loss (its ``box_iou`` is pairwise), so the two plain ones are written here. The same
losses between every pair of two box sets (:func:`pairwise_iou_similarity`, 1 - the loss) give
the matching costs, so a detector's assignment and its loss can use one kind.

Shapes: N matched pairs; M and R boxes for the pairwise form.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.ops import (
    box_iou,
    complete_box_iou,
    complete_box_iou_loss,
    distance_box_iou,
    distance_box_iou_loss,
    generalized_box_iou,
    generalized_box_iou_loss,
)

from anchorless.detectors.losses.base import Normalizer, weighted_sum

IoUKind = Literal["iou", "linear_iou", "giou", "diou", "ciou"]
IOU_KINDS: tuple[str, ...] = ("iou", "linear_iou", "giou", "diou", "ciou")
# -ln IoU is clamped here, as UnitBox implementations do (mmdetection's IoULoss: 1e-6):
# disjoint boxes get a large finite loss instead of inf.
IOU_EPS = 1e-6


def _with_height(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes`` with the bottom edge at least the next float below the top one.

    torchvision's CIoU divides by the box height without an eps (the official CIoU adds
    one), so a zero-size prediction, which FCOS's ReLU'd distances give at
    initialisation, made the loss and every gradient NaN. A fixed eps would vanish next to
    coordinates in the hundreds, hence the next float.
    """
    top = boxes[..., 1]
    least = top + (torch.nextafter(top.detach(), torch.full_like(top, torch.inf)) - top.detach())
    return torch.stack([boxes[..., 0], top, boxes[..., 2], torch.maximum(boxes[..., 3], least)], dim=-1)


def elementwise_iou(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """IoU of each pair (N, 4), (N, 4) -> (N,), or of any two shapes (..., 4) that broadcast;
    0 where the union is empty."""
    top_left = torch.maximum(pred_boxes[..., :2], target_boxes[..., :2])  # (N, 2)
    bottom_right = torch.minimum(pred_boxes[..., 2:], target_boxes[..., 2:])  # (N, 2)
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # (N,)
    area_pred = (pred_boxes[..., 2:] - pred_boxes[..., :2]).clamp(min=0).prod(dim=-1)  # (N,)
    area_target = (target_boxes[..., 2:] - target_boxes[..., :2]).clamp(min=0).prod(dim=-1)  # (N,)
    union = area_pred + area_target - inter  # (N,)
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def iou_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, kind: IoUKind = "giou") -> torch.Tensor:
    """The IoU-family loss of each matched pair: (N, 4), (N, 4) -> (N,).

    "iou": -ln IoU (UnitBox, FCOS's original); "linear_iou": 1 - IoU; "giou", "diou",
    "ciou": 1 - GIoU / DIoU / CIoU (torchvision). Identical boxes give 0 for every kind.
    """
    if kind == "iou":
        return -elementwise_iou(pred_boxes, target_boxes).clamp(min=IOU_EPS).log()
    if kind == "linear_iou":
        return 1 - elementwise_iou(pred_boxes, target_boxes)
    if kind == "giou":
        return generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    if kind == "diou":
        return distance_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    if kind == "ciou":
        return complete_box_iou_loss(_with_height(pred_boxes), _with_height(target_boxes), reduction="none")
    raise ValueError(f"kind must be one of {', '.join(IOU_KINDS)}, got {kind!r}")


def pairwise_iou_similarity(boxes1: torch.Tensor, boxes2: torch.Tensor, kind: IoUKind = "giou") -> torch.Tensor:
    """1 - the same losses between every pair: (M, 4), (R, 4) -> (M, R), from torchvision's
    pairwise box_iou, generalized_box_iou, distance_box_iou and complete_box_iou.

    IoU, GIoU, DIoU or CIoU themselves; for "iou", 1 + ln IoU. A matching cost is minus this
    (OneNet's -GIoU), so an assignment matches on the loss it trains with.
    """
    if kind == "iou":
        return 1 + box_iou(boxes1, boxes2).clamp(min=IOU_EPS).log()
    if kind == "linear_iou":
        return box_iou(boxes1, boxes2)
    if kind == "giou":
        return generalized_box_iou(boxes1, boxes2)
    if kind == "diou":
        return distance_box_iou(boxes1, boxes2)
    if kind == "ciou":
        return complete_box_iou(_with_height(boxes1), _with_height(boxes2))
    raise ValueError(f"kind must be one of {', '.join(IOU_KINDS)}, got {kind!r}")


class IoULoss(nn.Module):
    """An IoU-family loss between matched xyxy boxes, weighted per box (:func:`iou_loss`).

    Args:
        weight: loss weight.
        kind: "iou", "linear_iou", "giou", "diou" or "ciou".
    """

    def __init__(self, *, weight: float = 1.0, kind: IoUKind = "giou") -> None:
        super().__init__()
        if kind not in IOU_KINDS:
            raise ValueError(f"kind must be one of {', '.join(IOU_KINDS)}, got {kind!r}")
        self.weight, self.kind = weight, kind

    def forward(
        self,
        pred_boxes: torch.Tensor,
        target_boxes: torch.Tensor,
        normalizer: Normalizer,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return weighted_sum(iou_loss(pred_boxes, target_boxes, self.kind), self.weight, normalizer, weights)  # (N,) summed
