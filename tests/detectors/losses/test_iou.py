import math

import pytest
import torch

from anchorless.detectors.base import reduce_normalizer
from anchorless.detectors.losses import IOU_KINDS, IoULoss, iou_loss, pairwise_iou_similarity


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


IDENTICAL = ([[0.0, 0.0, 2.0, 2.0]], [[0.0, 0.0, 2.0, 2.0]])
# Disjoint 2 x 2 squares 4 apart: IoU 0, enclosing box 6 x 2, centres (1, 1) and (5, 1).
DISJOINT = ([[0.0, 0.0, 2.0, 2.0]], [[4.0, 0.0, 6.0, 2.0]])
# A 2 x 2 square in the middle of a 4 x 4 one: IoU 1/4, same centre, same aspect.
INSIDE = ([[1.0, 1.0, 3.0, 3.0]], [[0.0, 0.0, 4.0, 4.0]])
EXPECTED = {  # kind: (identical, disjoint, inside)
    "iou": (0.0, -math.log(1e-6), math.log(4)),  # -ln IoU, clamped at 1e-6 as UnitBox codes do
    "linear_iou": (0.0, 1.0, 0.75),  # 1 - IoU
    "giou": (0.0, 1 + (12 - 8) / 12, 0.75),  # 1 - IoU + (enclosing - union) / enclosing
    "diou": (0.0, 1 + 16 / 40, 0.75),  # 1 - IoU + rho^2 / c^2
    "ciou": (0.0, 1 + 16 / 40, 0.75),  # + alpha v, 0 for equal aspect ratios
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_iou_loss_matches_its_formula_on_identical_disjoint_and_nested_boxes(kind):
    for (pred, gt), expected in zip((IDENTICAL, DISJOINT, INSIDE), EXPECTED[kind]):
        loss = iou_loss(torch.tensor(pred), torch.tensor(gt), kind)
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (pred, gt)
        assert IoULoss(kind=kind, weight=2.0)(torch.tensor(pred), torch.tensor(gt), 4.0).item() == pytest.approx(
            expected / 2, rel=1e-5, abs=1e-6
        )


def test_ciou_adds_its_aspect_term_when_the_aspect_ratios_differ():
    pred, gt = torch.tensor([[0.0, 0.0, 4.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    iou, rho2_over_c2 = 0.5, 1 / 32  # centres (2, 1), (2, 2); enclosing 4 x 4
    v = 4 / math.pi**2 * (math.atan(4 / 4) - math.atan(4 / 2)) ** 2
    alpha = v / (1 - iou + v)
    assert iou_loss(pred, gt, "ciou").item() == pytest.approx(1 - iou + rho2_over_c2 + alpha * v, rel=1e-5)
    assert iou_loss(pred, gt, "diou").item() == pytest.approx(1 - iou + rho2_over_c2, rel=1e-5)


@pytest.mark.parametrize("kind", IOU_KINDS)
def test_the_pairwise_similarity_of_the_costs_is_one_minus_the_same_loss(kind):
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(6, 2, generator=generator) * 20
    a = torch.cat([corners, corners + 1 + torch.rand(6, 2, generator=generator) * 10], dim=1)
    b = a + torch.rand(6, 4, generator=generator) * 4
    pairwise = pairwise_iou_similarity(a, b, kind)  # (6, 6)
    torch.testing.assert_close(1 - pairwise.diagonal(), iou_loss(a, b, kind), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["iou", "linear_iou"])
def test_plain_iou_losses_stay_finite_but_give_no_gradient_without_overlap(kind):
    # Why GIoU exists: with no overlap, IoU is flat.
    pred = torch.tensor([[10.0, 10.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    target = torch.tensor([[8.0, 8.0, 20.0, 24.0], [4.0, 0.0, 6.0, 2.0]])
    loss = IoULoss(kind=kind)(pred, target, normalizer=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0
