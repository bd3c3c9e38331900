import statistics

import torch

from anchorless.detectors.assigners import ATSSAssigner


def _points(xy, strides, levels):
    return torch.tensor(xy, dtype=torch.float32), torch.tensor(strides), torch.tensor(levels)


def test_atss_threshold_is_mean_plus_std_of_the_nearest_candidates_per_box():
    # Two levels, anchors of one stride (anchor_scale 1), two candidates per level.
    # Level 0 (stride 4): A0 (6, 6), A1 (11, 8), A2 (22, 22); level 1 (stride 8): B0 (8, 8), B1 (24, 24).
    points, strides, levels = _points([[6, 6], [11, 8], [22, 22], [8, 8], [24, 24]], [4, 4, 4, 8, 8], [0, 0, 0, 1, 1])
    boxes = torch.tensor([[4.0, 4.0, 12.0, 12.0], [16.0, 16.0, 32.0, 32.0]])  # centres (8, 8), (24, 24)
    # Box 0: candidates A0, A1 (nearest of level 0) and B0, B1; anchors [4,4,8,8], [9,6,13,10],
    # [4,4,12,12], [20,20,28,28] -> IoU 16/64, 12/68, 1, 0.
    ious_0 = [16 / 64, 12 / 68, 1.0, 0.0]
    threshold_0 = statistics.mean(ious_0) + statistics.stdev(ious_0)  # 0.357 + 0.442 = 0.798
    # Box 1: candidates A2, A1 and B1, B0 -> IoU 16/256, 0, 64/256, 0.
    ious_1 = [16 / 256, 0.0, 64 / 256, 0.0]
    threshold_1 = statistics.mean(ious_1) + statistics.stdev(ious_1)  # 0.078 + 0.118 = 0.196
    assert threshold_1 < 0.25 < threshold_0  # an IoU of 0.25 fails box 0's bar and passes box 1's
    matched = ATSSAssigner(topk=2, anchor_scale=1.0)(points, strides, levels, boxes).matched_gt()
    assert matched.tolist() == [-1, -1, -1, 0, 1]


def test_atss_never_takes_a_location_outside_its_box():
    # The candidates' anchors overlap the box well, but their centres lie outside it.
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    points, strides, levels = _points([[12, 5], [-2, 5], [5, 12]], [4, 4, 4], [0, 0, 0])
    assert ATSSAssigner(topk=3, anchor_scale=4.0)(points, strides, levels, box).num_pos == 0
    # Random scenes: every positive's centre is strictly inside its box.
    generator = torch.Generator().manual_seed(0)
    xs = torch.arange(4, 128, 8.0)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), dim=-1).reshape(-1, 2)  # (256, 2) stride 8
    coarse = grid[::4] * 2  # a second level, stride 16
    points = torch.cat([grid, coarse])
    strides = torch.cat([torch.full((256,), 8), torch.full((64,), 16)])
    levels = torch.cat([torch.zeros(256, dtype=torch.long), torch.ones(64, dtype=torch.long)])
    for _ in range(5):
        corners = torch.rand(6, 2, generator=generator) * 100
        boxes = torch.cat([corners, corners + 4 + torch.rand(6, 2, generator=generator) * 60], dim=1)
        match = ATSSAssigner()(points, strides, levels, boxes)
        xy, owner = points[match.pred_idx], boxes[match.gt_idx]
        assert match.num_pos > 0
        assert ((xy > owner[:, :2]) & (xy < owner[:, 2:])).all()


def test_a_location_claimed_by_two_boxes_goes_to_the_higher_iou_not_the_smaller_box():
    # One location (8, 8) with the anchor [4, 4, 12, 12] inside both boxes.
    points, strides, levels = _points([[8, 8]], [8], [0])
    larger = [3.0, 3.0, 13.0, 13.0]  # area 100, IoU 64 / 100 = 0.64
    smaller = [5.0, 5.0, 11.0, 11.0]  # area 36, IoU 36 / 64 = 0.56: FCOS's rule would pick it
    matched = ATSSAssigner(anchor_scale=1.0)(points, strides, levels, torch.tensor([smaller, larger])).matched_gt()
    assert matched.tolist() == [1]


def test_atss_with_no_ground_truth_marks_everything_background():
    points, strides, levels = _points([[4, 4], [12, 4]], [8, 8], [0, 0])
    assert ATSSAssigner()(points, strides, levels, torch.zeros(0, 4)).matched_gt().tolist() == [-1, -1]
