"""What every assigner returns: which predictions learn which ground truth, in one image.

Shapes: R = predictions (locations) of the image, M = its ground-truth boxes, K = positive
(prediction, ground truth) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AssignResult:
    """The K positive (prediction, ground truth) pairs of one image, plus the targets an
    assigner computes itself where a detector cannot read them off the box.

    Pairs rather than one ground truth per prediction: OneNet's "min" mode lets two ground
    truths take the same location, and that location then learns both classes.

    Attributes:
        pred_idx: (K,) int64, the positive predictions, indices into R.
        gt_idx: (K,) int64, the ground truth each of them learns, indices into M.
        num_preds: R, so the per-prediction view can be rebuilt.
        heatmap: (C, H, W) soft classification targets on the output map (CenterNet's
            Gaussians); None where the targets are 1 at the pairs and 0 elsewhere.
        box_targets: (K, D) regression targets of the pairs in the assigner's own encoding
            (CenterNet: width, height, centre offset x, y, in output cells); None where
            the detector regresses the ground-truth box itself.
    """

    pred_idx: torch.Tensor
    gt_idx: torch.Tensor
    num_preds: int
    heatmap: torch.Tensor | None = None
    box_targets: torch.Tensor | None = None

    @classmethod
    def empty(cls, num_preds: int, device: torch.device | None = None) -> AssignResult:
        """No positives: every prediction is background."""
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(none, none, num_preds)

    @classmethod
    def from_matched_gt(cls, matched_gt: torch.Tensor) -> AssignResult:
        """From one ground truth per prediction: matched_gt (R,) int64, -1 for background."""
        pred_idx = torch.nonzero(matched_gt >= 0).squeeze(1)  # (K,)
        return cls(pred_idx, matched_gt[pred_idx], matched_gt.shape[0])

    @property
    def num_pos(self) -> int:
        return int(self.pred_idx.numel())

    def matched_gt(self) -> torch.Tensor:
        """(R,) int64: the ground truth of each prediction, -1 for background.

        Only defined when no prediction is in two pairs (not so in OneNet's "min" mode).
        """
        if torch.unique(self.pred_idx).numel() != self.pred_idx.numel():
            raise ValueError("matched_gt: a prediction learns several ground truths; read the pairs instead")
        matched = torch.full((self.num_preds,), -1, dtype=torch.long, device=self.pred_idx.device)  # (R,)
        matched[self.pred_idx] = self.gt_idx
        return matched


def inside_center_region(points: torch.Tensor, gt_boxes: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """(R, M) bool: location r lies inside box m and within ``radius`` pixels of its centre
    (the square of half-side ``radius``, clipped to the box: FCOS's centre sampling).

    points (R, 2) xy, gt_boxes (M, 4) xyxy, radius a float or (R, 1) per location (its stride
    times a radius in strides).
    """
    x, y = points[:, 0:1], points[:, 1:2]  # (R, 1)
    x1, y1, x2, y2 = gt_boxes.unbind(dim=1)  # (M,)
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
    return region.min(dim=2).values > 0
