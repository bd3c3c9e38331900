import math

import pytest
import torch
from torchvision.ops import box_iou

from anchorless.detectors.assigners import (
    BoxL1Cost,
    CenterHeatmapTarget,
    FocalClassCost,
    GIoUCost,
    MinCostAssigner,
    PointAssigner,
    gaussian_radius,
)

# --------------------------------------------------------------------------- MinCostAssigner


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
    assert GIoUCost(weight=2.0)(pred, gt).item() == pytest.approx(-0.5)


def test_min_cost_assigner_with_no_ground_truth_assigns_nothing():
    pred_idx, gt_idx = MinCostAssigner()(torch.zeros(5, 3), torch.rand(5, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), (64, 64))
    assert pred_idx.numel() == 0 and gt_idx.numel() == 0


def test_min_cost_assigner_picks_the_location_with_lowest_total_cost_for_one_ground_truth():
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [12.0, 12.0, 28.0, 28.0], [40.0, 40.0, 60.0, 60.0]])
    # The exact box has a low class score, the slightly worse box a high one.
    logits = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [4.0, 0.0]])
    assigner = MinCostAssigner(cost_cls=2.0, cost_l1=5.0, cost_giou=2.0)
    cost = assigner.cost_matrix(logits, boxes, gt, torch.tensor([0]), (64, 64))
    # By hand for row 1: class cost at p = sigmoid(4); L1 = 8/64; GIoU = 256/400.
    p = torch.sigmoid(torch.tensor(4.0)).item()
    cls1 = 2 * (0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p))
    assert cost.shape == (1, 3)  # (M, R)
    assert cost[0, 1].item() == pytest.approx(cls1 + 5 * 8 / 64 - 2 * 256 / 400, rel=1e-4)
    pred_idx, gt_idx = assigner(logits, boxes, gt, torch.tensor([0]), (64, 64))
    assert pred_idx.tolist() == [int(cost[0].argmin())] == [1]
    assert gt_idx.tolist() == [0]


def test_two_ground_truths_share_one_location_in_min_mode_but_not_in_hungarian_mode():
    # Location 0 is the best match for both ground truths; location 1 is second best.
    gts = torch.tensor([[0.0, 0.0, 20.0, 20.0], [2.0, 2.0, 22.0, 22.0]])
    boxes = torch.tensor([[1.0, 1.0, 21.0, 21.0], [4.0, 4.0, 24.0, 24.0], [40.0, 40.0, 60.0, 60.0]])
    logits = torch.zeros(3, 1)
    labels = torch.tensor([0, 0])
    min_pred, min_gt = MinCostAssigner(mode="min")(logits, boxes, gts, labels, (64, 64))
    assert min_pred.tolist() == [0, 0] and min_gt.tolist() == [0, 1]

    assigner = MinCostAssigner(mode="hungarian")
    pred, gt = assigner(logits, boxes, gts, labels, (64, 64))
    assert sorted(pred.tolist()) == [0, 1] and gt.tolist() == [0, 1]
    cost = assigner.cost_matrix(logits, boxes, gts, labels, (64, 64))
    best = min(cost[0, 0] + cost[1, 1], cost[0, 1] + cost[1, 0])
    assert cost[gt, pred].sum().item() == pytest.approx(best.item())


def test_hungarian_leaves_ground_truths_unmatched_when_there_are_fewer_locations():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    boxes = torch.tensor([[20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    pred, gt = MinCostAssigner(mode="hungarian")(torch.zeros(2, 1), boxes, gts, torch.zeros(3, dtype=torch.long), (64, 64))
    assert pred.tolist() == [0, 1] and gt.tolist() == [1, 2]


def test_min_cost_assigner_rejects_an_unknown_mode_and_all_zero_weights():
    with pytest.raises(ValueError, match="mode"):
        MinCostAssigner(mode="greedy")
    with pytest.raises(ValueError, match="non-zero"):
        MinCostAssigner(cost_cls=0.0, cost_l1=0.0, cost_giou=0.0)


def test_one_to_many_takes_each_objects_k_cheapest_locations_inside_it_and_settles_shared_ones_by_cost():
    # Six locations on a row (y = 10); every prediction is the same 8 x 8 box around its point.
    points = torch.tensor([[2.0, 10.0], [6.0, 10.0], [10.0, 10.0], [14.0, 10.0], [18.0, 10.0], [40.0, 10.0]])
    boxes = torch.cat([points - 4, points + 4], dim=1)  # (6, 4)
    logits = torch.zeros(6, 1)
    # Object 0 covers x in (0, 17): locations 0-3 inside; object 1 covers (8, 24): locations 2-4.
    gts = torch.tensor([[0.0, 6.0, 17.0, 14.0], [8.0, 6.0, 24.0, 14.0]])
    labels = torch.zeros(2, dtype=torch.long)
    assigner = MinCostAssigner()
    cost = assigner.cost_matrix(logits, boxes, gts, labels, (32, 48))
    # Object 0's three cheapest inside are 1, 2, 3 (location 0 is its dearest); object 1 has
    # exactly three inside. Location 2 costs object 0 less, location 3 object 1.
    assert cost[0, :4].argsort().tolist()[-1] == 0
    assert cost[0, 2] < cost[1, 2] and cost[1, 3] < cost[0, 3]
    pred, gt = assigner.one_to_many(logits, boxes, gts, labels, (32, 48), points, topk=3)
    assert list(zip(pred.tolist(), gt.tolist())) == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert 5 not in pred.tolist()  # outside both objects


def test_one_to_many_gives_an_object_with_no_location_inside_its_cheapest_one_and_handles_no_objects():
    points = torch.tensor([[2.0, 2.0], [30.0, 30.0]])
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [26.0, 26.0, 34.0, 34.0]])
    tiny = torch.tensor([[27.0, 27.0, 29.0, 29.0]])  # between grid points: no location inside
    pred, gt = MinCostAssigner().one_to_many(torch.zeros(2, 1), boxes, tiny, torch.tensor([0]), (40, 40), points, topk=9)
    assert pred.tolist() == [1] and gt.tolist() == [0]
    none = MinCostAssigner().one_to_many(torch.zeros(2, 1), boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), (40, 40), points, 9)
    assert [t.numel() for t in none] == [0, 0]


# --------------------------------------------------------------------------- PointAssigner


def _points(xy, strides, levels):
    return torch.tensor(xy, dtype=torch.float32), torch.tensor(strides), torch.tensor(levels)


def test_point_assigner_with_no_ground_truth_marks_everything_background():
    points, strides, levels = _points([[4, 4], [12, 4]], [8, 8], [0, 0])
    assert PointAssigner()(points, strides, levels, torch.zeros(0, 4)).tolist() == [-1, -1]


def test_point_assigner_takes_points_inside_the_box_without_centre_sampling():
    box = torch.tensor([[0.0, 0.0, 40.0, 24.0]])  # at the image border
    points, strides, levels = _points([[4, 4], [36, 20], [44, 4], [20, 28]], [8] * 4, [0] * 4)
    matched = PointAssigner(center_sampling_radius=0.0)(points, strides, levels, box)
    assert matched.tolist() == [0, 0, -1, -1]


def test_centre_sampling_keeps_only_points_within_radius_strides_of_the_centre():
    box = torch.tensor([[0.0, 0.0, 80.0, 80.0]])  # centre (40, 40); radius 1.5 * 8 = 12
    points, strides, levels = _points([[36, 36], [44, 50], [30, 40], [28, 40], [60, 60]], [8] * 5, [0] * 5)
    matched = PointAssigner(size_ranges=(-1, 1000, 2000), center_sampling_radius=1.5)(points, strides, levels, box)
    # strictly |dx|, |dy| < 12 -> positive; (28, 40) is exactly 12 away, (60, 60) 20
    assert matched.tolist() == [0, 0, 0, -1, -1]


def test_each_level_takes_only_boxes_whose_max_side_distance_is_in_its_range():
    box = torch.tensor([[0.0, 0.0, 200.0, 200.0]])
    # Same location (100, 100) on three levels: max(l, t, r, b) = 100 is in [64, 128] only.
    points, strides, levels = _points([[100, 100]] * 3, [8, 16, 32], [0, 1, 2])
    matched = PointAssigner(center_sampling_radius=0.0)(points, strides, levels, box)
    assert matched.tolist() == [-1, 0, -1]


def test_two_boxes_competing_for_one_location_go_to_the_smaller_one():
    boxes = torch.tensor([[0.0, 0.0, 60.0, 60.0], [10.0, 10.0, 40.0, 40.0]])
    points, strides, levels = _points([[20, 20], [50, 50]], [8, 8], [0, 0])
    matched = PointAssigner(center_sampling_radius=0.0)(points, strides, levels, boxes)
    assert matched.tolist() == [1, 0]


# --------------------------------------------------------------------------- Gaussian radius


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


# --------------------------------------------------------------------------- CenterHeatmapTarget


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
    assert t.indices.tolist() == [7 * 16 + 7]
    assert t.sizes.tolist() == [[10.0, 10.0]]
    assert t.offsets.tolist() == [[0.0, 0.0]]


def test_overlapping_gaussians_of_one_class_take_the_maximum_not_the_sum():
    boxes = torch.tensor([[8.0, 8.0, 48.0, 48.0], [12.0, 8.0, 52.0, 48.0]])  # centres 1 cell apart
    t = CenterHeatmapTarget()(boxes, torch.tensor([0, 0]), 1, (16, 16), 4)
    assert t.heatmap.max() == 1.0
    assert t.heatmap[0, 7, 7] == 1.0 and t.heatmap[0, 7, 8] == 1.0
    assert t.heatmap.eq(1).sum() == 2


def test_box_crossing_the_border_is_clipped_before_its_centre_is_taken():
    t = CenterHeatmapTarget()(torch.tensor([[-8.0, -8.0, 20.0, 20.0]]), torch.tensor([0]), 1, (8, 8), 4)
    # Clipped to [0, 0, 5, 5] on the map: centre (2.5, 2.5) in cell (2, 2).
    assert t.sizes.tolist() == [[5.0, 5.0]]
    assert t.offsets.tolist() == [[0.5, 0.5]]
    assert t.indices.tolist() == [2 * 8 + 2]
    assert t.heatmap[0, 2, 2] == 1.0


def test_heatmap_target_with_no_boxes_is_all_zero():
    t = CenterHeatmapTarget()(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2, (8, 8), 4)
    assert t.heatmap.sum() == 0 and t.indices.numel() == 0 and t.sizes.shape == (0, 2)


def test_corrected_formula_gives_a_smaller_gaussian():
    box, label = torch.tensor([[0.0, 0.0, 80.0, 80.0]]), torch.tensor([0])
    original = CenterHeatmapTarget(radius_formula="original")(box, label, 1, (32, 32), 4).heatmap
    corrected = CenterHeatmapTarget(radius_formula="corrected")(box, label, 1, (32, 32), 4).heatmap
    # 20 x 20 cells: radius 5 (original) vs 1 (corrected)
    assert (original > 0).sum() == 11 * 11
    assert (corrected > 0).sum() == 3 * 3
