"""One result type for every assigner: positive (prediction, ground truth) pairs."""

import pytest
import torch

from anchorless.detectors.assigners import (
    AssignResult,
    ATSSAssigner,
    CenterHeatmapTarget,
    MinCostAssigner,
    PointAssigner,
    PyramidAssigner,
)


def test_pairs_from_one_ground_truth_per_prediction_are_in_location_order_and_round_trip():
    matched = torch.tensor([-1, 2, -1, 0, 2])  # (R,)
    result = AssignResult.from_matched_gt(matched)
    assert result.pred_idx.tolist() == [1, 3, 4] and result.gt_idx.tolist() == [2, 0, 2]
    assert result.num_pos == 3 and result.num_preds == 5
    assert result.matched_gt().tolist() == matched.tolist()


def test_an_empty_result_makes_every_prediction_background():
    result = AssignResult.empty(4)
    assert result.num_pos == 0 and result.pred_idx.dtype == result.gt_idx.dtype == torch.long
    assert result.matched_gt().tolist() == [-1, -1, -1, -1]
    assert result.heatmap is None and result.box_targets is None


def test_the_per_prediction_view_refuses_a_prediction_shared_by_two_ground_truths():
    shared = AssignResult(torch.tensor([0, 0]), torch.tensor([0, 1]), num_preds=3)  # OneNet's "min" mode can do this
    with pytest.raises(ValueError, match="several ground truths"):
        shared.matched_gt()


def _assign_with_every_assigner():
    boxes, labels = torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.tensor([1])
    xs = torch.arange(4, 64, 8.0)
    points = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), dim=-1).reshape(-1, 2)  # (64, 2) stride 8
    pred_boxes = torch.cat([points - 12, points + 12], dim=1)  # (64, 4)
    logits = torch.zeros(64, 2)
    strides, levels = torch.full((64,), 8), torch.zeros(64, dtype=torch.long)
    min_cost = MinCostAssigner()
    return {
        "min_cost": min_cost(logits, pred_boxes, boxes, labels, (64, 64)),
        "min_cost.one_to_many": min_cost.one_to_many(logits, pred_boxes, boxes, labels, (64, 64), points, 4),
        "min_cost.solve": min_cost.solve(min_cost.cost_matrix(logits, pred_boxes, boxes, labels, (64, 64))),
        "point": PointAssigner(size_ranges=(-1, 1e8))(points, strides, levels, boxes),
        "atss": ATSSAssigner()(points, strides, levels, boxes),
        "pyramid.atss": PyramidAssigner(kind="atss")(points, strides, levels, boxes),
        "center_heatmap": CenterHeatmapTarget()(boxes, labels, 2, (8, 8), 8),
    }


@pytest.mark.parametrize("kind", sorted(_assign_with_every_assigner()))
def test_every_assigner_returns_an_assign_result_with_one_pair_per_positive(kind):
    result = _assign_with_every_assigner()[kind]
    assert isinstance(result, AssignResult)
    assert result.num_preds == 64 and result.num_pos >= 1
    assert result.pred_idx.shape == result.gt_idx.shape and result.gt_idx.tolist() == [0] * result.num_pos
    assert 0 <= int(result.pred_idx.min()) and int(result.pred_idx.max()) < result.num_preds
