import math

import pytest
import torch

from anchorless.detectors.assigners import BoxL1Cost, FocalClassCost, IoUCost


def test_focal_class_cost_matches_hand_value_at_half_probability():
    # p = 0.5: pos = 0.25 * 0.5^2 * ln 2, neg = 0.75 * 0.5^2 * ln 2, cost = weight * (pos - neg)
    cost = FocalClassCost(weight=2.0)(torch.zeros(1, 3), torch.tensor([1]))  # (M=1, R=1)
    expected = 2.0 * (0.25 - 0.75) * 0.25 * math.log(2)
    assert cost.shape == (1, 1)
    assert cost.item() == pytest.approx(expected, rel=1e-5)


def test_l1_and_giou_costs_are_normalised_by_image_size_for_a_box_at_the_border():
    pred = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    gt = torch.tensor([[0.0, 0.0, 128.0, 128.0]])
    # |0-0| + |0-0| + |0.5-1| + |0.5-1| = 1.0 on a 128 x 128 image
    assert BoxL1Cost(weight=5.0)(pred, gt, (128, 128)).item() == pytest.approx(5.0)
    # IoU = 1/4 and the enclosing box is the gt itself, so GIoU = 1/4
    assert IoUCost(weight=2.0)(pred, gt).item() == pytest.approx(-0.5)
