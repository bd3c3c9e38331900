"""The stacked hourglass of CornerNet and CenterNet (keypoint triplets), after Newell et al.

A stem (7x7 conv, stride 2, then a stride-2 residual block) brings the image to stride 4;
each hourglass module then halves the map ``levels`` times with stride-2 residual blocks
(no max-pooling, as CornerNet), widens the channels on the way down, and comes back up with
nearest-neighbour upsampling, adding a residual skip at every scale. Each stack ends in a
3x3 conv-BN-ReLU whose map the detector's heads read (intermediate supervision: every stack
is trained, the last one predicts); between stacks the input of the next is the previous
input plus the previous output, each through a 1x1 conv-BN, then a residual block.

``hourglass104``: 2 stacks, levels 5, channels (256, 256, 384, 384, 384, 512), blocks
(2, 2, 2, 2, 2, 4): the papers' COCO model. ``hourglass52``: the same with 1 stack
(CenterNet-52), for smaller machines. CornerNet-Lite builds its two trunks from the same
parts: fire modules and transposed-convolution upsampling after a stride-8 stem
(:mod:`.hourglass_squeeze`), and three shallow modules whose every level's map is read
(:mod:`.hourglass54`).

Shapes: B images, H x W the stride-4 map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from anchorless.detectors.layers.fire import FireModule
from anchorless.detectors.layers.norm import norm_layer

# depth: (stacks, per-level channels, per-level residual blocks), the official CornerNet /
# CenterNet configurations.
HOURGLASS_DEPTHS = {
    104: (2, (256, 256, 384, 384, 384, 512), (2, 2, 2, 2, 2, 4)),
    52: (1, (256, 256, 384, 384, 384, 512), (2, 2, 2, 2, 2, 4)),
}

NormFactory = Callable[[int], nn.Module]
# A block of the hourglass: (in_channels, out_channels, stride, norm) -> module.
BlockFactory = Callable[[int, int, int, NormFactory], nn.Module]


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: NormFactory) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        norm(out_channels),
    )


class Residual(nn.Module):
    """The hourglass's residual block: 3x3 conv-norm-ReLU, 3x3 conv-norm, plus the input
    (through a 1x1 conv-norm where the width or stride changes), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv_norm(in_channels, out_channels, 3, stride, norm)
        self.conv2 = _conv_norm(out_channels, out_channels, 3, 1, norm)
        self.skip = (
            _conv_norm(in_channels, out_channels, 1, stride, norm)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.skip(x))


BLOCKS: dict[str, BlockFactory] = {"residual": Residual, "fire": FireModule}


def _blocks(
    in_channels: int, out_channels: int, count: int, norm: NormFactory, stride: int = 1, block: BlockFactory = Residual
) -> nn.Sequential:
    """``count`` blocks (residual unless told); the first changes the width and stride."""
    layers = [block(in_channels, out_channels, stride, norm)]
    layers += [block(out_channels, out_channels, 1, norm) for _ in range(count - 1)]
    return nn.Sequential(*layers)


def _blocks_back(
    in_channels: int, out_channels: int, count: int, norm: NormFactory, block: BlockFactory = Residual
) -> nn.Sequential:
    """``count`` blocks on the way up; the last one changes the width."""
    layers = [block(in_channels, in_channels, 1, norm) for _ in range(count - 1)]
    layers.append(block(in_channels, out_channels, 1, norm))
    return nn.Sequential(*layers)


Upsampling = Literal["nearest", "transposed"]


class HourglassModule(nn.Module):
    """One hourglass, recursively: a skip branch at this scale, and a branch that halves the
    map (a stride-2 block), runs the inner hourglass (or, innermost, ``blocks[1]`` blocks),
    comes back to this width and is upsampled onto the skip: nearest-neighbour (CornerNet),
    or a learned 4x4 stride-2 transposed convolution (``upsample="transposed"``, Squeeze).
    ``block`` makes every block (residual unless told)."""

    def __init__(
        self,
        channels: Sequence[int],
        blocks: Sequence[int],
        norm: NormFactory,
        block: BlockFactory = Residual,
        upsample: Upsampling = "nearest",
    ) -> None:
        super().__init__()
        width, inner_width = channels[0], channels[1]
        self.skip = _blocks(width, width, blocks[0], norm, block=block)
        self.down = _blocks(width, inner_width, blocks[0], norm, stride=2, block=block)
        self.inner = (
            HourglassModule(channels[1:], blocks[1:], norm, block, upsample)
            if len(channels) > 2
            else _blocks(inner_width, inner_width, blocks[1], norm, block=block)
        )
        self.up = _blocks_back(inner_width, width, blocks[0], norm, block=block)
        self.upsample = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1) if upsample == "transposed" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x)[-1]

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The merged map of every level, the innermost module's first and this one's last
        (CornerNet-Saccade reads its attention maps from them)."""
        skip = self.skip(x)
        down = self.down(x)
        if isinstance(self.inner, HourglassModule):
            levels = self.inner.forward_levels(down)  # innermost first, the inner module's own last
            low = self.up(levels[-1])
        else:
            levels, low = [], self.up(self.inner(down))
        # To the skip's size rather than x2: any input size works, not only multiples of 128.
        if self.upsample is None:
            low = F.interpolate(low, size=skip.shape[-2:], mode="nearest")
        else:  # exactly x2, cut where the skip is odd-sized
            low = self.upsample(low)[..., : skip.shape[-2], : skip.shape[-1]]
        return [*levels, skip + low]


class Hourglass(nn.Module):
    """The stacked hourglass network: (B, 3, H, W) -> one (B, out_channels, H/s, W/s) map per
    stack, s = ``stem_stride``.

    Args:
        stacks: hourglass modules in sequence, each supervised (2 for Hourglass-104).
        channels: width at each level, the stem's stride first; len = levels + 1.
        blocks: blocks at each level (the last: at the innermost scale).
        stem_channels: width of the stride-2 7x7 stem conv (128).
        out_channels: width of each stack's output map, which the heads read (256).
        norm: "bn" (official) or "gn".
        block: "residual" (CornerNet) or "fire" (CornerNet-Squeeze) inside the modules.
        upsample: "nearest" (CornerNet) or "transposed" (a 4x4 stride-2 transposed conv, Squeeze).
        stem_stride: 4, or 8 (Squeeze: one more stride-2 residual block in the stem).
    """

    def __init__(
        self,
        *,
        stacks: int = 2,
        channels: Sequence[int] = (256, 256, 384, 384, 384, 512),
        blocks: Sequence[int] = (2, 2, 2, 2, 2, 4),
        stem_channels: int = 128,
        out_channels: int = 256,
        norm: str = "bn",
        block: Literal["residual", "fire"] = "residual",
        upsample: Upsampling = "nearest",
        stem_stride: Literal[4, 8] = 4,
    ) -> None:
        super().__init__()
        if stacks < 1:
            raise ValueError(f"stacks must be >= 1, got {stacks}")
        if len(channels) < 2 or len(blocks) != len(channels) or min(blocks) < 1:
            raise ValueError(
                f"channels and blocks need one entry per level (at least 2), blocks >= 1; got {list(channels)}, {list(blocks)}"
            )
        if block not in BLOCKS or upsample not in ("nearest", "transposed") or stem_stride not in (4, 8):
            raise ValueError(
                f"block must be residual or fire, upsample nearest or transposed, stem_stride 4 or 8; "
                f"got {block!r}, {upsample!r}, {stem_stride!r}"
            )
        make_norm = norm_layer(norm)
        width = channels[0]
        stem = [_conv_norm(3, stem_channels, 7, 2, make_norm), nn.ReLU(inplace=True), Residual(stem_channels, width, 2, make_norm)]
        if stem_stride == 8:
            stem.append(Residual(width, width, 2, make_norm))
        self.stem = nn.Sequential(*stem)
        self.hourglasses = nn.ModuleList(
            HourglassModule(channels, blocks, make_norm, BLOCKS[block], upsample) for _ in range(stacks)
        )
        self.outputs = nn.ModuleList(
            nn.Sequential(_conv_norm(width, out_channels, 3, 1, make_norm), nn.ReLU(inplace=True)) for _ in range(stacks)
        )
        # Between stacks: next input = residual(ReLU(1x1(input) + 1x1(output))).
        self.input_skips = nn.ModuleList(_conv_norm(width, width, 1, 1, make_norm) for _ in range(stacks - 1))
        self.output_skips = nn.ModuleList(_conv_norm(out_channels, width, 1, 1, make_norm) for _ in range(stacks - 1))
        self.between = nn.ModuleList(Residual(width, width, 1, make_norm) for _ in range(stacks - 1))
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = [out_channels] * stacks

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_levels(images)[0]

    def forward_levels(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """(each stack's output map, each stack's module levels, innermost first; see
        :meth:`HourglassModule.forward_levels`)."""
        x = self.stem(images)  # (B, channels[0], H/s, W/s)
        maps, levels = [], []
        for index, (hourglass, output) in enumerate(zip(self.hourglasses, self.outputs)):
            merged = hourglass.forward_levels(x)
            out = output(merged[-1])  # (B, out_channels, H/s, W/s)
            maps.append(out)
            levels.append(merged)
            if index < len(self.between):
                x = self.between[index](self.relu(self.input_skips[index](x) + self.output_skips[index](out)))
        return maps, levels
