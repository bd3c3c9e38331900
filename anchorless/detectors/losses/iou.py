"""IoU-family box losses (GIoU, DIoU, CIoU) from torchvision.ops."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from anchorless.detectors.losses.base import Normalizer, weighted_sum

def _ciou_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """torchvision's CIoU, for boxes that may have no height: its aspect term divides by the
    height without an eps (the official CIoU adds one), so a zero-size prediction, which
    FCOS's ReLU'd distances give at initialisation, made the loss and every gradient NaN."""
    def with_height(boxes: torch.Tensor) -> torch.Tensor:
        top = boxes[..., 1]
        # The next float above the top edge: a fixed eps vanishes next to coordinates in the hundreds.
        least = top + (torch.nextafter(top.detach(), torch.full_like(top, torch.inf)) - top.detach())
        return torch.stack([boxes[..., 0], top, boxes[..., 2], torch.maximum(boxes[..., 3], least)], dim=-1)

    return complete_box_iou_loss(with_height(pred_boxes), with_height(target_boxes), reduction=reduction)


_IOU_LOSSES = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": _ciou_loss,
}


class IoULoss(nn.Module):
    """GIoU / DIoU / CIoU loss between matched xyxy boxes (torchvision.ops), weighted per box."""

    def __init__(self, *, weight: float = 1.0, kind: Literal["giou", "diou", "ciou"] = "giou") -> None:
        super().__init__()
        if kind not in _IOU_LOSSES:
            raise ValueError(f"kind must be one of {', '.join(_IOU_LOSSES)}, got {kind!r}")
        self.weight, self.kind = weight, kind

    def forward(
        self,
        pred_boxes: torch.Tensor,
        target_boxes: torch.Tensor,
        normalizer: Normalizer,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = _IOU_LOSSES[self.kind](pred_boxes, target_boxes, reduction="none")  # (N,)
        return weighted_sum(loss, self.weight, normalizer, weights)
