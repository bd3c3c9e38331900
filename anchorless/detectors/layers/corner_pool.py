"""Corner pooling (CornerNet), centre pooling and cascade corner pooling (CenterNet keypoint
triplets), and the pooling modules their heads put in front of the keypoint heatmaps.

A corner of a box usually lies outside the object, so no local feature marks it; corner
pooling carries the object's features to it: a top-left corner looks right along its row
(for the top edge) and down along its column (for the left edge).

Shapes: B images, C channels, H x W the map.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Direction = Literal["top", "left", "bottom", "right"]
# (dimension scanned, whether the max runs towards the start of that dimension)
_SCANS: dict[str, tuple[int, bool]] = {"top": (-2, True), "bottom": (-2, False), "left": (-1, True), "right": (-1, False)}


def corner_pool(x: torch.Tensor, direction: Direction) -> torch.Tensor:
    """CornerNet's corner pooling of (..., H, W) features, one direction.

    Each location takes the max over itself and every location on one side of it:
    ``top``: every row below it; ``left``: every column to its right; ``bottom``: every row
    above it; ``right``: every column to its left (CornerNet's names: a top pool feeds the
    top edge, so it gathers from below). Differentiable, any size and float dtype.
    """
    if direction not in _SCANS:
        raise ValueError(f"direction must be one of top, left, bottom, right, got {direction!r}")
    dim, backwards = _SCANS[direction]
    if backwards:
        x = x.flip(dim)
    # No pure-PyTorch library op pools to the corners (MMCV's is compiled): a running max does it.
    # ONNX has no running max, so an export traces the same maximum as log2(n) shifted maxima.
    exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    pooled = running_max_by_doubling(x, dim) if exporting else x.cummax(dim).values
    return pooled.flip(dim) if backwards else pooled


def running_max_by_doubling(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.cummax(dim).values`` from element-wise maxima of shifted copies (1, 2, 4, ...
    positions), ops every exporter translates; equal to cummax, not as fast."""
    length = x.shape[dim]
    step = 1
    while step < length:
        head = x.narrow(dim, 0, step)  # the first `step` entries have nothing further back
        x = torch.cat([head, torch.maximum(x.narrow(dim, step, length - step), x.narrow(dim, 0, length - step))], dim)
        step *= 2
    return x


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the official codes' ``convolution`` block."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _TwoBranchPooling(nn.Module):
    """The skeleton of every pooling module (CornerNet Fig. 7): two 3x3 conv-BN-ReLU branches,
    each pooled its own way, summed, 3x3 conv-BN; plus a 1x1 conv-BN skip of the input; ReLU;
    then a 3x3 conv-BN-ReLU. Subclasses say how each branch pools."""

    def __init__(self, channels: int, branch_channels: int = 128) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(channels, branch_channels)
        self.branch2 = conv_bn_relu(channels, branch_channels)
        self.merge = conv_bn_relu(branch_channels, channels, relu=False)
        self.skip = conv_bn_relu(channels, channels, kernel_size=1, relu=False)
        self.relu = nn.ReLU(inplace=True)
        self.out = conv_bn_relu(channels, channels)

    def pool_branches(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool_branches(x, self.branch1(x), self.branch2(x))  # (B, branch, H, W)
        return self.out(self.relu(self.merge(pooled) + self.skip(x)))  # (B, C, H, W)


class CornerPooling(_TwoBranchPooling):
    """CornerNet's corner-pooling module: branch 1 pooled ``directions[0]``, branch 2
    ``directions[1]`` (top-left corners: ("top", "left"); bottom-right: ("bottom", "right")).

    Args:
        channels: input and output channels (the backbone's map).
        directions: the two pooling directions.
        branch_channels: width of the two pooled branches (128 in the official code).
    """

    def __init__(self, channels: int, directions: tuple[Direction, Direction], branch_channels: int = 128) -> None:
        super().__init__(channels, branch_channels)
        for direction in directions:
            if direction not in _SCANS:
                raise ValueError(f"direction must be one of top, left, bottom, right, got {direction!r}")
        self.directions = tuple(directions)

    def pool_branches(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return corner_pool(first, self.directions[0]) + corner_pool(second, self.directions[1])


class CenterPooling(_TwoBranchPooling):
    """CenterNet-triplets' centre pooling: branch 1 takes the max over its column (top then
    bottom pooling), branch 2 the max over its row (left then right), as the official code."""

    def pool_branches(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return first.amax(dim=-2, keepdim=True).expand_as(first) + second.amax(dim=-1, keepdim=True).expand_as(second)


class CascadeCornerPooling(_TwoBranchPooling):
    """CenterNet-triplets' cascade corner pooling: each branch first finds the boundary's
    maximum, then looks inside the object from it. For the edge pooled ``directions[0]``
    (top, for a top-left corner) it pools a look-branch ``directions[1]`` (along the edge),
    adds it to the branch, runs a 3x3 conv, then pools ``directions[0]``; and the other way
    round for the second branch (the official code's order).

    Args:
        channels, directions, branch_channels: as :class:`CornerPooling`.
    """

    def __init__(self, channels: int, directions: tuple[Direction, Direction], branch_channels: int = 128) -> None:
        super().__init__(channels, branch_channels)
        for direction in directions:
            if direction not in _SCANS:
                raise ValueError(f"direction must be one of top, left, bottom, right, got {direction!r}")
        self.directions = tuple(directions)
        self.look1 = conv_bn_relu(channels, branch_channels)
        self.look2 = conv_bn_relu(channels, branch_channels)
        self.look_conv1 = nn.Conv2d(branch_channels, branch_channels, 3, padding=1, bias=False)
        self.look_conv2 = nn.Conv2d(branch_channels, branch_channels, 3, padding=1, bias=False)

    def pool_branches(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        along, across = self.directions
        first = corner_pool(self.look_conv1(first + corner_pool(self.look1(x), across)), along)
        second = corner_pool(self.look_conv2(second + corner_pool(self.look2(x), along)), across)
        return first + second
