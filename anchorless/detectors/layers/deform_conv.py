"""Modulated deformable convolution (DCNv2) that predicts its own offsets and masks."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import DeformConv2d


class ModulatedDeformConv3x3(nn.Module):
    """3x3 modulated deformable conv (DCNv2) whose offsets and masks come from a plain conv.

    Hand-written wrapper because torchvision's DeformConv2d takes offsets as an input
    rather than predicting them; offsets start at zero so it begins as a plain conv.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.offset_mask = nn.Conv2d(in_channels, 3 * 9, kernel_size=3, padding=1)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        self.conv = DeformConv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset_x, offset_y, mask = self.offset_mask(x).chunk(3, dim=1)  # 3 x (B, 9, H, W)
        offset = torch.cat([offset_x, offset_y], dim=1)  # (B, 18, H, W)
        return self.conv(x, offset, mask.sigmoid())
