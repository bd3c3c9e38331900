"""Generalized Focal Loss: GFL v1 (Li et al., NeurIPS 2020) and v2 (Li et al., CVPR 2021).

The head is FCOS's shared tower pair on P3-P7 without the centerness branch, trained with
ATSS (anchor side 8 strides, 9 candidates per level). One classification score per class
also carries the localisation quality: Quality Focal Loss pulls a negative to 0 and a
positive at its class to the IoU of its decoded box with its ground truth. Each box side is
a discrete distribution over 0..reg_max strides; the side is its expectation (integral
regression), trained by Distribution Focal Loss and by GIoU on the decoded box. v2
(``head.version: v2``, registered as ``gfl_v2``) multiplies the score by a quality that a
small MLP reads off each side's distribution (its top-k probabilities and their mean): a
sharp distribution means a well-located box. Inference (:class:`LevelwisePostprocess`):
score > 0.05, top 1000 per level, class-wise NMS at 0.6, top 100.

Shapes: B images, C classes, L levels, R = locations of all levels, P = positives,
n + 1 = reg_max + 1 bins per side.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from anchorless.detectors.assigners import ATSSAssigner
from anchorless.detectors.backbones import ResNetBackbone
from anchorless.detectors.base import Detections, PyramidDetector, reduce_normalizer
from anchorless.detectors.layers import TowerHead, init_dense_head
from anchorless.detectors.losses import (
    DistributionFocalLoss,
    IoUKind,
    IoULoss,
    QualityFocalLoss,
    elementwise_iou,
)
from anchorless.detectors.necks import FPN
from anchorless.detectors.postprocess import LevelwisePostprocess, decode_ltrb
from anchorless.detectors.registry import register

# DFL needs a target strictly below reg_max (its right bin would not exist): the official
# code clamps the side targets to reg_max - 0.1 strides.
TARGET_MARGIN = 0.1


def integral(logits: torch.Tensor) -> torch.Tensor:
    """(..., n + 1) logits over the bins 0..n -> (...) the expectation of their softmax."""
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)  # (n + 1,)
    return logits.softmax(dim=-1) @ bins


def dgqp_features(probs: torch.Tensor, topk: int) -> torch.Tensor:
    """GFL v2's statistics of the side distributions: (..., 4, n + 1) probabilities ->
    (..., 4 * (topk + 1)): per side its ``topk`` largest probabilities, then their mean."""
    top = probs.topk(topk, dim=-1).values  # (..., 4, k)
    return torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1).flatten(-2)  # (..., 4 (k + 1))


class GFLHead(TowerHead):
    """Two towers shared by all levels (``num_convs`` x 3x3 conv + GroupNorm + ReLU); class
    logits on the first, 4 x (reg_max + 1) side logits on the second, times a learnable
    scale per level; v2 adds the Distribution-Guided Quality Predictor.

    Args:
        in_channels, num_classes, strides: set by the detector.
        num_convs: depth of each tower (4).
        prior_prob: initial foreground probability of the classifier (0.01).
        reg_max: the largest side a distribution reaches, in strides (16: bins 0..16).
        version: "v1" (GFL) or "v2" (GFL v2: score = classification x DGQP quality).
        dgqp_topk: v2's top-k probabilities per side (4).
        dgqp_channels: hidden width of v2's quality MLP (64).
        dist_bias_decay: initial bias of bin k of every side's distribution is
            -dist_bias_decay * k. 0 (the official code) starts every distribution uniform, so
            every side starts at reg_max / 2 = 8 strides; 1 starts sides near 0.6 strides, as
            FCOS's ReLU'd sides start near 0. Why it matters: QFL's target is the IoU of a
            positive's box, and its box losses are weighted by its score, so a lone object
            much smaller than the first boxes gets a quality target near 0, hence almost no
            weight on its own box loss, and can stay unlearned: two of the fifteen 10-60 px
            objects of our overfit test after 150 steps at 0, none after 40 at 1.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        *,
        num_convs: int = 4,
        prior_prob: float = 0.01,
        reg_max: int = 16,
        version: Literal["v1", "v2"] = "v1",
        dgqp_topk: int = 4,
        dgqp_channels: int = 64,
        dist_bias_decay: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes, strides, num_convs)
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        if reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        if not 1 <= dgqp_topk <= reg_max + 1:
            raise ValueError(f"dgqp_topk must be in 1..reg_max + 1, got {dgqp_topk}")
        self.reg_max, self.version, self.dgqp_topk = reg_max, version, dgqp_topk
        self.dist_pred = nn.Conv2d(in_channels, 4 * (reg_max + 1), kernel_size=3, padding=1)
        # v2's quality MLP as 1x1 convs, as the official code: 4 (k + 1) -> hidden -> 1.
        self.quality: nn.Module | None = None
        if version == "v2":
            self.quality = nn.Sequential(
                nn.Conv2d(4 * (dgqp_topk + 1), dgqp_channels, kernel_size=1),
                nn.ReLU(),
                nn.Conv2d(dgqp_channels, 1, kernel_size=1),
            )
        init_dense_head(self, self.cls_logits, prior_prob)
        with torch.no_grad():
            self.dist_pred.bias.copy_((-dist_bias_decay * torch.arange(reg_max + 1.0)).repeat(4))  # (4 (n + 1),)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """L maps (B, D, H_l, W_l) -> class logits (B, R, C), side logits (B, R, 4, n + 1),
        v2's quality in (0, 1) (B, R) or None."""
        cls_logits, dist_logits, quality = [], [], []
        for level, feature in enumerate(features):
            batch, _, height, width = feature.shape
            cls_logits.append(self.cls_logits(self.cls_tower(feature)).flatten(2))  # (B, C, H_l*W_l)
            dist = self.dist_pred(self.reg_tower(feature)) * self.scales[level]  # (B, 4 (n + 1), H_l, W_l)
            dist = dist.view(batch, 4, self.reg_max + 1, height * width).permute(0, 3, 1, 2)  # (B, H_l*W_l, 4, n + 1)
            dist_logits.append(dist)
            if self.quality is not None:
                stats = dgqp_features(dist.softmax(dim=-1), self.dgqp_topk)  # (B, H_l*W_l, 4 (k + 1))
                stats = stats.transpose(1, 2).reshape(batch, -1, height, width)
                quality.append(self.quality(stats).sigmoid().flatten(1))  # (B, H_l*W_l)
        return (
            torch.cat(cls_logits, dim=2).transpose(1, 2),  # (B, R, C)
            torch.cat(dist_logits, dim=1),  # (B, R, 4, n + 1)
            torch.cat(quality, dim=1) if quality else None,  # (B, R)
        )


class GFLLoss(nn.Module):
    """GFL's weighted losses (the paper's weights).

    Args:
        qfl: weight of Quality Focal Loss, normalised by positives (1).
        dfl: weight of Distribution Focal Loss (0.25).
        box: weight of the IoU-family box loss (2).
        box_loss: its kind: "giou" (the paper), "iou", "linear_iou", "diou" or "ciou".
        qfl_beta: QFL's modulating exponent (2).

    DFL and the box loss weigh each positive by its (detached) best class score and are
    normalised by the sum of those weights, as the official code does.
    """

    def __init__(
        self,
        *,
        qfl: float = 1.0,
        dfl: float = 0.25,
        box: float = 2.0,
        box_loss: IoUKind = "giou",
        qfl_beta: float = 2.0,
    ) -> None:
        super().__init__()
        self.qfl_loss = QualityFocalLoss(weight=qfl, beta=qfl_beta)
        self.dfl_loss = DistributionFocalLoss(weight=dfl)
        self.box_loss = IoULoss(weight=box, kind=box_loss)


@register("gfl")
class GFL(PyramidDetector):
    """GFL: ResNet + FPN P3-P7, shared head with side distributions, ATSS, QFL + DFL + GIoU,
    per-level top-k + NMS; ``head.version`` switches to v2."""

    components = {
        "backbone": ResNetBackbone,
        "neck": FPN,
        "head": GFLHead,
        "assigner": ATSSAssigner,
        "loss": GFLLoss,
        "postprocess": LevelwisePostprocess,
    }
    # Official GFL R50: frozen BatchNorm, stem and res2 frozen (as FCOS's).
    defaults = {"backbone": {"depth": 50, "norm": "frozen_bn", "frozen_stages": 2}}

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, Any]:
        cls_logits, dist_logits, quality = self.head(features)
        locations = self.locations(features, self.head.strides)
        strides = locations["point_strides"].to(dist_logits.dtype)  # (R,)
        scores = cls_logits.sigmoid()  # (B, R, C)
        if quality is not None:
            scores = scores * quality[..., None]  # v2: the joint score
        return {
            "cls_logits": cls_logits,  # (B, R, C)
            "scores": scores,  # (B, R, C) classification x quality, what inference ranks
            "dist_logits": dist_logits,  # (B, R, 4, n + 1)
            "ltrb": integral(dist_logits) * strides[None, :, None],  # (B, R, 4) in pixels
            **locations,  # points (R, 2), point_strides, point_levels, level_sizes
        }

    def losses(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        points, point_strides = outputs["points"], outputs["point_strides"]  # (R, 2), (R,)
        cls_logits, scores = outputs["cls_logits"], outputs["scores"]  # (B, R, C) each
        batch_idx, pos, gt_boxes, gt_labels = [], [], [], []
        for i, target in enumerate(targets):
            match = self.assigner(points, point_strides, outputs["point_levels"], target["boxes"])
            batch_idx.append(torch.full_like(match.pred_idx, i))
            pos.append(match.pred_idx)  # (P_i,)
            gt_boxes.append(target["boxes"][match.gt_idx])  # (P_i, 4)
            gt_labels.append(target["labels"][match.gt_idx])  # (P_i,)
        batch_idx, pos, gt_boxes, gt_labels = torch.cat(batch_idx), torch.cat(pos), torch.cat(gt_boxes), torch.cat(gt_labels)
        pos_points, pos_strides = points[pos], point_strides[pos].to(gt_boxes.dtype)[:, None]  # (P, 2), (P, 1)
        pred_boxes = decode_ltrb(pos_points, outputs["ltrb"][batch_idx, pos])  # (P, 4)

        with torch.no_grad():
            # QFL's target at a positive's class: the IoU its box reaches now; 0 everywhere else.
            quality_targets = torch.zeros_like(scores)  # (B, R, C)
            quality_targets[batch_idx, pos, gt_labels] = elementwise_iou(pred_boxes, gt_boxes)
            weights = scores[batch_idx, pos].max(dim=1).values  # (P,)
            gt_ltrb = torch.cat([pos_points - gt_boxes[:, :2], gt_boxes[:, 2:] - pos_points], dim=1)  # (P, 4)
            side_targets = (gt_ltrb / pos_strides).clamp(0, self.head.reg_max - TARGET_MARGIN)  # (P, 4) in strides
        num_pos = reduce_normalizer(len(pos), cls_logits.device)
        # The official code divides by the (rank-averaged) sum of weights without rounding it up to 1.
        weight_sum = reduce_normalizer(weights.sum(), cls_logits.device, min_value=1e-6)
        v1 = self.head.version == "v1"  # v1's QFL reads logits; v2's the joint probability
        return {
            "loss_qfl": self.loss.qfl_loss(cls_logits if v1 else scores, quality_targets, num_pos, from_logits=v1),
            "loss_box": self.loss.box_loss(pred_boxes, gt_boxes, weight_sum, weights=weights),
            "loss_dfl": self.loss.dfl_loss(
                outputs["dist_logits"][batch_idx, pos].reshape(-1, self.head.reg_max + 1),  # (4P, n + 1)
                side_targets.reshape(-1),  # (4P,)
                4 * weight_sum,  # the official code averages over the four sides
                weights=weights.repeat_interleave(4),
            ),
        }

    def inference(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> Detections:
        # The score already holds the quality: no centerness, no geometric mean.
        return self.postprocess(outputs["scores"], outputs["ltrb"], outputs["points"], outputs["level_sizes"], image_size)

    def inference_padded(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.postprocess.forward_padded(
            outputs["scores"], outputs["ltrb"], outputs["points"], outputs["level_sizes"], image_size
        )


@register("gfl_v2")
class GFLV2(GFL):
    """GFL v2: GFL whose head multiplies the score by the DGQP quality (``head.version: v2``)."""

    defaults = {**GFL.defaults, "head": {"version": "v2"}}
