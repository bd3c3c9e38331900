"""CornerNet's targets: Gaussians on the corner (and centre) heatmaps, offsets, pairing."""

from __future__ import annotations

import pytest
import torch

from anchorless.detectors.assigners import CornerTarget, gaussian_radius


def test_two_objects_get_their_corners_centres_offsets_and_a_shared_index():
    boxes = torch.tensor([[6.0, 9.0, 50.0, 41.0], [20.0, 20.0, 30.0, 22.0]])
    labels = torch.tensor([2, 0])
    out = CornerTarget()(boxes, labels, 3, (16, 16), 4)
    # corners / 4: (1.5, 2.25) and (12.5, 10.25); centre (7, 6.25)
    assert out.tl.cells.tolist() == [2 * 16 + 1, 5 * 16 + 5] and out.br.cells.tolist() == [10 * 16 + 12, 5 * 16 + 7]
    assert out.ct.cells[0].item() == 6 * 16 + 7
    torch.testing.assert_close(out.tl.offsets[0], torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(out.br.offsets[0], torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(out.ct.offsets[0], torch.tensor([0.0, 0.25]))
    assert out.gt_idx.tolist() == [0, 1]
    for kind in (out.tl, out.br, out.ct):
        assert kind.heatmap.shape == (3, 16, 16)
        # exactly 1 at each object's cell, on its class channel only
        assert kind.heatmap[2].flatten()[kind.cells[0]] == 1 and kind.heatmap[0].flatten()[kind.cells[1]] == 1
        assert kind.heatmap[1].sum() == 0 and kind.heatmap.eq(1).sum() == 2


def test_radius_is_cornernets_at_overlap_0_3_on_the_box_in_output_cells():
    box = torch.tensor([[0.0, 0.0, 64.0, 40.0]])  # 16 x 10 cells
    heat = CornerTarget()(box, torch.tensor([0]), 1, (32, 32), 4).tl.heatmap[0]
    radius = int(gaussian_radius(torch.tensor(10.0), torch.tensor(16.0), 0.3).item())
    sigma = (2 * radius + 1) / 6
    assert heat[0, radius].item() == pytest.approx(torch.exp(torch.tensor(-(radius**2) / (2 * sigma**2))).item())
    assert heat[0, radius + 1].item() == 0.0  # cut at the radius


def test_boxes_are_clipped_to_the_image_and_empty_ones_dropped():
    boxes = torch.tensor([[-8.0, 4.0, 80.0, 20.0], [10.0, 10.0, 10.0, 30.0]])  # the second has no width
    out = CornerTarget()(boxes, torch.tensor([0, 1]), 2, (16, 16), 4)
    assert out.gt_idx.tolist() == [0]
    # clipped to [0, 63]: br x = 63 / 4 = 15.75 -> cell 15, offset 0.75
    assert out.br.cells.tolist() == [5 * 16 + 15]
    torch.testing.assert_close(out.br.offsets[0], torch.tensor([0.75, 0.0]))
    assert out.tl.heatmap[1].sum() == 0


def test_no_objects_give_empty_heatmaps():
    out = CornerTarget()(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2, (8, 8), 4)
    assert out.tl.heatmap.sum() == 0 and out.br.cells.numel() == 0 and out.ct.offsets.shape == (0, 2)
