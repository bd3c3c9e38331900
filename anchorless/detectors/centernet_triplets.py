"""CenterNet, "Keypoint Triplets for Object Detection" (Duan et al., ICCV 2019); not the
objects-as-points ``centernet``.

CornerNet plus a centre keypoint: a third heatmap (with offsets, no embedding) behind centre
pooling, and cascade corner pooling in front of the corner branches. At inference a paired
box survives only if a detected centre keypoint of its class falls inside its central
region, which rejects the wrong pairings that CornerNet keeps
(:class:`~anchorless.detectors.postprocess.corners.TripletPostprocess`).

Shapes: B images, C classes, H x W the stride-4 map.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from anchorless.detectors.cornernet import CornerNet, CornerNetHead, KeypointBranches
from anchorless.detectors.layers import CascadeCornerPooling, CenterPooling
from anchorless.detectors.postprocess.corners import TripletPostprocess
from anchorless.detectors.registry import register


class TripletHead(CornerNetHead):
    """CornerNet's head with cascade corner pooling, plus a centre-pooling module and centre
    heatmap and offset branches per stack (arguments as :class:`CornerNetHead`)."""

    pooling: ClassVar[type[nn.Module]] = CascadeCornerPooling

    def stack_modules(
        self, in_channels: int, num_classes: int, channels: int, pool_channels: int, heatmap_bias: float
    ) -> dict[str, nn.Module]:
        return {
            **super().stack_modules(in_channels, num_classes, channels, pool_channels, heatmap_bias),
            "ct_pool": CenterPooling(in_channels, pool_channels),
            "ct": KeypointBranches(
                in_channels, channels, num_classes, heatmap_bias, embedding=False, kernel_size=self.branch_kernel
            ),
        }

    def forward_stack(self, modules: nn.ModuleDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**super().forward_stack(modules, x), **modules["ct"](modules["ct_pool"](x), "ct")}


@register("centernet_triplets")
class CenterNetTriplets(CornerNet):
    """CenterNet (keypoint triplets): CornerNet plus centre keypoints and the central-region check."""

    components = {**CornerNet.components, "head": TripletHead, "postprocess": TripletPostprocess}
    keypoints: ClassVar[tuple[str, ...]] = ("tl", "br", "ct")
