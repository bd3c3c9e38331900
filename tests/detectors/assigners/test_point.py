import torch

from anchorless.detectors.assigners import PointAssigner


def _points(xy, strides, levels):
    return torch.tensor(xy, dtype=torch.float32), torch.tensor(strides), torch.tensor(levels)


def test_point_assigner_with_no_ground_truth_marks_everything_background():
    points, strides, levels = _points([[4, 4], [12, 4]], [8, 8], [0, 0])
    assert PointAssigner()(points, strides, levels, torch.zeros(0, 4)).matched_gt().tolist() == [-1, -1]


def test_point_assigner_takes_points_inside_the_box_without_centre_sampling():
    box = torch.tensor([[0.0, 0.0, 40.0, 24.0]])  # at the image border
    points, strides, levels = _points([[4, 4], [36, 20], [44, 4], [20, 28]], [8] * 4, [0] * 4)
    matched = PointAssigner(center_sampling_radius=0.0)(points, strides, levels, box).matched_gt()
    assert matched.tolist() == [0, 0, -1, -1]


def test_centre_sampling_keeps_only_points_within_radius_strides_of_the_centre():
    box = torch.tensor([[0.0, 0.0, 80.0, 80.0]])  # centre (40, 40); radius 1.5 * 8 = 12
    points, strides, levels = _points([[36, 36], [44, 50], [30, 40], [28, 40], [60, 60]], [8] * 5, [0] * 5)
    matched = PointAssigner(size_ranges=(-1, 1000, 2000), center_sampling_radius=1.5)(points, strides, levels, box).matched_gt()
    # strictly |dx|, |dy| < 12 -> positive; (28, 40) is exactly 12 away, (60, 60) 20
    assert matched.tolist() == [0, 0, 0, -1, -1]


def test_each_level_takes_only_boxes_whose_max_side_distance_is_in_its_range():
    box = torch.tensor([[0.0, 0.0, 200.0, 200.0]])
    # Same location (100, 100) on three levels: max(l, t, r, b) = 100 is in [64, 128] only.
    points, strides, levels = _points([[100, 100]] * 3, [8, 16, 32], [0, 1, 2])
    matched = PointAssigner(center_sampling_radius=0.0)(points, strides, levels, box).matched_gt()
    assert matched.tolist() == [-1, 0, -1]


def test_two_boxes_competing_for_one_location_go_to_the_smaller_one():
    boxes = torch.tensor([[0.0, 0.0, 60.0, 60.0], [10.0, 10.0, 40.0, 40.0]])
    points, strides, levels = _points([[20, 20], [50, 50]], [8, 8], [0, 0])
    matched = PointAssigner(center_sampling_radius=0.0)(points, strides, levels, boxes).matched_gt()
    assert matched.tolist() == [1, 0]
