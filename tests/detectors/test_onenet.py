import pytest
import torch

from anchorless.detectors import build_detector
from anchorless.detectors.onenet import OneNetHead

from .conftest import small_config


def test_onenet_decodes_location_plus_minus_ltrb_and_clips_to_the_image():
    model = build_detector(small_config("onenet", postprocess={"topk": 2}))
    logits = torch.full((1, 4, 3), -10.0)  # R = 4 locations, C = 3
    logits[0, 2, 0], logits[0, 1, 2] = 3.0, 1.0
    boxes = torch.tensor([[[0.0, 0, 4, 4], [2, 2, 40, 6], [4, 4, 12, 10], [0, 0, 1, 1]]])
    det = model.inference({"heads": [{"cls_logits": logits, "boxes": boxes}]}, (32, 32))[0]
    assert det["labels"].tolist() == [0, 2]
    assert det["boxes"].tolist() == [[4.0, 4.0, 12.0, 10.0], [2.0, 2.0, 32.0, 6.0]]
    assert det["scores"].tolist() == pytest.approx(torch.sigmoid(torch.tensor([3.0, 1.0])).tolist())


def test_onenet_ltrb_scale_multiplies_the_regression_and_keeps_the_initial_box_size():
    features = torch.randn(2, 16, 8, 8)
    plain, scaled = OneNetHead(16, 3), OneNetHead(16, 3, ltrb_scale=4.0)
    scaled.load_state_dict(plain.state_dict())  # same weights, scaled's bias still ltrb_init / 4
    with torch.no_grad():
        scaled.ltrb_pred.bias.fill_(1.0)
        plain.ltrb_pred.bias.fill_(1.0)
        _, ltrb_plain = plain.predict(features)
        _, ltrb_scaled = scaled.predict(features)
    torch.testing.assert_close(ltrb_scaled, 4.0 * ltrb_plain)
    # At initialisation (zero weights) every side is ltrb_init pixels, whatever the scale.
    fresh = OneNetHead(16, 3, ltrb_scale=4.0, ltrb_init=4.0)
    with torch.no_grad():
        fresh.ltrb_pred.weight.zero_()
        _, ltrb = fresh.predict(features)
    torch.testing.assert_close(ltrb, torch.full_like(ltrb, 4.0))
    with pytest.raises(ValueError, match="ltrb_scale must be > 0"):
        OneNetHead(16, 3, ltrb_scale=0.0)


@pytest.mark.parametrize("box_loss", ["iou", "linear_iou", "giou", "diou", "ciou"])
def test_onenet_matches_on_the_same_iou_kind_it_trains_with(box_loss):
    model = build_detector(small_config("onenet", loss={"box_loss": box_loss}))
    assert model.loss.giou_loss.kind == box_loss and model.assigner.iou_cost.kind == box_loss
    assert "box_loss" not in model.config["assigner"]  # one config path: detector.loss.box_loss
    losses = model(torch.rand(1, 3, 64, 64), [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1])}])
    assert torch.isfinite(losses["loss"])


def test_onenet_fpn_predicts_on_every_level_with_sides_in_strides():
    model = build_detector(small_config("onenet_fpn", neck={"out_channels": 64}, head={"num_convs": 1, "ltrb_init": 1.0}))
    with torch.no_grad():
        model.head.ltrb_pred.weight.zero_()  # every side is ltrb_init strides
    model.eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        outputs = model.forward_head(model.neck(model.backbone(images)))
    assert list(outputs) == ["heads"]  # no auxiliary head outside training
    head = outputs["heads"][0]
    sizes = [(64 // s) ** 2 if s <= 64 else 1 for s in (8, 16, 32, 64, 128)]  # P3-P7 of a 64-px image
    assert head["cls_logits"].shape == (1, sum(sizes), 3) and head["boxes"].shape == (1, sum(sizes), 4)
    strides = torch.cat([torch.full((n,), float(s)) for n, s in zip(sizes, (8, 16, 32, 64, 128))])
    torch.testing.assert_close(head["strides"][:, 0], strides)
    expected = torch.cat([head["points"] - strides[:, None], head["points"] + strides[:, None]], dim=1)
    torch.testing.assert_close(head["boxes"][0], expected)


def test_onenet_fpn_trains_its_auxiliary_one_to_many_classifier_on_the_shared_boxes():
    model = build_detector(small_config("onenet_fpn", neck={"out_channels": 64}, head={"num_convs": 1, "one_to_many_topk": 4}))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = model(torch.rand(1, 3, 64, 64), targets)
    assert {"loss_cls", "loss_l1", "loss_giou", "loss_cls_o2m", "loss_l1_o2m", "loss_giou_o2m"} <= set(losses)
    losses["loss"].backward()
    assert model.head.one_to_many.weight.grad.abs().sum() > 0
    model.eval()
    assert "one_to_many" not in model.forward_head(model.neck(model.backbone(torch.rand(1, 3, 64, 64))))


def test_min_cost_centre_prior_reads_each_locations_own_stride():
    from anchorless.detectors.assigners import MinCostAssigner

    assigner = MinCostAssigner(center_radius=1.5)
    gt = torch.tensor([[0.0, 0.0, 200.0, 200.0]])  # centre (100, 100)
    # Two locations 40 px right of the centre, one on a stride-8 level, one on a stride-32 level.
    points, strides = torch.tensor([[140.0, 100.0], [140.0, 100.0]]), torch.tensor([[8.0], [32.0]])
    assert assigner.center_region(points, gt, strides).tolist() == [[False, True]]  # 12 px vs 48 px
    # The stride-8 location predicts the box exactly, yet only the stride-32 one may be chosen.
    logits, boxes = torch.zeros(2, 1), torch.tensor([[0.0, 0.0, 200.0, 200.0], [120.0, 80.0, 160.0, 120.0]])
    match = assigner(logits, boxes, gt, torch.tensor([0]), (256, 256), points=points, stride=strides)
    assert match.pred_idx.tolist() == [1]
    assert MinCostAssigner()(logits, boxes, gt, torch.tensor([0]), (256, 256)).pred_idx.tolist() == [0]
