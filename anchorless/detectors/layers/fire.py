"""The fire module of CornerNet-Squeeze (after SqueezeNet, Iandola et al. 2016), the block
that replaces the hourglass's residual block.

A 1x1 "squeeze" convolution narrows the input, then an "expand" layer runs a 1x1 and a
depthwise 3x3 convolution side by side and concatenates them; a stride, when asked for,
sits in the expand layer. A 3x3 residual block of width C costs 18 C^2 weights, a fire
module about 0.75 C^2 (at squeeze ratio 2), which is where Squeeze's speed comes from.

Shapes: B images, H x W the map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]


class FireModule(nn.Module):
    """1x1 squeeze conv-norm, then [1x1 conv | depthwise 3x3 conv] concatenated, norm, plus the
    input where the shape is kept, ReLU (the official ``fire_module``: no ReLU between the
    squeeze and the expand layer, and no projection on a skip that would change shape).

    Args:
        in_channels, out_channels: widths in and out; each expand branch gives half of
            ``out_channels``, and the depthwise one needs that half to be a multiple of the
            squeezed width.
        stride: 1, or 2 to halve the map (both expand branches are strided).
        norm: the normalisation factory (BatchNorm as the official code).
        squeeze_ratio: the squeeze layer is ``out_channels // squeeze_ratio`` wide (2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm: NormFactory = nn.BatchNorm2d,
        squeeze_ratio: int = 2,
    ) -> None:
        super().__init__()
        squeezed, half = out_channels // squeeze_ratio, out_channels // 2
        if out_channels % squeeze_ratio or out_channels % 2 or squeezed < 1 or half % squeezed:
            raise ValueError(
                f"fire module: out_channels {out_channels} must be even, and a multiple of the squeezed "
                f"width out_channels // squeeze_ratio ({squeeze_ratio}) times 2"
            )
        self.squeeze = nn.Sequential(nn.Conv2d(in_channels, squeezed, 1, bias=False), norm(squeezed))
        self.expand_1x1 = nn.Conv2d(squeezed, half, 1, stride=stride, bias=False)
        # Depthwise: one 3x3 filter per squeezed channel (groups = channels), as the official code.
        self.expand_3x3 = nn.Conv2d(squeezed, half, 3, stride=stride, padding=1, groups=squeezed, bias=False)
        self.norm = norm(out_channels)
        self.keeps_shape = stride == 1 and in_channels == out_channels
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeeze(x)  # (B, out/ratio, H, W)
        expanded = torch.cat([self.expand_1x1(squeezed), self.expand_3x3(squeezed)], dim=1)  # (B, out, H', W')
        expanded = self.norm(expanded)
        return self.relu(expanded + x if self.keeps_shape else expanded)
