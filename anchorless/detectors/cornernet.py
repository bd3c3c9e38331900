"""CornerNet, "Detecting Objects as Paired Keypoints" (Law & Deng, ECCV 2018).

A box is a pair of keypoints: its top-left and bottom-right corners. Per stride-4 map the
network predicts, for each kind of corner, a heatmap per class, a 1-D embedding (the two
corners of one object embed close together, of different objects apart) and a sub-cell
offset; corner pooling in front of the branches carries the object's features out to its
corners. Every hourglass stack is supervised; the last one predicts. Decoding pairs the top
corners (:mod:`~anchorless.detectors.postprocess.corners`) and applies Soft-NMS.

The trunk is the stacked hourglass (``backbone.depth`` 104, the paper's; 52, one stack) or
a ResNet with CenterNet's upsampler (``backbone.depth`` 18/34/50), see
:class:`~anchorless.detectors.backbones.KeypointBackbone`.

Shapes: B images, C classes, H x W the stride-4 map, S stacks, M the most objects of an image.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from anchorless.detectors.assigners import CornerTarget
from anchorless.detectors.backbones import KeypointBackbone
from anchorless.detectors.base import Detections, SingleMapDetector, reduce_normalizer
from anchorless.detectors.layers import CornerPooling
from anchorless.detectors.losses import EmbeddingLoss, GaussianFocalLoss
from anchorless.detectors.losses.base import weighted_sum
from anchorless.detectors.necks import NoNeck
from anchorless.detectors.postprocess.corners import CornerPostprocess
from anchorless.detectors.registry import register

# The loss clamps heatmap probabilities so log() stays finite; decoding reads the plain sigmoid.
PROB_EPS = 1e-4


def prediction_branch(in_channels: int, channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """The official ``make_kp_layer``: 3x3 conv (with bias, no norm) + ReLU + 1x1 conv
    (CornerNet-Squeeze: a 1x1 first conv, ``kernel_size=1``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size=kernel_size, padding=kernel_size // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, out_channels, kernel_size=1),
    )


class KeypointBranches(nn.Module):
    """One keypoint kind's predictions from its pooled map: heatmap (C), and optionally an
    embedding (1) and an offset (2)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        heatmap_bias: float,
        embedding: bool = True,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.heatmap = prediction_branch(in_channels, channels, num_classes, kernel_size)
        self.embedding = prediction_branch(in_channels, channels, 1, kernel_size) if embedding else None
        self.offset = prediction_branch(in_channels, channels, 2, kernel_size)
        nn.init.constant_(self.heatmap[-1].bias, heatmap_bias)

    def forward(self, x: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
        out = {f"{kind}_heatmap": self.heatmap(x), f"{kind}_offset": self.offset(x)}  # (B, C | 2, H, W)
        if self.embedding is not None:
            out[f"{kind}_embedding"] = self.embedding(x)  # (B, 1, H, W)
        return out


class CornerNetHead(nn.Module):
    """Per stack: a corner-pooling module for each corner kind (top-left: top and left pooling;
    bottom-right: bottom and right), then heatmap, embedding and offset branches.

    Args:
        in_channels, num_classes, num_stacks: set by the detector.
        channels: hidden width of each prediction branch (256, the official ``curr_dim``).
        pool_channels: width of the pooling modules' two branches (128).
        heatmap_bias: initial heatmap logit, -2.19 (probability 0.1) as the official code.
        branch_kernel: kernel of each branch's first conv, 3 (CornerNet-Squeeze: 1).
    """

    pooling: ClassVar[type[nn.Module]] = CornerPooling

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_stacks: int = 1,
        *,
        channels: int = 256,
        pool_channels: int = 128,
        heatmap_bias: float = -2.19,
        branch_kernel: int = 3,
    ) -> None:
        super().__init__()
        if branch_kernel < 1 or branch_kernel % 2 == 0:
            raise ValueError(f"branch_kernel must be an odd number >= 1, got {branch_kernel}")
        self.branch_kernel = branch_kernel  # read by stack_modules
        self.stacks = nn.ModuleList(
            nn.ModuleDict(self.stack_modules(in_channels, num_classes, channels, pool_channels, heatmap_bias))
            for _ in range(num_stacks)
        )

    def stack_modules(
        self, in_channels: int, num_classes: int, channels: int, pool_channels: int, heatmap_bias: float
    ) -> dict[str, nn.Module]:
        return {
            "tl_pool": self.pooling(in_channels, ("top", "left"), pool_channels),
            "br_pool": self.pooling(in_channels, ("bottom", "right"), pool_channels),
            "tl": KeypointBranches(in_channels, channels, num_classes, heatmap_bias, kernel_size=self.branch_kernel),
            "br": KeypointBranches(in_channels, channels, num_classes, heatmap_bias, kernel_size=self.branch_kernel),
        }

    def forward_stack(self, modules: nn.ModuleDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**modules["tl"](modules["tl_pool"](x), "tl"), **modules["br"](modules["br_pool"](x), "br")}

    def forward(self, features: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """features: the stacks' maps, or only the last ones (inference reads the last stack)."""
        stacks = self.stacks[len(self.stacks) - len(features) :]
        return [self.forward_stack(modules, x) for modules, x in zip(stacks, features)]


class CornerNetLoss(nn.Module):
    """CornerNet's weighted losses, for every keypoint kind the head predicts, summed over
    the kinds and averaged over the stacks (the official code divides the sum by the stacks).

    Args:
        heatmap: weight of the penalty-reduced focal loss on each heatmap (1).
        pull, push: weights of the associative-embedding terms (0.1, 0.1).
        offset: weight of the SmoothL1 offset loss (1).
        alpha, beta: focal exponent and penalty-reduction exponent (2, 4).
        margin: the push margin Delta (1).
    """

    def __init__(
        self,
        *,
        heatmap: float = 1.0,
        pull: float = 0.1,
        push: float = 0.1,
        offset: float = 1.0,
        alpha: float = 2.0,
        beta: float = 4.0,
        margin: float = 1.0,
    ) -> None:
        super().__init__()
        self.heatmap_loss = GaussianFocalLoss(weight=heatmap, alpha=alpha, beta=beta)
        self.embedding_loss = EmbeddingLoss(pull=pull, push=push, margin=margin)
        self.offset_weight = offset

    def offset_loss(self, pred: torch.Tensor, target: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
        return weighted_sum(F.smooth_l1_loss(pred, target, reduction="none"), self.offset_weight, normalizer)


@register("cornernet")
class CornerNet(SingleMapDetector):
    """CornerNet: Hourglass-104 (or ResNet + upsampler), corner pooling, corner heatmaps,
    embeddings and offsets; pairing and Soft-NMS at inference."""

    components = {
        "backbone": KeypointBackbone,
        "neck": NoNeck,
        "head": CornerNetHead,
        "assigner": CornerTarget,
        "loss": CornerNetLoss,
        "postprocess": CornerPostprocess,
    }
    keypoints: ClassVar[tuple[str, ...]] = ("tl", "br")  # the kinds the head predicts

    @classmethod
    def head_inputs(cls, neck: nn.Module, num_classes: int) -> tuple[Any, ...]:
        return neck.out_channels[0], num_classes, len(neck.out_channels)

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, Any]:
        # Every stack learns; only the last predicts (the official test runs its heads alone).
        return {"stacks": self.head(features if self.training else features[-1:])}

    # ------------------------------------------------------------------ training
    def losses(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        stacks = outputs["stacks"]
        batch, num_classes, height, width = stacks[0]["tl_heatmap"].shape
        device = stacks[0]["tl_heatmap"].device
        matches = [self.assigner(t["boxes"], t["labels"], num_classes, (height, width), self.stride) for t in targets]
        most = max([len(m.gt_idx) for m in matches] + [1])
        mask = torch.zeros(batch, most, dtype=torch.bool, device=device)  # (B, M)
        for i, match in enumerate(matches):
            mask[i, : len(match.gt_idx)] = True
        num_objects = reduce_normalizer(mask.sum(), device)
        heatmaps, cells, offsets, num_peaks = {}, {}, {}, {}
        for kind in self.keypoints:
            heatmaps[kind] = torch.stack([getattr(m, kind).heatmap for m in matches])  # (B, C, H, W)
            num_peaks[kind] = reduce_normalizer(heatmaps[kind].eq(1).sum(), device)
            cells[kind] = torch.zeros(batch, most, dtype=torch.long, device=device)  # (B, M)
            offsets[kind] = torch.zeros(batch, most, 2, device=device)  # (B, M, 2)
            for i, match in enumerate(matches):
                count = len(match.gt_idx)
                cells[kind][i, :count] = getattr(match, kind).cells
                offsets[kind][i, :count] = getattr(match, kind).offsets

        total = {"loss_heatmap": 0.0, "loss_pull": 0.0, "loss_push": 0.0, "loss_offset": 0.0}
        for stack in stacks:
            for kind in self.keypoints:
                prob = stack[f"{kind}_heatmap"].sigmoid().clamp(PROB_EPS, 1 - PROB_EPS)  # (B, C, H, W)
                total["loss_heatmap"] = total["loss_heatmap"] + self.loss.heatmap_loss(
                    prob, heatmaps[kind], num_peaks[kind]
                )
                pred_offset = _at_cells(stack[f"{kind}_offset"], cells[kind])  # (B, M, 2)
                total["loss_offset"] = total["loss_offset"] + self.loss.offset_loss(
                    pred_offset[mask], offsets[kind][mask], num_objects
                )
            tl_tag = _at_cells(stack["tl_embedding"], cells["tl"])[..., 0]  # (B, M)
            br_tag = _at_cells(stack["br_embedding"], cells["br"])[..., 0]  # (B, M)
            pull, push = self.loss.embedding_loss(tl_tag, br_tag, mask)
            total["loss_pull"] = total["loss_pull"] + pull
            total["loss_push"] = total["loss_push"] + push
        return {name: value / len(stacks) for name, value in total.items()}

    # ------------------------------------------------------------------ inference
    def probabilities(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The last stack's outputs with heatmaps as (unclamped) probabilities."""
        last = outputs["stacks"][-1]
        return {name: value.sigmoid() if name.endswith("_heatmap") else value for name, value in last.items()}

    def inference(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> Detections:
        return self.postprocess.decode(self.probabilities(outputs), image_size, self.stride)

    def inference_padded(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.postprocess.decode_padded(self.probabilities(outputs), image_size, self.stride)


def _at_cells(feature: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The D values of a (B, D, H, W) map at flat cells (B, M) -> (B, M, D)."""
    index = cells.unsqueeze(1).expand(-1, feature.shape[1], -1)  # (B, D, M)
    return feature.flatten(2).gather(2, index).transpose(1, 2)
