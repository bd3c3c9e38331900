"""CornerNet-Saccade's attention targets: the size split and the centre cells, by hand."""

from __future__ import annotations

import torch

from anchorless.detectors.assigners import SaccadeTarget, attention_targets, size_class


def test_size_classes_split_the_longer_side_at_32_and_96():
    sides = torch.tensor([1.0, 31.9, 32.0, 96.0, 96.1, 500.0])
    assert size_class(sides).tolist() == [0, 0, 1, 1, 2, 2]  # small < 32 <= medium <= 96 < large


def test_each_box_marks_its_centre_cell_on_the_map_of_its_size_class_only():
    boxes = torch.tensor([
        [10.0, 20.0, 30.0, 26.0],   # 20 wide: small, centre (20, 23) -> stride-4 cell (5, 5)
        [0.0, 0.0, 40.0, 64.0],     # 64 high: medium, centre (20, 32) -> stride-8 cell (2, 4)
        [20.0, 0.0, 120.0, 50.0],   # 100 wide: large, centre (70, 25) -> stride-16 cell (4, 1)
        [-50.0, 100.0, 50.0, 110.0],  # clipped to x 0..50: medium (50), centre (25, 105) -> (3, 13)
        [200.0, 0.0, 210.0, 10.0],  # outside the image: no mark
    ])  # fmt: skip
    small, medium, large = attention_targets(boxes, [(32, 32), (16, 16), (8, 8)], [4, 8, 16], (128, 128))
    assert torch.nonzero(small).tolist() == [[5, 5]]  # (row, column)
    assert torch.nonzero(medium).tolist() == [[4, 2], [13, 3]]
    assert torch.nonzero(large).tolist() == [[1, 4]]
    assert small.sum() == 1 and medium.sum() == 2 and large.sum() == 1  # 1 at the centre, nothing around it


def test_the_saccade_assigner_adds_attention_targets_to_cornernets_with_the_official_overlap():
    assigner = SaccadeTarget()
    assert assigner.min_overlap == 0.5 and assigner.size_bounds == (32.0, 96.0)  # CornerNet_Saccade.json: gaussian_iou 0.5
    maps = assigner.attention(torch.zeros(0, 4), [(4, 4), (2, 2), (1, 1)], [4, 8, 16], (16, 16))
    assert [m.sum().item() for m in maps] == [0, 0, 0]
