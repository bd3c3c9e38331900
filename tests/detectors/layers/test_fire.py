"""The fire module of CornerNet-Squeeze: shapes, a hand count of its weights, the depthwise 3x3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anchorless.detectors.layers import FireModule


@pytest.mark.parametrize("stride, size", [(1, 16), (2, 8)])
def test_output_has_the_asked_width_and_stride(stride, size):
    fire = FireModule(64, 128, stride=stride)
    assert fire(torch.rand(2, 64, 16, 16)).shape == (2, 128, size, size)


def test_parameters_match_a_hand_count():
    # 64 -> 128, squeeze ratio 2: squeeze 1x1 64*64 + its BN 2*64; expand 1x1 64*64;
    # depthwise 3x3 64*9 (one 3x3 filter per squeezed channel); the output BN 2*128.
    fire = FireModule(64, 128)
    assert sum(p.numel() for p in fire.parameters()) == 4096 + 128 + 4096 + 576 + 256 == 9152


def test_the_expand_3x3_is_depthwise_and_the_1x1_is_not():
    fire = FireModule(64, 128, stride=2)
    assert fire.expand_3x3.groups == fire.expand_3x3.in_channels == 64 and fire.expand_3x3.kernel_size == (3, 3)
    assert fire.expand_3x3.weight.shape == (64, 1, 3, 3)  # one input channel per filter
    assert fire.expand_1x1.groups == 1 and fire.expand_1x1.stride == (2, 2) == fire.expand_3x3.stride


def test_the_input_is_added_only_where_the_shape_is_kept():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4)
    for fire, skip in ((FireModule(8, 8), True), (FireModule(8, 16), False), (FireModule(8, 8, stride=2), False)):
        fire.eval()
        with torch.no_grad():  # expand branches silenced: what is left is the skip (or nothing)
            for conv in (fire.expand_1x1, fire.expand_3x3):
                nn.init.zeros_(conv.weight)
            nn.init.zeros_(fire.norm.bias)
        out = fire(x)
        assert torch.equal(out, torch.relu(x)) if skip else (out == 0).all()


def test_widths_the_depthwise_split_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="must be even"):
        FireModule(8, 10, squeeze_ratio=4)
