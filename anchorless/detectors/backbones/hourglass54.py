"""Hourglass-54, the trunk of CornerNet-Saccade (Law et al., "CornerNet-Lite", 2019).

Three hourglass modules, 54 layers deep, after a stem that halves the image twice (stride
4). Each module goes down three times, widening to 384, 384 and 512 channels, with one
residual block after each downsampling and in each skip, one 512-channel residual block in
the middle and one after each upsampling (nearest). Every stack is supervised.

Besides each stack's output map, each stack returns its modules' merged maps at strides
4, 8 and 16 (fine to coarse), from which CornerNet-Saccade predicts its attention maps for
small, medium and large objects.

Shapes: B images, H x W the stride-4 map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from anchorless.detectors.backbones.hourglass import Hourglass

ATTENTION_LEVELS = 3  # large, medium, small objects


class Hourglass54(nn.Module):
    """(B, 3, H, W) -> per stack ``[map, level_4, level_8, level_16]``: the (B, out_channels,
    H/4, W/4) map the corner heads read, then the merged maps of the three finest levels,
    fine to coarse (H/4, H/8, H/16). ``out_channels`` holds each stack's widths in the same order.

    Args:
        out_strides: the strides the neck asks for; only (4,) (set by the detector).
        stacks: hourglass modules (3, the paper's).
        channels: width at each level, the stride-4 one first (256, 384, 384, 512: three
            levels, the paper's plan); at least four entries.
        blocks: residual blocks at each level (1, 1, 1, 1).
        stem_channels: width of the stride-2 7x7 stem conv (128).
        out_channels: width of each stack's output map (256).
        norm: "bn" (official) or "gn".
    """

    def __init__(
        self,
        out_strides: Sequence[int] = (4,),
        *,
        stacks: int = 3,
        channels: Sequence[int] = (256, 384, 384, 512),
        blocks: Sequence[int] = (1, 1, 1, 1),
        stem_channels: int = 128,
        out_channels: int = 256,
        norm: Literal["bn", "gn"] = "bn",
    ) -> None:
        super().__init__()
        if tuple(out_strides) != (4,):
            raise ValueError(f"Hourglass-54 ends at stride 4; out_strides must be [4], got {list(out_strides)}")
        if len(channels) < ATTENTION_LEVELS + 1:
            raise ValueError(
                f"channels needs at least {ATTENTION_LEVELS + 1} levels for the attention maps, got {list(channels)}"
            )
        self.trunk = Hourglass(
            stacks=stacks, channels=channels, blocks=blocks, stem_channels=stem_channels, out_channels=out_channels,
            norm=norm,
        )  # fmt: skip
        # A module's merged map has its level's width: the finest level's is channels[0].
        self.out_channels = [(out_channels, *channels[:ATTENTION_LEVELS])] * stacks
        self.level_strides = tuple(4 * 2**level for level in range(ATTENTION_LEVELS))  # (4, 8, 16)

    def forward(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        maps, levels = self.trunk.forward_levels(images)
        # merged runs innermost (coarsest) first: its last three, reversed, are fine to coarse.
        return [[out, *merged[: -ATTENTION_LEVELS - 1 : -1]] for out, merged in zip(maps, levels)]
