"""The trunk of the keypoint detectors (CornerNet, CenterNet keypoint triplets): a stacked
hourglass (the papers'), or a ResNet with CenterNet's deconvolution upsampler, so they can
also race on a CPU beside the ResNet detectors. Either way it returns stride-4 maps, one per
supervised stack (one for the ResNet)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from anchorless.detectors.backbones.hourglass import HOURGLASS_DEPTHS, Hourglass
from anchorless.detectors.backbones.resnet import ResNetBackbone
from anchorless.detectors.necks.deconv import DeconvUpsampler


class KeypointBackbone(nn.Module):
    """Stride-4 maps for corner (and centre) keypoint heads.

    Args:
        out_strides: the strides the neck asks for; only (4,) (set by the detector).
        depth: 104 or 52, the stacked hourglass (2 stacks / 1 stack); 18, 34 or 50, a
            ResNet followed by CenterNet's deconvolution upsampler.
        norm: "bn" (official), "gn", or (ResNet only) "frozen_bn".
        stacks: hourglass only: override the depth's number of stacks.
        channels: hourglass only: per-level widths, the stride-4 one first (null: the
            papers' (256, 256, 384, 384, 384, 512)); narrow them for small machines.
        blocks: hourglass only: residual blocks per level (null: (2, 2, 2, 2, 2, 4)).
        out_channels: hourglass only: width of each stack's output map (256).
        pretrained: ResNet only: a local torchvision state dict, or null.
        frozen_stages: ResNet only: leading stages without gradient (0).
        upsample_channels: ResNet only: the upsampler's three widths; the last is the map's.
        upsample_skips: ResNet only: add projections of C4..C2 in the upsampler
            (see :class:`~anchorless.detectors.necks.DeconvUpsampler`).
    """

    def __init__(
        self,
        out_strides: Sequence[int] = (4,),
        *,
        depth: Literal[18, 34, 50, 52, 104] = 104,
        norm: Literal["bn", "frozen_bn", "gn"] = "bn",
        stacks: int | None = None,
        channels: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        out_channels: int = 256,
        pretrained: str | None = None,
        frozen_stages: int = 0,
        upsample_channels: Sequence[int] = (256, 128, 64),
        upsample_skips: bool = False,
    ) -> None:
        super().__init__()
        if tuple(out_strides) != (4,):
            raise ValueError(f"keypoint heads read stride-4 maps; out_strides must be [4], got {list(out_strides)}")
        self.is_hourglass = depth in HOURGLASS_DEPTHS
        if self.is_hourglass:
            if pretrained is not None or frozen_stages:
                raise ValueError("pretrained and frozen_stages apply to the ResNet depths (18, 34, 50) only")
            if norm == "frozen_bn":
                raise ValueError("norm frozen_bn needs pretrained weights: ResNet depths only")
            default_stacks, default_channels, default_blocks = HOURGLASS_DEPTHS[depth]
            self.trunk = Hourglass(
                stacks=default_stacks if stacks is None else stacks,
                channels=default_channels if channels is None else channels,
                blocks=default_blocks if blocks is None else blocks,
                out_channels=out_channels,
                norm=norm,
            )
            self.upsampler = None
            self.out_channels = self.trunk.out_channels
        else:
            if stacks is not None or channels is not None or blocks is not None:
                raise ValueError("stacks, channels and blocks apply to the hourglass depths (52, 104) only")
            strides = (4, 8, 16, 32) if upsample_skips else (32,)
            self.trunk = ResNetBackbone(strides, depth=depth, norm=norm, pretrained=pretrained, frozen_stages=frozen_stages)
            self.upsampler = DeconvUpsampler(
                self.trunk.out_channels,
                channels=upsample_channels,
                norm="gn" if norm == "gn" else "bn",
                skips=upsample_skips,
            )
            self.out_channels = self.upsampler.out_channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.trunk(images)
        return maps if self.upsampler is None else self.upsampler(maps)
