"""FCOS (Tian et al., ICCV 2019 / TPAMI 2020), with the improvements of the official
"imprv" models: centre sampling, GIoU loss, centerness on the regression branch,
regression normalised by the stride.

Every location of P3-P7 inside a box whose size suits that level regresses the distances
(l, t, r, b) to the box sides; a centerness branch down-weights off-centre locations at
test time. ``assigner.kind: atss`` swaps the size ranges and centre sampling for ATSS
("FCOS + ATSS" of the ATSS paper); ``loss.box_loss`` picks the IoU-family box loss.
Inference (:class:`LevelwisePostprocess`) keeps cls > 0.05, top 1000 per level, score
sqrt(cls * centerness), class-wise NMS at 0.6 (``postprocess.nms`` picks the kind), top 100.

Shapes: B images, C classes, L levels, R = locations of all levels, P = positives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from anchorless.detectors.assigners import PyramidAssigner
from anchorless.detectors.backbones import ResNetBackbone
from anchorless.detectors.base import DetectorConfigError, Detections, PyramidDetector, reduce_normalizer
from anchorless.detectors.layers import TowerHead, init_dense_head
from anchorless.detectors.losses import CenternessLoss, FocalLoss, IoUKind, IoULoss, centerness_target
from anchorless.detectors.necks import FPN
from anchorless.detectors.postprocess import LevelwisePostprocess, decode_ltrb
from anchorless.detectors.registry import register


class FCOSHead(TowerHead):
    """Head shared by all levels: a classification tower and a regression tower of
    ``num_convs`` x (3x3 conv + GroupNorm + ReLU); class logits on the first, ltrb and
    centerness on the second; a learnable scale per level on the regression.

    ltrb = ReLU(scale_l * x) * stride_l: the network predicts distances in strides (the
    official ``NORM_REG_TARGETS``), so one head serves every level.

    Args:
        in_channels, num_classes, strides: set by the detector.
        num_convs: depth of each tower (4).
        prior_prob: initial foreground probability of the classifier (0.01).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        *,
        num_convs: int = 4,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__(in_channels, num_classes, strides, num_convs)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)
        init_dense_head(self, self.cls_logits, prior_prob)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L maps (B, D, H_l, W_l) -> cls logits (B, R, C), ltrb in pixels (B, R, 4), centerness logits (B, R)."""
        cls_logits, ltrb, centerness = [], [], []
        for level, feature in enumerate(features):
            cls_feat, reg_feat = self.cls_tower(feature), self.reg_tower(feature)
            distances = torch.relu(self.bbox_pred(reg_feat) * self.scales[level]) * self.strides[level]
            cls_logits.append(self.cls_logits(cls_feat).flatten(2))  # (B, C, H_l*W_l)
            ltrb.append(distances.flatten(2))  # (B, 4, H_l*W_l)
            centerness.append(self.centerness(reg_feat).flatten(2))  # (B, 1, H_l*W_l)
        return (
            torch.cat(cls_logits, dim=2).transpose(1, 2),  # (B, R, C)
            torch.cat(ltrb, dim=2).transpose(1, 2),  # (B, R, 4)
            torch.cat(centerness, dim=2)[:, 0],  # (B, R)
        )


class FCOSLoss(nn.Module):
    """FCOS's weighted losses.

    Args:
        cls: weight of the focal classification loss, normalised by positives (1).
        box: weight of the IoU loss, weighted by the centerness target and normalised by its
            sum (1).
        centerness: weight of the centerness BCE, normalised by positives (1).
        box_loss: "giou" (official imprv), "iou" (-ln IoU, FCOS's original), "linear_iou",
            "diou" or "ciou".
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).
    """

    def __init__(
        self,
        *,
        cls: float = 1.0,
        box: float = 1.0,
        centerness: float = 1.0,
        box_loss: IoUKind = "giou",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cls_loss = FocalLoss(weight=cls, alpha=focal_alpha, gamma=focal_gamma)
        self.box_loss = IoULoss(weight=box, kind=box_loss)
        self.centerness_loss = CenternessLoss(weight=centerness)


@register("fcos")
class FCOS(PyramidDetector):
    """FCOS: ResNet + FPN P3-P7, shared head, the point assigner (or ATSS), per-level top-k + NMS."""

    components = {
        "backbone": ResNetBackbone,
        "neck": FPN,
        "head": FCOSHead,
        "assigner": PyramidAssigner,
        "loss": FCOSLoss,
        "postprocess": LevelwisePostprocess,
    }
    # Official FCOS R50: frozen BatchNorm, stem and res2 frozen (FREEZE_CONV_BODY_AT 2).
    defaults = {"backbone": {"depth": 50, "norm": "frozen_bn", "frozen_stages": 2}}

    @classmethod
    def check_parts(cls, parts: Mapping[str, nn.Module]) -> None:
        levels, strides = parts["assigner"].num_levels, parts["neck"].out_strides
        if levels is not None and levels != len(strides):
            raise DetectorConfigError(
                f"detector.assigner.size_ranges: {levels + 1} entries give {levels} levels; the neck has "
                f"{len(strides)} (strides {', '.join(map(str, strides))}), so give {len(strides) + 1}"
            )

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, Any]:
        cls_logits, ltrb, centerness = self.head(features)
        return {
            "cls_logits": cls_logits,  # (B, R, C)
            "ltrb": ltrb,  # (B, R, 4) in pixels; decoded to boxes only where needed
            "centerness": centerness,  # (B, R)
            **self.locations(features, self.head.strides),  # points (R, 2), point_strides, point_levels, level_sizes
        }

    def losses(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        cls_logits, ltrb, centerness = outputs["cls_logits"], outputs["ltrb"], outputs["centerness"]
        points = outputs["points"]  # (R, 2)
        cls_targets = torch.zeros_like(cls_logits)  # (B, R, C)
        pos_points, pos_ltrb, pos_gt, pos_ctr_logits = [], [], [], []
        for i, target in enumerate(targets):
            match = self.assigner(points, outputs["point_strides"], outputs["point_levels"], target["boxes"])
            pos, gt_idx = match.pred_idx, match.gt_idx  # (P_i,) each
            cls_targets[i, pos, target["labels"][gt_idx]] = 1.0
            pos_points.append(points[pos])  # (P_i, 2)
            pos_ltrb.append(ltrb[i, pos])  # (P_i, 4)
            pos_gt.append(target["boxes"][gt_idx])  # (P_i, 4)
            pos_ctr_logits.append(centerness[i, pos])  # (P_i,)
        pos_points, ctr_logits = torch.cat(pos_points), torch.cat(pos_ctr_logits)  # (P, 2), (P,)
        pred_boxes, gt_boxes = decode_ltrb(pos_points, torch.cat(pos_ltrb)), torch.cat(pos_gt)  # (P, 4)

        gt_ltrb = torch.cat([pos_points - gt_boxes[:, :2], gt_boxes[:, 2:] - pos_points], dim=1)  # (P, 4)
        ctr_targets = centerness_target(gt_ltrb)  # (P,)
        num_pos = reduce_normalizer(len(ctr_targets), cls_logits.device)
        # The official code divides the centerness-weighted box loss by the (rank-averaged)
        # sum of centerness targets without rounding it up to 1, so keep it unclamped.
        ctr_sum = reduce_normalizer(ctr_targets.sum(), cls_logits.device, min_value=1e-6)
        return {
            "loss_cls": self.loss.cls_loss(cls_logits, cls_targets, num_pos),
            "loss_box": self.loss.box_loss(pred_boxes, gt_boxes, ctr_sum, weights=ctr_targets),
            "loss_centerness": self.loss.centerness_loss(ctr_logits, ctr_targets, num_pos),
        }

    def inference(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> Detections:
        return self.postprocess(
            outputs["cls_logits"].sigmoid(),  # (B, R, C)
            outputs["ltrb"],
            outputs["points"],
            outputs["level_sizes"],
            image_size,
            quality=outputs["centerness"].sigmoid(),  # (B, R)
        )

    def inference_padded(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.postprocess.forward_padded(
            outputs["cls_logits"].sigmoid(), outputs["ltrb"], outputs["points"], outputs["level_sizes"], image_size,
            quality=outputs["centerness"].sigmoid(),
        )  # fmt: skip
