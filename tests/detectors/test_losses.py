import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anchorless.detectors.base import reduce_normalizer
from anchorless.detectors.losses import (
    CenternessLoss,
    FocalLoss,
    GaussianFocalLoss,
    IoULoss,
    L1Loss,
    centerness_target,
    penalty_reduced_focal_loss,
)

LN2 = math.log(2)


def test_focal_loss_matches_the_formula_at_hand_values():
    # logit 0 -> p = 0.5. Positive: 0.25 * 0.5^2 * ln 2; negative: 0.75 * 0.5^2 * ln 2.
    logits = torch.zeros(2)
    targets = torch.tensor([1.0, 0.0])
    expected_sum = 0.25 * 0.25 * LN2 + 0.75 * 0.25 * LN2
    loss = FocalLoss(weight=2.0, alpha=0.25, gamma=2.0)(logits, targets, normalizer=4.0)
    assert loss.item() == pytest.approx(2.0 * expected_sum / 4.0, rel=1e-6)


def test_focal_loss_of_a_confident_right_answer_is_far_smaller_than_cross_entropy():
    logit = torch.tensor([3.0])  # p = 0.9526
    p = torch.sigmoid(logit).item()
    focal = FocalLoss(alpha=0.25, gamma=2.0)(logit, torch.ones(1), 1.0).item()
    assert focal == pytest.approx(0.25 * (1 - p) ** 2 * -math.log(p), rel=1e-5)


def test_penalty_reduced_focal_loss_by_hand():
    prob = torch.tensor([0.5, 0.2, 0.2])
    heatmap = torch.tensor([1.0, 0.5, 0.0])
    pos = -(0.5**2) * math.log(0.5)  # -(1-p)^2 log p at the peak
    near = -(0.5**4) * 0.2**2 * math.log(0.8)  # -(1-y)^4 p^2 log(1-p)
    far = -(1.0**4) * 0.2**2 * math.log(0.8)
    assert penalty_reduced_focal_loss(prob, heatmap).item() == pytest.approx(pos + near + far, rel=1e-6)
    loss = GaussianFocalLoss(weight=1.0)(prob, heatmap, normalizer=1.0)
    assert loss.item() == pytest.approx(pos + near + far, rel=1e-6)


def test_penalty_reduction_makes_a_near_centre_miss_cheaper_than_a_far_one():
    prob = torch.tensor([0.3, 0.3])
    near = penalty_reduced_focal_loss(prob[:1], torch.tensor([0.9])).item()
    far = penalty_reduced_focal_loss(prob[1:], torch.tensor([0.0])).item()
    assert near == pytest.approx(far * 0.1**4, rel=1e-5)


def test_giou_diou_ciou_losses_match_their_formulas_on_two_overlapping_squares():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    gt = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou = 1 / 7  # intersection 1, union 7
    giou = iou - (9 - 7) / 9  # enclosing box 3 x 3
    diou_penalty = 2 / 18  # centre distance^2 = 2, enclosing diagonal^2 = 18
    assert IoULoss(kind="giou")(pred, gt, 1.0).item() == pytest.approx(1 - giou, rel=1e-5)
    assert IoULoss(kind="diou")(pred, gt, 1.0).item() == pytest.approx(1 - iou + diou_penalty, rel=1e-5)
    # same aspect ratio -> CIoU's aspect term is 0
    assert IoULoss(kind="ciou")(pred, gt, 1.0).item() == pytest.approx(1 - iou + diou_penalty, rel=1e-5)


def test_iou_loss_applies_per_box_weights_the_module_weight_and_the_normaliser():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    gt = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])  # losses 0 and 1 - 1/4
    loss = IoULoss(weight=2.0)(boxes, gt, normalizer=3.0, weights=torch.tensor([5.0, 0.5]))
    assert loss.item() == pytest.approx(2.0 * (0.5 * 0.75) / 3.0, rel=1e-5)


def test_l1_loss_sums_weighted_rows_and_divides_by_the_normaliser():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert L1Loss(weight=0.1)(pred, target, 2.0).item() == pytest.approx(0.1 * 5 / 2, rel=1e-6)
    assert L1Loss()(pred, target, 1.0, weights=torch.tensor([1.0, 0.0])).item() == pytest.approx(3.0)


def test_centerness_target_and_its_bce_by_hand():
    ltrb = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    target = centerness_target(ltrb)
    assert target.tolist() == pytest.approx([math.sqrt(1 / 3 * 2 / 4), 1.0], rel=1e-6)
    loss = CenternessLoss(weight=1.0)(torch.zeros(2), target, normalizer=2.0)
    assert loss.item() == pytest.approx(LN2, rel=1e-6)  # BCE at logit 0 is ln 2 for any target


def test_losses_are_zero_without_positives_and_keep_the_graph():
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = IoULoss()(pred, torch.zeros(0, 4), reduce_normalizer(0))
    assert loss.item() == 0.0 and loss.requires_grad


def test_normaliser_is_clamped_to_one_on_a_single_process():
    assert reduce_normalizer(0).item() == 1.0
    assert reduce_normalizer(7).item() == 7.0
    assert reduce_normalizer(0.25, min_value=1e-6).item() == 0.25


def _average_on_two_ranks(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = reduce_normalizer([3.0, 0.0][rank]).item()
    finally:
        dist.destroy_process_group()


def test_normaliser_is_averaged_across_ranks_then_clamped():
    # Rank 0 has 3 positives, rank 1 none: both divide by (3 + 0) / 2 = 1.5.
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        results = mp.get_context("fork").Manager().dict()
        mp.start_processes(_average_on_two_ranks, args=(init_file, results), nprocs=2, start_method="fork")
        assert dict(results) == {0: 1.5, 1: 1.5}
