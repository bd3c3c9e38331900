import pytest
import torch

from anchorless.detectors.losses import L1Loss


def test_l1_loss_sums_weighted_rows_and_divides_by_the_normaliser():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert L1Loss(weight=0.1)(pred, target, 2.0).item() == pytest.approx(0.1 * 5 / 2, rel=1e-6)
    assert L1Loss()(pred, target, 1.0, weights=torch.tensor([1.0, 0.0])).item() == pytest.approx(3.0)
