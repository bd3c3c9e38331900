import math

import pytest
import torch

from anchorless.detectors.losses import (
    DistributionFocalLoss,
    QualityFocalLoss,
    distribution_focal_loss,
    quality_focal_loss,
)

LN2 = math.log(2)


def test_quality_focal_loss_matches_its_formula_at_hand_values():
    # A positive at logit 0 (s = 0.5) with quality target 0.8: BCE(0.5, 0.8) = ln 2, times |0.8 - 0.5|^2.
    # A negative at logit ln 3 (s = 0.75): BCE = -ln(0.25) = ln 4, times 0.75^2.
    logits = torch.tensor([[0.0, math.log(3)]])
    target = torch.tensor([[0.8, 0.0]])
    loss = quality_focal_loss(logits, target, beta=2.0)
    assert loss.tolist() == [pytest.approx([LN2 * 0.3**2, 2 * LN2 * 0.75**2], rel=1e-5)]
    # On probabilities (GFL v2's joint score) it is the same number.
    assert quality_focal_loss(logits.sigmoid(), target, from_logits=False).tolist() == [
        pytest.approx(loss[0].tolist(), rel=1e-5)
    ]
    # A perfect quality prediction costs nothing; the module sums, weighs and normalises.
    assert quality_focal_loss(torch.tensor([0.0]), torch.tensor([0.5])).item() == pytest.approx(0.0, abs=1e-7)
    total = QualityFocalLoss(weight=3.0)(logits, target, normalizer=2.0)
    assert total.item() == pytest.approx(3.0 * loss.sum().item() / 2.0, rel=1e-6)


def test_distribution_focal_loss_is_cross_entropy_to_the_two_bins_around_the_target():
    # Bins 0..4 with probabilities 1/6, 2/6, 1/6, 1/6, 1/6; target 1.25 between bins 1 and 2.
    logits = torch.tensor([[0.0, LN2, 0.0, 0.0, 0.0]])
    expected = -(0.75 * math.log(2 / 6) + 0.25 * math.log(1 / 6))
    assert distribution_focal_loss(logits, torch.tensor([1.25])).item() == pytest.approx(expected, rel=1e-5)
    two = logits.repeat(2, 1), torch.tensor([1.25, 1.25])
    weighted = DistributionFocalLoss(weight=0.25)(*two, 4.0, weights=torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx(0.25 * 4 * expected / 4.0, rel=1e-5)


def test_distribution_focal_loss_is_smallest_at_the_two_bin_split_of_its_target():
    # The gradient vanishes where the softmax puts (y_r - y) on y_l and (y - y_l) on y_r.
    target = torch.tensor([3.7])
    split = torch.full((1, 17), -30.0)
    split[0, 3], split[0, 4] = math.log(0.3), math.log(0.7)
    split.requires_grad_(True)
    distribution_focal_loss(split, target).sum().backward()
    assert split.grad.abs().max().item() < 1e-6
