"""CornerNet-Lite's trunks: Hourglass-Squeeze (fire modules, stride-8 stem, four levels,
transposed-conv upsampling) and Hourglass-54 (three shallow modules and their levels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anchorless.detectors.backbones import Hourglass54, HourglassModule, HourglassSqueeze
from anchorless.detectors.backbones.hourglass import Residual
from anchorless.detectors.layers import FireModule


def _levels(module: HourglassModule) -> list[HourglassModule]:
    found = []
    while isinstance(module, HourglassModule):
        found.append(module)
        module = module.inner
    return found


def test_squeeze_reduces_the_input_8x_before_its_modules():
    backbone = HourglassSqueeze(channels=[16, 16, 24, 24, 32], out_channels=16, stem_channels=8).eval()
    seen = []
    backbone.trunk.stem.register_forward_hook(lambda module, args, out: seen.append(out.shape))  # the modules' input
    maps = backbone(torch.rand(1, 3, 128, 192))
    assert seen == [(1, 16, 16, 24)]  # 128 / 8, 192 / 8
    assert [m.shape for m in maps] == [(1, 16, 16, 24)] * 2  # two stacks, stride 8


def test_squeeze_modules_are_fire_modules_four_levels_deep_upsampled_by_4x4_transposed_convs():
    trunk = HourglassSqueeze().trunk
    levels = _levels(trunk.hourglasses[0])
    assert len(levels) == 4  # one fewer than Hourglass-104's five
    assert [level.down[0].expand_1x1.out_channels * 2 for level in levels] == [256, 384, 384, 512]
    for level in levels:
        assert all(isinstance(block, FireModule) for part in (level.skip, level.down, level.up) for block in part)
        up = level.upsample
        assert isinstance(up, nn.ConvTranspose2d) and (up.kernel_size, up.stride, up.padding) == ((4, 4), (2, 2), (1, 1))
    assert all(isinstance(block, Residual) for block in trunk.stem[2:])  # the stem keeps residual blocks
    # ~24.7M parameters, an eighth of Hourglass-104's 188M
    assert 24e6 < sum(p.numel() for p in trunk.parameters()) < 25.5e6


def test_squeeze_works_on_sizes_the_levels_do_not_halve_evenly():
    backbone = HourglassSqueeze(channels=[8, 8, 8, 8, 8], out_channels=8, stem_channels=8).eval()
    assert [m.shape for m in backbone(torch.rand(1, 3, 96, 160))] == [(1, 8, 12, 20)] * 2  # 12 -> 6 -> 3 -> 2 -> 1


def test_hourglass54_is_three_modules_of_three_levels_with_the_papers_channel_plan():
    backbone = Hourglass54()
    assert len(backbone.trunk.hourglasses) == 3
    for module in backbone.trunk.hourglasses:
        levels = _levels(module)
        assert [level.down[0].conv1[0].out_channels for level in levels] == [384, 384, 512]
        assert all(len(level.skip) == len(level.down) == len(level.up) == 1 for level in levels)  # one block each
        middle = levels[-1].inner
        assert len(middle) == 1 and middle[0].conv2[0].out_channels == 512  # one 512-channel block in the middle
        assert levels[0].upsample is None  # nearest-neighbour upsampling, as CornerNet
    assert backbone.out_channels == [(256, 256, 384, 384)] * 3 and backbone.level_strides == (4, 8, 16)


def test_hourglass54_reduces_4x_and_returns_each_stacks_map_and_levels_fine_to_coarse():
    backbone = Hourglass54(channels=[16, 24, 24, 32], out_channels=8, stem_channels=8).eval()
    outputs = backbone(torch.rand(1, 3, 64, 96))
    assert len(outputs) == 3
    for stack in outputs:
        assert [t.shape for t in stack] == [(1, 8, 16, 24), (1, 16, 16, 24), (1, 24, 8, 12), (1, 24, 4, 6)]


def test_hourglass54_needs_three_levels_for_its_attention_maps():
    with pytest.raises(ValueError, match="at least 4 levels"):
        Hourglass54(channels=[8, 8, 8], blocks=[1, 1, 1])
