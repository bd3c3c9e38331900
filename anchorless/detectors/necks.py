"""Necks: the CenterNet/OneNet deconvolution upsampler (to stride 4) and FPN P3-P7."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torchvision.ops import DeformConv2d, FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {norm!r}; expected bn or gn")


def _fill_bilinear(deconv: nn.ConvTranspose2d) -> None:
    """Initialise a transposed conv as bilinear upsampling of each channel.

    CenterNet fills the same bilinear kernel; we place it on the channel diagonal so the
    layer starts as an exact 2x bilinear upsampler instead of mixing channels.
    """
    weight = deconv.weight.data  # (C_in, C_out, k, k)
    k = weight.shape[-1]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    ramp = 1 - (torch.arange(k, dtype=weight.dtype) / f - c).abs()  # (k,)
    kernel = ramp[:, None] * ramp[None, :]  # (k, k)
    weight.zero_()
    for channel in range(min(weight.shape[0], weight.shape[1])):
        weight[channel, channel] = kernel


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


class DeconvUpsampler(nn.Module):
    """CenterNet's ResNet neck: C5 (stride 32) upsampled to stride 4 by three stages of
    3x3 conv (or modulated deformable conv) + norm + ReLU, then a 4x4 transposed conv
    (stride 2, bilinear init) + norm + ReLU. Used by CenterNet and OneNet.

    Args:
        in_channels: channels of C5 (set by the backbone).
        channels: output channels of the three stages; the last is the head's width.
        deform: use DCNv2 for the 3x3 convs, as the official "dcn" models do. Off by
            default: the official "nodcn" configs are the plain-PyTorch variant, and
            deformable conv is several times slower on CPU.
        norm: "bn" (official) or "gn".
        skips: add a 1x1 projection of C4, C3, C2 to the stage outputs at strides 16, 8
            and 4 (off: the official necks upsample C5 alone). On small inputs C5 is a
            few cells wide (4x4 at 128 px) and every location must be rebuilt from it;
            the skips hand the head the backbone's own fine maps, as U-Net-style necks do.
    """

    in_strides = (4, 8, 16, 32)  # C2..C5; only C5 is used unless `skips`
    out_strides = (4,)

    def __init__(
        self,
        in_channels: int | Sequence[int] = (64, 128, 256, 512),
        *,
        channels: Sequence[int] = (256, 128, 64),
        deform: bool = False,
        norm: Literal["bn", "gn"] = "bn",
        skips: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels must have 3 entries (stride 32 -> 4), got {list(channels)}")
        stage_inputs = [in_channels] if isinstance(in_channels, int) else list(in_channels)
        if skips and len(stage_inputs) != 4:
            raise ValueError(f"skips need the channels of C2..C5, got in_channels={in_channels}")
        in_channels = stage_inputs[-1]
        self.skips = None
        if skips:  # C4, C3, C2 onto the outputs at strides 16, 8, 4
            self.skips = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, width, kernel_size=1, bias=False), _norm(norm, width))
                for c, width in zip(reversed(stage_inputs[:3]), channels)
            )
        layers: list[nn.Module] = []
        for width in channels:
            conv = (
                ModulatedDeformConv3x3(in_channels, width)
                if deform
                else nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)
            )
            up = nn.ConvTranspose2d(width, width, kernel_size=4, stride=2, padding=1, bias=False)
            _fill_bilinear(up)
            layers += [conv, _norm(norm, width), nn.ReLU(inplace=True), up, _norm(norm, width), nn.ReLU(inplace=True)]
            in_channels = width
        self.layers = nn.Sequential(*layers)
        self.out_channels = [channels[-1]]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.skips is None:
            return [self.layers(features[-1])]
        x = features[-1]
        stage_length = len(self.layers) // 3
        for k, skip in enumerate(self.skips):
            x = self.layers[k * stage_length : (k + 1) * stage_length](x) + skip(features[-2 - k])
        return [x]


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
