"""CenterNet's deconvolution upsampler: C5 (stride 32) to one stride-4 map."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from anchorless.detectors.layers.deform_conv import ModulatedDeformConv3x3
from anchorless.detectors.layers.norm import norm_layer


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
        make_norm = norm_layer(norm)
        self.skips = None
        if skips:  # C4, C3, C2 onto the outputs at strides 16, 8, 4
            self.skips = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, width, kernel_size=1, bias=False), make_norm(width))
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
            layers += [conv, make_norm(width), nn.ReLU(inplace=True), up, make_norm(width), nn.ReLU(inplace=True)]
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
