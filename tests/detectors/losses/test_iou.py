import pytest
import torch

from anchorless.detectors.base import reduce_normalizer
from anchorless.detectors.losses import IoULoss


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


def test_losses_are_zero_without_positives_and_keep_the_graph():
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = IoULoss()(pred, torch.zeros(0, 4), reduce_normalizer(0))
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_a_zero_size_prediction_gets_a_finite_loss_and_gradient(kind):
    # FCOS's ReLU'd distances put such boxes in the first steps of every run.
    pred = torch.tensor([[10.0, 10.0, 10.0, 10.0], [5.0, 5.0, 25.0, 5.0]], requires_grad=True)
    target = torch.tensor([[8.0, 8.0, 20.0, 24.0], [4.0, 4.0, 24.0, 12.0]])
    loss = IoULoss(kind=kind)(pred, target, normalizer=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 1.0  # no overlap: at least 1 - IoU = 1
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
