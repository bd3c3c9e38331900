"""FCOS (Tian et al., ICCV 2019 / TPAMI 2020), with the improvements of the official
"imprv" models: centre sampling, GIoU loss, centerness on the regression branch,
regression normalised by the stride.

Every location of P3-P7 inside a box whose size suits that level regresses the distances
(l, t, r, b) to the box sides; a centerness branch down-weights off-centre locations at
test time. Inference keeps cls > 0.05, top 1000 per level, score sqrt(cls * centerness),
class-wise NMS at 0.6, top 100.

Shapes: B images, C classes, L levels, R = locations of all levels, P = positives.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from torchvision.ops import clip_boxes_to_image

from anchorless.detectors.assigners import PointAssigner
from anchorless.detectors.backbones import ResNetBackbone
from anchorless.detectors.base import BaseDetector, DetectorConfigError, Detections, grid_points, reduce_normalizer
from anchorless.detectors.losses import CenternessLoss, FocalLoss, IoULoss, centerness_target
from anchorless.detectors.necks import FPN
from anchorless.detectors.postprocess import LevelwisePostprocess


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.GroupNorm(32, channels), nn.ReLU()]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
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
        super().__init__()
        self.strides = tuple(strides)
        self.cls_tower = _tower(in_channels, num_convs)
        self.reg_tower = _tower(in_channels, num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))  # (L,)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

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
        box_loss: "giou" (official imprv), "diou" or "ciou".
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).
    """

    def __init__(
        self,
        *,
        cls: float = 1.0,
        box: float = 1.0,
        centerness: float = 1.0,
        box_loss: Literal["giou", "diou", "ciou"] = "giou",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cls_loss = FocalLoss(weight=cls, alpha=focal_alpha, gamma=focal_gamma)
        self.box_loss = IoULoss(weight=box, kind=box_loss)
        self.centerness_loss = CenternessLoss(weight=centerness)


class FCOS(BaseDetector):
    """FCOS: ResNet + FPN P3-P7, shared head, PointAssigner, per-level top-k + NMS."""

    components = {
        "backbone": ResNetBackbone,
        "neck": FPN,
        "head": FCOSHead,
        "assigner": PointAssigner,
        "loss": FCOSLoss,
        "postprocess": LevelwisePostprocess,
    }
    # Official FCOS R50: frozen BatchNorm, stem and res2 frozen (FREEZE_CONV_BODY_AT 2).
    defaults = {"backbone": {"depth": 50, "norm": "frozen_bn", "frozen_stages": 2}}

    @classmethod
    def from_config(cls, num_classes: int, cfg: dict[str, dict[str, Any]]) -> FCOS:
        backbone = cls.make("backbone", ResNetBackbone, FPN.in_strides, **cfg["backbone"])
        neck = cls.make("neck", FPN, backbone.out_channels, **cfg["neck"])
        assigner = cls.make("assigner", PointAssigner, **cfg["assigner"])
        if assigner.num_levels != len(FPN.out_strides):
            raise DetectorConfigError(
                f"detector.assigner.size_ranges: {assigner.num_levels + 1} entries give {assigner.num_levels} "
                f"levels; the FPN has {len(FPN.out_strides)} (P3-P7), so give {len(FPN.out_strides) + 1}"
            )
        return cls(
            num_classes,
            backbone,
            neck,
            cls.make("head", FCOSHead, neck.out_channels[0], num_classes, FPN.out_strides, **cfg["head"]),
            assigner,
            cls.make("loss", FCOSLoss, **cfg["loss"]),
            cls.make("postprocess", LevelwisePostprocess, **cfg["postprocess"]),
        )

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, Any]:
        cls_logits, ltrb, centerness = self.head(features)
        device = cls_logits.device
        strides = self.head.strides
        points, point_strides, point_levels, sizes = [], [], [], []
        for level, (feature, stride) in enumerate(zip(features, strides)):
            height, width = feature.shape[-2:]
            points.append(grid_points(height, width, stride, device))  # (H_l*W_l, 2)
            point_strides.append(torch.full((height * width,), stride, device=device))
            point_levels.append(torch.full((height * width,), level, device=device, dtype=torch.long))
            sizes.append(height * width)
        points = torch.cat(points)  # (R, 2)
        boxes = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)  # (B, R, 4)
        return {
            "cls_logits": cls_logits,  # (B, R, C)
            "boxes": boxes,  # (B, R, 4)
            "centerness": centerness,  # (B, R)
            "points": points,  # (R, 2)
            "point_strides": torch.cat(point_strides),  # (R,)
            "point_levels": torch.cat(point_levels),  # (R,)
            "level_sizes": sizes,  # L ints
        }

    def losses(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        cls_logits, boxes, centerness = outputs["cls_logits"], outputs["boxes"], outputs["centerness"]
        points = outputs["points"]  # (R, 2)
        cls_targets = torch.zeros_like(cls_logits)  # (B, R, C)
        pos_points, pos_pred, pos_gt, pos_ctr_logits = [], [], [], []
        for i, target in enumerate(targets):
            matched = self.assigner(points, outputs["point_strides"], outputs["point_levels"], target["boxes"])  # (R,)
            pos = torch.nonzero(matched >= 0).squeeze(1)  # (P_i,)
            cls_targets[i, pos, target["labels"][matched[pos]]] = 1.0
            pos_points.append(points[pos])  # (P_i, 2)
            pos_pred.append(boxes[i, pos])  # (P_i, 4)
            pos_gt.append(target["boxes"][matched[pos]])  # (P_i, 4)
            pos_ctr_logits.append(centerness[i, pos])  # (P_i,)
        pos_points, ctr_logits = torch.cat(pos_points), torch.cat(pos_ctr_logits)  # (P, 2), (P,)
        pred_boxes, gt_boxes = torch.cat(pos_pred), torch.cat(pos_gt)  # (P, 4)

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
        post = self.postprocess
        cls_probs = outputs["cls_logits"].sigmoid()  # (B, R, C)
        ctr_probs = outputs["centerness"].sigmoid()  # (B, R)
        level_sizes = outputs["level_sizes"]
        detections = []
        for probs, ctr, image_boxes in zip(cls_probs, ctr_probs, outputs["boxes"]):
            kept_boxes, kept_scores, kept_labels = [], [], []
            for level_probs, level_ctr, level_boxes in zip(
                probs.split(level_sizes), ctr.split(level_sizes), image_boxes.split(level_sizes)
            ):
                point_idx, labels = torch.nonzero(level_probs > post.score_threshold, as_tuple=True)  # (N,)
                scores = level_probs[point_idx, labels] * level_ctr[point_idx]  # (N,)
                if scores.numel() > post.pre_nms_topk:
                    scores, top = scores.topk(post.pre_nms_topk)
                    point_idx, labels = point_idx[top], labels[top]
                kept_boxes.append(level_boxes[point_idx])
                kept_scores.append(scores)
                kept_labels.append(labels)
            boxes = clip_boxes_to_image(torch.cat(kept_boxes), image_size)  # (N, 4)
            scores = torch.cat(kept_scores).sqrt()  # (N,)
            detections.append(post.select(boxes, scores, torch.cat(kept_labels)))
        return detections
