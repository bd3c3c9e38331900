import pytest
import torch

from anchorless.detectors import build_detector, resolve_detector_config
from anchorless.detectors.base import SECTIONS
from anchorless.detectors.fcos import FCOS

from .conftest import small_config


def test_fcos_thresholds_on_class_probability_scores_by_sqrt_of_cls_times_centerness_and_applies_nms():
    model = build_detector(small_config("fcos"))
    levels = [4, 1, 1, 1, 1]
    num_points = sum(levels)
    cls = torch.full((1, num_points, 3), -10.0)
    ctr = torch.full((1, num_points), 0.0)
    points = torch.zeros(num_points, 2)
    ltrb = torch.zeros(1, num_points, 4)
    # Two near-identical class-0 boxes on level 0 and one on level 1; one low-prob candidate.
    cls[0, 0, 0], cls[0, 1, 0], cls[0, 4, 0], cls[0, 2, 1] = 2.0, 1.0, 0.0, -3.5  # p(-3.5) = 0.029 < 0.05
    # Boxes [0, 0, 10, 10], [0.5, 0, 10.5, 10] and [20, 20, 30, 30]: 5 pixels around each point.
    points[0], points[1], points[4] = torch.tensor([5.0, 5]), torch.tensor([5.5, 5]), torch.tensor([25.0, 25])
    ltrb[0, [0, 1, 4]] = 5.0
    det = model.inference(
        {"cls_logits": cls, "centerness": ctr, "ltrb": ltrb, "points": points, "level_sizes": levels}, (64, 64)
    )[0]
    p = torch.sigmoid(torch.tensor([2.0, 0.0]))
    expected = torch.sqrt(p * 0.5)  # centerness logit 0 -> 0.5
    assert det["scores"].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert det["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]


@pytest.mark.parametrize("section", SECTIONS)
def test_swapping_one_entry_of_the_fcos_components_table_swaps_the_built_part(section):
    original = FCOS.components[section]
    replacement = type(f"My{original.__name__}", (original,), {})  # same settings, another class

    class SwappedFCOS(FCOS):
        components = {**FCOS.components, section: replacement}

    model = SwappedFCOS.from_config(3, resolve_detector_config(small_config("fcos")))
    assert type(getattr(model, section)) is replacement
    others = [s for s in SECTIONS if s != section]
    assert all(type(getattr(model, s)) is FCOS.components[s] for s in others)


def test_fcos_takes_atss_by_config_with_anchors_of_eight_strides_and_any_number_of_levels():
    model = build_detector(small_config("fcos", assigner={"kind": "atss", "size_ranges": [-1, 1e8]}))
    assert type(model.assigner.rule).__name__ == "ATSSAssigner" and model.assigner.num_levels is None
    assert model.assigner.rule.anchor_scale == 8.0 and model.assigner.rule.topk == 9
    targets = [{"boxes": torch.tensor([[8.0, 12, 28, 32], [40, 16, 88, 60]]), "labels": torch.tensor([0, 1])}]
    losses = model(torch.rand(1, 3, 64, 96), targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box"] > 0
    # The point rule stays the default, its size ranges checked against the pyramid.
    assert build_detector(small_config("fcos")).assigner.kind == "point"


@pytest.mark.parametrize("box_loss", ["iou", "linear_iou", "giou", "diou", "ciou"])
def test_fcos_box_loss_is_chosen_by_config(box_loss):
    model = build_detector(small_config("fcos", loss={"box_loss": box_loss}))
    assert model.loss.box_loss.kind == box_loss
