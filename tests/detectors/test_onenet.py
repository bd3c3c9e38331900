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
