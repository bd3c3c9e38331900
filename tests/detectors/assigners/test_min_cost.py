import math

import pytest
import torch

from anchorless.detectors.assigners import MinCostAssigner


def test_min_cost_assigner_with_no_ground_truth_assigns_nothing():
    match = MinCostAssigner()(torch.zeros(5, 3), torch.rand(5, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), (64, 64))
    assert match.pred_idx.numel() == 0 and match.gt_idx.numel() == 0


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
    match = assigner(logits, boxes, gt, torch.tensor([0]), (64, 64))
    assert match.pred_idx.tolist() == [int(cost[0].argmin())] == [1]
    assert match.gt_idx.tolist() == [0]


def test_two_ground_truths_share_one_location_in_min_mode_but_not_in_hungarian_mode():
    # Location 0 is the best match for both ground truths; location 1 is second best.
    gts = torch.tensor([[0.0, 0.0, 20.0, 20.0], [2.0, 2.0, 22.0, 22.0]])
    boxes = torch.tensor([[1.0, 1.0, 21.0, 21.0], [4.0, 4.0, 24.0, 24.0], [40.0, 40.0, 60.0, 60.0]])
    logits = torch.zeros(3, 1)
    labels = torch.tensor([0, 0])
    shared = MinCostAssigner(mode="min")(logits, boxes, gts, labels, (64, 64))
    assert shared.pred_idx.tolist() == [0, 0] and shared.gt_idx.tolist() == [0, 1]

    assigner = MinCostAssigner(mode="hungarian")
    match = assigner(logits, boxes, gts, labels, (64, 64))
    pred, gt = match.pred_idx, match.gt_idx
    assert sorted(pred.tolist()) == [0, 1] and gt.tolist() == [0, 1]
    cost = assigner.cost_matrix(logits, boxes, gts, labels, (64, 64))
    best = min(cost[0, 0] + cost[1, 1], cost[0, 1] + cost[1, 0])
    assert cost[gt, pred].sum().item() == pytest.approx(best.item())


def test_hungarian_leaves_ground_truths_unmatched_when_there_are_fewer_locations():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    boxes = torch.tensor([[20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    match = MinCostAssigner(mode="hungarian")(torch.zeros(2, 1), boxes, gts, torch.zeros(3, dtype=torch.long), (64, 64))
    assert match.pred_idx.tolist() == [0, 1] and match.gt_idx.tolist() == [1, 2]


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
    match = assigner.one_to_many(logits, boxes, gts, labels, (32, 48), points, topk=3)
    pred, gt = match.pred_idx, match.gt_idx
    assert list(zip(pred.tolist(), gt.tolist())) == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert 5 not in pred.tolist()  # outside both objects


def test_one_to_many_gives_an_object_with_no_location_inside_its_cheapest_one_and_handles_no_objects():
    points = torch.tensor([[2.0, 2.0], [30.0, 30.0]])
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [26.0, 26.0, 34.0, 34.0]])
    tiny = torch.tensor([[27.0, 27.0, 29.0, 29.0]])  # between grid points: no location inside
    match = MinCostAssigner().one_to_many(torch.zeros(2, 1), boxes, tiny, torch.tensor([0]), (40, 40), points, topk=9)
    assert match.pred_idx.tolist() == [1] and match.gt_idx.tolist() == [0]
    none = MinCostAssigner().one_to_many(torch.zeros(2, 1), boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), (40, 40), points, 9)
    assert none.pred_idx.numel() == 0 and none.gt_idx.numel() == 0


def test_center_radius_keeps_the_one_to_one_positive_near_the_box_centre_unless_no_location_is():
    # A 40-px-wide object on a row of locations every 4 px; the best-predicted box sits at its
    # edge (location 1), a poor one at its centre (location 5).
    points = torch.tensor([[x, 20.0] for x in (2.0, 6.0, 10.0, 14.0, 18.0, 22.0, 26.0, 30.0)])
    gt = torch.tensor([[4.0, 0.0, 44.0, 40.0]])  # centre (24, 20)
    boxes = torch.tensor([[20.0, 10.0, 30.0, 30.0]] * 8)
    boxes[1] = gt[0]
    labels = torch.tensor([0])
    logits = torch.zeros(8, 1)
    free = MinCostAssigner()(logits, boxes, gt, labels, (48, 48))
    assert free.pred_idx.tolist() == [1]  # OneNet: the cheapest location anywhere
    prior = MinCostAssigner(center_radius=1.5)
    # Within 1.5 strides (6 px) of x = 24 and inside the box: x in (18, 30) -> locations 5, 6.
    assert prior.center_region(points, gt, stride=4).nonzero()[:, 1].tolist() == [5, 6]
    match = prior(logits, boxes, gt, labels, (48, 48), points=points, stride=4)
    assert match.pred_idx.tolist() == [5]  # ties: the first of the region
    # A box between locations (none in its region) still gets its cheapest location; Hungarian too.
    tiny = torch.tensor([[35.0, 19.0, 37.0, 21.0]])
    near_tiny = boxes.clone()
    near_tiny[7] = torch.tensor([34.0, 18.0, 38.0, 22.0])
    assert prior(logits, near_tiny, tiny, labels, (48, 48), points=points, stride=4).pred_idx.tolist() == [7]
    hungarian = MinCostAssigner(mode="hungarian", center_radius=1.5)
    assert hungarian(logits, boxes, gt, labels, (48, 48), points=points, stride=4).pred_idx.tolist() == [5]
    with pytest.raises(ValueError, match="needs the locations' points"):
        prior(logits, boxes, gt, labels, (48, 48))
    with pytest.raises(ValueError, match="center_radius must be >= 0"):
        MinCostAssigner(center_radius=-1.0)
