"""CenterNet, "Objects as Points" (Zhou et al., 2019), the ResNet variant.

An object is the peak of its class heatmap at stride 4; the same cell regresses the box
size and the sub-cell offset of the centre. Decoding keeps 3x3 max-pool peaks and the
top 100, no NMS.

Shapes: B images, C classes, H x W the stride-4 map, K objects (peaks) of an image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import clip_boxes_to_image

from anchorless.detectors.assigners import CenterHeatmapTarget
from anchorless.detectors.backbones import ResNetBackbone
from anchorless.detectors.base import Detections, SingleMapDetector, reduce_normalizer
from anchorless.detectors.losses import GaussianFocalLoss, L1Loss
from anchorless.detectors.necks import DeconvUpsampler
from anchorless.detectors.postprocess import (
    Postprocess,
    gather_cells,
    heatmap_peaks,
    topk_heatmap,
    topk_heatmap_batched,
)
from anchorless.detectors.registry import register

# The loss clamps the heatmap probability so log() and the focal terms stay finite. Only the
# loss: decoding reads the plain sigmoid, as the official decoder (clamped, two neighbouring
# cells above logit ~9.2 tie, both survive the max-pool, and one object gives two boxes).
PROB_EPS = 1e-4


def _branch(in_channels: int, channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, out_channels, kernel_size=1),
    )


class CenterNetHead(nn.Module):
    """Three branches (3x3 conv + ReLU + 1x1 conv): heatmap (C), size (2), offset (2).

    Args:
        in_channels, num_classes: set by the detector.
        channels: hidden width of each branch (64 for the ResNet models).
        heatmap_bias: initial heatmap logit, -2.19 (probability 0.1) as the official code.
        size_scale: output cells per unit of the size branch. The official head regresses
            cells directly (1); from its near-zero start, under Adam's per-step bounded
            updates, a 100-cell object takes thousands of steps to be sized. A larger scale
            (TTFNet's 16-pixel base, 4 cells at stride 4) reaches large boxes sooner.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 64,
        heatmap_bias: float = -2.19,
        size_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if size_scale <= 0:
            raise ValueError(f"size_scale must be > 0, got {size_scale}")
        self.size_scale = size_scale
        self.heatmap = _branch(in_channels, channels, num_classes)
        self.size = _branch(in_channels, channels, 2)
        self.offset = _branch(in_channels, channels, 2)
        nn.init.constant_(self.heatmap[-1].bias, heatmap_bias)
        for branch in (self.size, self.offset):  # official: small normal weights, zero bias
            for conv in (branch[0], branch[-1]):
                nn.init.normal_(conv.weight, std=0.001)
                nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heatmap(features), self.size(features) * self.size_scale, self.offset(features)


class CenterNetLoss(nn.Module):
    """CenterNet's weighted losses.

    Args:
        heatmap: weight of the penalty-reduced focal loss (1).
        size: weight of the L1 size loss in output cells (0.1).
        offset: weight of the L1 centre-offset loss (1).
        alpha, beta: focal exponent and the penalty reduction exponent (2, 4).
    """

    def __init__(
        self,
        *,
        heatmap: float = 1.0,
        size: float = 0.1,
        offset: float = 1.0,
        alpha: float = 2.0,
        beta: float = 4.0,
    ) -> None:
        super().__init__()
        self.heatmap_loss = GaussianFocalLoss(weight=heatmap, alpha=alpha, beta=beta)
        self.size_loss = L1Loss(weight=size)
        self.offset_loss = L1Loss(weight=offset)


@register("centernet")
class CenterNet(SingleMapDetector):
    """CenterNet: ResNet + deconvolution upsampler, Gaussian heatmap targets, peak decoding."""

    components = {
        "backbone": ResNetBackbone,
        "neck": DeconvUpsampler,
        "head": CenterNetHead,
        "assigner": CenterHeatmapTarget,
        "loss": CenterNetLoss,
        "postprocess": Postprocess,
    }
    # Official ResNet-18 CenterNet: BatchNorm, nothing frozen.
    defaults = {"backbone": {"depth": 18, "norm": "bn"}}

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, Any]:
        heatmap_logits, size, offset = self.head(features[-1])
        prob = heatmap_logits.sigmoid()  # (B, C, H, W)
        return {"heatmap": prob, "size": size, "offset": offset}  # size, offset: (B, 2, H, W)

    def losses(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        prob = outputs["heatmap"].clamp(PROB_EPS, 1 - PROB_EPS)  # (B, C, H, W)
        size, offset = outputs["size"], outputs["offset"]
        batch, num_classes, height, width = prob.shape
        heatmaps, pred_size, pred_offset, gt_size, gt_offset = [], [], [], [], []
        for i, target in enumerate(targets):
            match = self.assigner(target["boxes"], target["labels"], num_classes, (height, width), self.stride)
            heatmaps.append(match.heatmap)  # (C, H, W)
            pred_size.append(size[i].flatten(1)[:, match.pred_idx].T)  # (K, 2)
            pred_offset.append(offset[i].flatten(1)[:, match.pred_idx].T)  # (K, 2)
            gt_size.append(match.box_targets[:, :2])  # (K, 2) width, height
            gt_offset.append(match.box_targets[:, 2:])  # (K, 2) centre minus its cell
        heatmap = torch.stack(heatmaps)  # (B, C, H, W)
        pred_size, gt_size = torch.cat(pred_size), torch.cat(gt_size)  # (K_total, 2)
        pred_offset, gt_offset = torch.cat(pred_offset), torch.cat(gt_offset)  # (K_total, 2)

        # Normalisers as the official code: heatmap by the number of exact peaks; size and
        # offset by the number of regressed coordinates (its mask covers both channels).
        num_peaks = reduce_normalizer(heatmap.eq(1).sum(), prob.device)
        num_coords = reduce_normalizer(gt_size.numel(), prob.device)
        return {
            "loss_heatmap": self.loss.heatmap_loss(prob, heatmap, num_peaks),
            "loss_size": self.loss.size_loss(pred_size, gt_size, num_coords),
            "loss_offset": self.loss.offset_loss(pred_offset, gt_offset, num_coords),
        }

    def inference(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> Detections:
        peaks = heatmap_peaks(outputs["heatmap"])  # (B, C, H, W)
        detections = []
        for image_peaks, size, offset in zip(peaks, outputs["size"], outputs["offset"]):
            scores, labels, ys, xs = topk_heatmap(image_peaks, self.postprocess.topk)  # (K,) each
            w, h = size[0, ys, xs], size[1, ys, xs]  # (K,)
            cx, cy = xs + offset[0, ys, xs], ys + offset[1, ys, xs]  # (K,)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1) * self.stride  # (K, 4)
            boxes = clip_boxes_to_image(boxes, image_size)
            detections.append(self.postprocess.finalize(boxes, scores, labels))
        return detections

    def inference_padded(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        peaks = heatmap_peaks(outputs["heatmap"])  # (B, C, H, W)
        scores, labels, ys, xs = topk_heatmap_batched(peaks, self.postprocess.topk)  # (B, K) each
        size = gather_cells(outputs["size"], ys, xs)  # (B, K, 2): w, h
        offset = gather_cells(outputs["offset"], ys, xs)  # (B, K, 2): dx, dy
        cx, cy = xs + offset[..., 0], ys + offset[..., 1]  # (B, K)
        w, h = size[..., 0], size[..., 1]  # (B, K)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=2) * self.stride  # (B, K, 4)
        return self.postprocess.finalize_padded(clip_boxes_to_image(boxes, image_size), scores, labels)
