import math

import pytest
import torch

from anchorless.detectors.assigners import CenterHeatmapTarget


def test_heatmap_target_of_one_box_has_a_unit_peak_and_a_cut_gaussian():
    # Input box [8, 8, 48, 48] at stride 4 -> [2, 2, 12, 12]: 10 x 10, centre (7, 7).
    t = CenterHeatmapTarget()(torch.tensor([[8.0, 8.0, 48.0, 48.0]]), torch.tensor([1]), 3, (16, 16), 4)
    assert t.heatmap.shape == (3, 16, 16)
    assert t.heatmap[0].sum() == 0 and t.heatmap[2].sum() == 0
    # radius floor(2.73) = 2, sigma = 5/6
    assert t.heatmap[1, 7, 7] == 1.0
    assert t.heatmap[1, 7, 8].item() == pytest.approx(math.exp(-1 / (2 * (5 / 6) ** 2)), rel=1e-5)
    assert t.heatmap[1, 9, 9].item() == pytest.approx(math.exp(-8 / (2 * (5 / 6) ** 2)), rel=1e-5)
    assert t.heatmap[1, 7, 10] == 0.0  # beyond the radius
    assert t.pred_idx.tolist() == [7 * 16 + 7]
    assert t.box_targets[:, :2].tolist() == [[10.0, 10.0]]
    assert t.box_targets[:, 2:].tolist() == [[0.0, 0.0]]


def test_overlapping_gaussians_of_one_class_take_the_maximum_not_the_sum():
    boxes = torch.tensor([[8.0, 8.0, 48.0, 48.0], [12.0, 8.0, 52.0, 48.0]])  # centres 1 cell apart
    t = CenterHeatmapTarget()(boxes, torch.tensor([0, 0]), 1, (16, 16), 4)
    assert t.heatmap.max() == 1.0
    assert t.heatmap[0, 7, 7] == 1.0 and t.heatmap[0, 7, 8] == 1.0
    assert t.heatmap.eq(1).sum() == 2


def test_box_crossing_the_border_is_clipped_before_its_centre_is_taken():
    t = CenterHeatmapTarget()(torch.tensor([[-8.0, -8.0, 20.0, 20.0]]), torch.tensor([0]), 1, (8, 8), 4)
    # Clipped to [0, 0, 5, 5] on the map: centre (2.5, 2.5) in cell (2, 2).
    assert t.box_targets[:, :2].tolist() == [[5.0, 5.0]]
    assert t.box_targets[:, 2:].tolist() == [[0.5, 0.5]]
    assert t.pred_idx.tolist() == [2 * 8 + 2]
    assert t.heatmap[0, 2, 2] == 1.0


def test_heatmap_target_with_no_boxes_is_all_zero():
    t = CenterHeatmapTarget()(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2, (8, 8), 4)
    assert t.heatmap.sum() == 0 and t.pred_idx.numel() == 0 and t.box_targets.shape == (0, 4)


def test_corrected_formula_gives_a_smaller_gaussian():
    box, label = torch.tensor([[0.0, 0.0, 80.0, 80.0]]), torch.tensor([0])
    original = CenterHeatmapTarget(radius_formula="original")(box, label, 1, (32, 32), 4).heatmap
    corrected = CenterHeatmapTarget(radius_formula="corrected")(box, label, 1, (32, 32), 4).heatmap
    # 20 x 20 cells: radius 5 (original) vs 1 (corrected)
    assert (original > 0).sum() == 11 * 11
    assert (corrected > 0).sum() == 3 * 3
