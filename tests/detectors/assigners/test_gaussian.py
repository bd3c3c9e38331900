import math

import pytest
import torch
from torchvision.ops import box_iou

from anchorless.detectors.assigners import gaussian_radius


def test_gaussian_radius_of_a_10x10_box_by_hand():
    # Quadratic 3: a=2.8, b=-28, c=-30, sqrt(b^2 - 4ac) = sqrt(1120)
    sq = math.sqrt(1120)
    assert gaussian_radius(10.0, 10.0, 0.7, "original").item() == pytest.approx((-28 + sq) / 2, rel=1e-9)
    # Corrected: min(0.925, 0.8167, 0.976) is the second quadratic's root
    assert gaussian_radius(10.0, 10.0, 0.7, "corrected").item() == pytest.approx((40 - sq) / 8, rel=1e-9)


@pytest.mark.parametrize("height, width", [(10.0, 10.0), (20.0, 50.0), (7.0, 90.0)])
def test_corrected_radius_keeps_exactly_the_minimum_overlap_in_the_binding_case(height, width):
    r = gaussian_radius(height, width, 0.7, "corrected").item()
    box = torch.tensor([[0.0, 0.0, width, height]])
    moved = {
        "both corners shifted": torch.tensor([[r, r, width + r, height + r]]),
        "shrunk on every side": torch.tensor([[r, r, width - r, height - r]]),
        "grown on every side": torch.tensor([[-r, -r, width + r, height + r]]),
    }
    ious = {k: box_iou(box, b).item() for k, b in moved.items()}
    assert min(ious.values()) == pytest.approx(0.7, abs=1e-6)  # the tightest case is exactly 0.7
    assert all(iou >= 0.7 - 1e-6 for iou in ious.values())


@pytest.mark.parametrize("height, width", [(10.0, 10.0), (40.0, 30.0), (100.0, 20.0)])
def test_original_radius_is_the_grown_box_case_times_4_min_overlap(height, width):
    o = 0.7
    a, b, c = 4 * o, -2 * o * (height + width), (o - 1) * width * height
    grown_case = (b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    original = gaussian_radius(height, width, o, "original").item()
    assert original == pytest.approx(4 * o * grown_case, rel=1e-9)
    # ... which is about three times the radius the geometry asks for
    assert 2.8 <= original / gaussian_radius(height, width, o, "corrected").item() <= 4.0
