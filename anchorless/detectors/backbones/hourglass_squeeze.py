"""Hourglass-Squeeze, the trunk of CornerNet-Squeeze (Law et al., "CornerNet-Lite", 2019).

CornerNet's stacked hourglass made cheap per pixel: fire modules
(:class:`~anchorless.detectors.layers.FireModule`) instead of residual blocks inside the
modules, one more stride-2 residual block in the stem so the modules start at stride 8
(a quarter of the pixels of Hourglass-104), one fewer level in each module (four), and 4x4
stride-2 transposed convolutions instead of nearest-neighbour upsampling. Two stacks, as
the paper; every stack is supervised.

Shapes: B images, H x W the stride-8 map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from anchorless.detectors.backbones.hourglass import Hourglass

SQUEEZE_STRIDE = 8


class HourglassSqueeze(nn.Module):
    """(B, 3, H, W) -> one (B, out_channels, H/8, W/8) map per stack.

    Args:
        out_strides: the strides the neck asks for; only (8,) (set by the detector).
        stacks: hourglass modules in sequence (2, the paper's).
        channels: width at each level, the stride-8 one first (256, 256, 384, 384, 512: the
            official four levels); narrow them for small machines.
        blocks: fire modules at each level (2, 2, 2, 2, 4).
        stem_channels: width of the stride-2 7x7 stem conv (128).
        out_channels: width of each stack's output map, which the heads read (256).
        norm: "bn" (official) or "gn".
    """

    def __init__(
        self,
        out_strides: Sequence[int] = (SQUEEZE_STRIDE,),
        *,
        stacks: int = 2,
        channels: Sequence[int] = (256, 256, 384, 384, 512),
        blocks: Sequence[int] = (2, 2, 2, 2, 4),
        stem_channels: int = 128,
        out_channels: int = 256,
        norm: Literal["bn", "gn"] = "bn",
    ) -> None:
        super().__init__()
        if tuple(out_strides) != (SQUEEZE_STRIDE,):
            raise ValueError(f"Hourglass-Squeeze ends at stride 8; out_strides must be [8], got {list(out_strides)}")
        self.trunk = Hourglass(
            stacks=stacks, channels=channels, blocks=blocks, stem_channels=stem_channels, out_channels=out_channels,
            norm=norm, block="fire", upsample="transposed", stem_stride=SQUEEZE_STRIDE,
        )  # fmt: skip
        self.out_channels = self.trunk.out_channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.trunk(images)
