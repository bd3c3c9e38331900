import math

import pytest
import torch

from anchorless.detectors.losses import FocalLoss, GaussianFocalLoss, penalty_reduced_focal_loss

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
