"""Corner pooling against a naive loop; the CornerNet, centre and cascade pooling modules."""

from __future__ import annotations

import pytest
import torch

from anchorless.detectors import corner_pool
from anchorless.detectors.layers import CascadeCornerPooling, CenterPooling, CornerPooling
from anchorless.detectors.layers.corner_pool import running_max_by_doubling


def _naive(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Each location's max over itself and the locations on one side of it, by loops."""
    out = torch.empty_like(x)
    height, width = x.shape[-2:]
    for i in range(height):
        for j in range(width):
            region = {
                "top": x[..., i:, j],  # itself and every row below
                "bottom": x[..., : i + 1, j],  # itself and every row above
                "left": x[..., i, j:],  # itself and every column to its right
                "right": x[..., i, : j + 1],  # itself and every column to its left
            }[direction]
            out[..., i, j] = region.amax(dim=-1)
    return out


@pytest.mark.parametrize("direction", ["top", "left", "bottom", "right"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 9), (1, 2, 7, 1)])
def test_corner_pool_equals_the_naive_loop_on_odd_sizes(direction, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(corner_pool(x, direction), _naive(x, direction), rtol=0, atol=0)


def test_corner_pool_directions_on_a_hand_made_row_and_column():
    row = torch.tensor([[[[1.0, 3.0, 2.0, 0.0]]]])  # (1, 1, 1, 4)
    assert corner_pool(row, "left").flatten().tolist() == [3.0, 3.0, 2.0, 0.0]  # max to the right
    assert corner_pool(row, "right").flatten().tolist() == [1.0, 3.0, 3.0, 3.0]  # max to the left
    column = row.transpose(-1, -2)  # (1, 1, 4, 1)
    assert corner_pool(column, "top").flatten().tolist() == [3.0, 3.0, 2.0, 0.0]  # max below
    assert corner_pool(column, "bottom").flatten().tolist() == [1.0, 3.0, 3.0, 3.0]  # max above


def test_corner_pool_sends_the_gradient_to_the_maximum_it_took():
    x = torch.tensor([[[[1.0, 3.0, 2.0]]]], requires_grad=True)
    corner_pool(x, "left").sum().backward()  # outputs 3, 3, 2: the 3 twice, the 2 once
    assert x.grad.flatten().tolist() == [0.0, 2.0, 1.0]


def test_corner_pool_keeps_bf16_and_refuses_an_unknown_direction():
    x = torch.randn(1, 2, 4, 5, dtype=torch.bfloat16)
    out = corner_pool(x, "top")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _naive(x, "top"))
    with pytest.raises(ValueError, match="direction must be one of top, left, bottom, right"):
        corner_pool(x, "up")


def test_center_pooling_branches_take_the_column_and_row_maxima():
    module = CenterPooling(2, branch_channels=3)
    first = torch.randn(1, 3, 4, 5)
    second = torch.randn(1, 3, 4, 5)
    pooled = module.pool_branches(torch.zeros(1, 2, 4, 5), first, second)
    for i in range(4):
        for j in range(5):
            want = first[0, :, :, j].amax(dim=1) + second[0, :, i, :].amax(dim=1)  # column + row
            torch.testing.assert_close(pooled[0, :, i, j], want)


def test_cascade_pooling_looks_along_the_edge_then_inside():
    module = CascadeCornerPooling(2, ("top", "left"), branch_channels=3).eval()
    for conv in (module.look_conv1, module.look_conv2):  # identity 3x3 convs expose the pooling order
        torch.nn.init.zeros_(conv.weight)
        conv.weight.data[range(3), range(3), 1, 1] = 1.0
    x = torch.randn(1, 2, 5, 6)
    first, second = torch.randn(1, 3, 5, 6), torch.randn(1, 3, 5, 6)
    look1, look2 = module.look1(x), module.look2(x)
    want = corner_pool(first + corner_pool(look1, "left"), "top") + corner_pool(second + corner_pool(look2, "top"), "left")
    torch.testing.assert_close(module.pool_branches(x, first, second), want)


@pytest.mark.parametrize(
    "module",
    [
        CornerPooling(4, ("top", "left"), branch_channels=8),
        CornerPooling(4, ("bottom", "right"), branch_channels=8),
        CenterPooling(4, branch_channels=8),
        CascadeCornerPooling(4, ("bottom", "right"), branch_channels=8),
    ],
)
def test_pooling_modules_keep_the_shape_and_pass_gradients_to_every_parameter(module):
    x = torch.randn(2, 4, 7, 9, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape and (out >= 0).all()  # ends in ReLU
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("dim", [-1, -2])
def test_the_exportable_running_max_equals_cummax(dim):
    x = torch.randn(2, 3, 9, 13, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(running_max_by_doubling(x, dim), x.cummax(dim).values, rtol=0, atol=0)


def test_corner_pooling_exports_to_onnx_and_runs_like_torch():
    import onnxruntime

    class AllFour(torch.nn.Module):
        def forward(self, x):
            return sum(corner_pool(x, d) * (i + 1) for i, d in enumerate(("top", "left", "bottom", "right")))

    x = torch.randn(2, 3, 7, 11, generator=torch.Generator().manual_seed(2))
    program = torch.onnx.export(AllFour().eval(), (x,), dynamo=True, opset_version=18, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), AllFour()(x), rtol=0, atol=0)
