import math

import pytest
import torch

from anchorless.detectors import build_detector
from anchorless.detectors.gfl import GFLHead, dgqp_features, integral

from .conftest import small_config


@pytest.mark.parametrize("distance", [0.0, 3.7, 9.25, 15.9])
def test_integral_decode_recovers_a_target_exactly_from_its_two_bin_split(distance):
    # DFL's optimum puts (y_r - y) on floor(y) and (y - y_l) on the next bin: its expectation is y.
    left = int(distance)
    probs = torch.zeros(17)
    probs[left], probs[left + 1] = left + 1 - distance, distance - left
    logits = probs.clamp(min=1e-30).log()
    assert integral(logits).item() == pytest.approx(distance, abs=1e-5)
    assert integral(torch.zeros(17)).item() == pytest.approx(8.0)  # uniform: reg_max / 2


def test_dgqp_reads_the_top_k_probabilities_of_each_side_and_their_mean():
    probs = torch.zeros(2, 4, 17)  # (locations, sides, bins)
    probs[:, :, 0], probs[:, :, 1], probs[:, :, 2], probs[:, :, 3], probs[:, :, 4] = 0.4, 0.3, 0.15, 0.1, 0.05
    features = dgqp_features(probs, topk=4)
    assert features.shape == (2, 4 * 5)  # 4 sides x (top-4 + mean)
    assert features[0, :5].tolist() == pytest.approx([0.4, 0.3, 0.15, 0.1, 0.2375])
    head = GFLHead(32, 3, strides=(8, 16), version="v2")
    assert head.quality[0].in_channels == 20 and head.quality[0].out_channels == 64  # hidden 64
    cls_logits, dist_logits, quality = head([torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)])
    assert cls_logits.shape == (1, 20, 3) and dist_logits.shape == (1, 20, 4, 17)
    assert quality.shape == (1, 20) and ((quality > 0) & (quality < 1)).all()
    assert GFLHead(32, 3, strides=(8, 16))([torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)])[2] is None  # v1


def test_dist_bias_decay_sets_the_first_sides_and_zero_is_the_official_uniform_start():
    official, short = GFLHead(32, 3, strides=(8,)), GFLHead(32, 3, strides=(8,), dist_bias_decay=1.0)
    with torch.no_grad():
        official.dist_pred.weight.zero_()
        short.dist_pred.weight.zero_()
        feature = [torch.randn(1, 32, 2, 2)]
        assert integral(official(feature)[1]).flatten().tolist() == pytest.approx([8.0] * 16)
        expected = sum(k * math.exp(-k) for k in range(17)) / sum(math.exp(-k) for k in range(17))  # 0.58
        assert integral(short(feature)[1]).flatten().tolist() == pytest.approx([expected] * 16, rel=1e-5)


@pytest.mark.parametrize("name", ["gfl", "gfl_v2"])
def test_gfl_scores_by_the_joint_score_alone_and_decodes_sides_in_strides(name):
    model = build_detector(small_config(name, postprocess={"nms": False}))
    levels = [4, 1, 1, 1, 1]
    num_points = sum(levels)
    strides = torch.tensor([8, 16, 32, 64, 128])
    point_strides = torch.cat([torch.full((n,), int(s)) for n, s in zip(levels, strides)])
    scores = torch.zeros(1, num_points, 3)
    scores[0, 0, 1], scores[0, 4, 2], scores[0, 1, 0] = 0.9, 0.6, 0.04  # 0.04 < 0.05: dropped
    points = torch.zeros(num_points, 2)
    points[0], points[4] = torch.tensor([20.0, 20.0]), torch.tensor([40.0, 40.0])
    ltrb = torch.full((1, num_points, 4), 1.5) * point_strides[None, :, None]  # 1.5 strides each side
    det = model.inference({"scores": scores, "ltrb": ltrb, "points": points, "level_sizes": levels}, (64, 64))[0]
    assert det["scores"].tolist() == pytest.approx([0.9, 0.6])  # no centerness, no square root
    assert det["labels"].tolist() == [1, 2]
    assert det["boxes"].tolist() == [[8.0, 8.0, 32.0, 32.0], [16.0, 16.0, 64.0, 64.0]]  # 12 px, 24 px sides
    outputs = model.forward_head(model.neck(model.backbone(torch.rand(1, 3, 64, 64))))
    torch.testing.assert_close(outputs["ltrb"], integral(outputs["dist_logits"]) * outputs["point_strides"][None, :, None])
