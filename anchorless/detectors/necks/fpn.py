"""FPN P3-P7 (torchvision's FeaturePyramidNetwork with P6, P7), as FCOS uses it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7


class FPN(nn.Module):
    """FPN P3-P7 from C3-C5: torchvision's FeaturePyramidNetwork with LastLevelP6P7.

    P6 is a stride-2 3x3 conv on P5 (as the FCOS paper and torchvision's FCOS do; RetinaNet
    used C5), P7 a stride-2 conv on ReLU(P6).

    Args:
        in_channels: channels of C3, C4, C5 (set by the backbone).
        out_channels: width of every pyramid level.
    """

    in_strides = (8, 16, 32)
    out_strides = (8, 16, 32, 64, 128)

    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), *, out_channels: int = 256) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(
            list(in_channels), out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels)
        )
        self.out_channels = [out_channels] * len(self.out_strides)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        named = OrderedDict((str(i), f) for i, f in enumerate(features))
        return list(self.fpn(named).values())
