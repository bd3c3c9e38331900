"""The stacked hourglass and the keypoint detectors' trunk choice."""

from __future__ import annotations

import pytest
import torch

from anchorless.detectors.backbones import Hourglass, HourglassModule, KeypointBackbone

TINY = {"channels": [8, 8, 12, 12, 12, 16], "out_channels": 8}


def test_hourglass104_is_two_stacks_of_five_levels_with_the_papers_widths():
    trunk = KeypointBackbone(depth=104).trunk
    assert isinstance(trunk, Hourglass) and len(trunk.hourglasses) == 2 and trunk.out_channels == [256, 256]
    widths, module = [], trunk.hourglasses[0]
    while isinstance(module, HourglassModule):
        widths.append(module.down[0].conv1[0].out_channels)  # each level's stride-2 block
        assert module.down[0].conv1[0].stride == (2, 2) and len(module.skip) == 2
        module = module.inner
    assert widths == [256, 384, 384, 384, 512] and len(module) == 4  # 4 blocks at the innermost scale
    # ~188M parameters for the two stacks (the official CornerNet: 201M with its heads)
    assert 185e6 < sum(p.numel() for p in trunk.parameters()) < 190e6


def test_hourglass52_is_one_stack():
    assert len(KeypointBackbone(depth=52, **TINY).trunk.hourglasses) == 1


@pytest.mark.parametrize("stacks", [1, 3])
def test_every_stack_returns_a_stride_4_map_for_any_input_size(stacks):
    backbone = KeypointBackbone(depth=104, stacks=stacks, **TINY)
    maps = backbone(torch.rand(2, 3, 96, 160))
    assert [m.shape for m in maps] == [(2, 8, 24, 40)] * stacks


def test_every_stack_gets_gradients_from_its_own_output():
    backbone = KeypointBackbone(depth=104, **TINY)
    first, second = backbone(torch.rand(2, 3, 64, 64))
    first.sum().backward()  # intermediate supervision: the first stack alone learns from its output
    assert backbone.trunk.outputs[0][0][0].weight.grad is not None
    assert backbone.trunk.outputs[1][0][0].weight.grad is None


def test_resnet_depths_use_centernets_upsampler_and_hourglass_settings_are_refused_there():
    backbone = KeypointBackbone(depth=18, upsample_channels=[32, 32, 16])
    assert [m.shape for m in backbone(torch.rand(2, 3, 64, 96))] == [(2, 16, 16, 24)]
    with pytest.raises(ValueError, match="stacks, channels and blocks apply to the hourglass depths"):
        KeypointBackbone(depth=18, stacks=2)
    with pytest.raises(ValueError, match="pretrained and frozen_stages apply to the ResNet depths"):
        KeypointBackbone(depth=52, frozen_stages=1)
    with pytest.raises(ValueError, match="one entry per level"):
        Hourglass(channels=[8, 8, 8], blocks=[1, 1])
