import pytest
import torch

from anchorless.detectors.postprocess import LevelwisePostprocess


def _two_levels_of_three_candidates():
    """Level 0: locations 0-2, level 1: locations 3-5; one class; each box 4 px around its point."""
    probs = torch.tensor([0.9, 0.5, 0.3, 0.8, 0.7, 0.6]).view(1, 6, 1)  # (B, R, C)
    points = torch.tensor([[10.0, 10.0], [30, 10], [50, 10], [10, 40], [30, 40], [50, 40]])  # (R, 2)
    ltrb = torch.full((1, 6, 4), 4.0)  # (B, R, 4)
    return probs, ltrb, points, [3, 3]


def test_candidates_are_limited_per_level_before_they_meet_across_levels():
    probs, ltrb, points, levels = _two_levels_of_three_candidates()
    post = LevelwisePostprocess(nms=False, score_threshold=0.0, pre_nms_topk=2)
    (det,) = post(probs, ltrb, points, levels, (64, 64))
    # The best two of each level: level 0's 0.5 stays, level 1's 0.6 (its third) goes.
    assert det["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.5])
    assert det["boxes"][0].tolist() == [6.0, 6.0, 14.0, 14.0]  # decoded from point and distances


def test_the_threshold_applies_to_the_class_probability_and_a_quality_gives_the_geometric_mean():
    probs, ltrb, points, levels = _two_levels_of_three_candidates()
    quality = torch.full((1, 6), 0.25)
    post = LevelwisePostprocess(nms=False, score_threshold=0.55)
    (plain,) = post(probs, ltrb, points, levels, (64, 64))
    (weighted,) = post(probs, ltrb, points, levels, (64, 64), quality=quality)
    assert plain["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])  # no quality: the probability itself
    assert weighted["scores"].tolist() == pytest.approx([(p * 0.25) ** 0.5 for p in (0.9, 0.8, 0.7, 0.6)])


def test_decoded_boxes_are_clipped_to_the_image():
    probs, ltrb, points, levels = _two_levels_of_three_candidates()
    (det,) = LevelwisePostprocess(nms=False, score_threshold=0.0, topk=6)(probs, ltrb * 4, points, levels, (48, 56))
    assert (det["boxes"][:, 0::2] >= 0).all() and (det["boxes"][:, 0::2] <= 56).all()
    assert (det["boxes"][:, 1::2] >= 0).all() and (det["boxes"][:, 1::2] <= 48).all()
