"""The NMS family on hand-made boxes: keep sets and rescored scores computed by hand."""

import math

import pytest
import torch
from torchvision.ops import nms as torchvision_nms

from anchorless.detectors.postprocess import NMS_KINDS, Postprocess, nms, soft_nms

# A chain along x, one class: b0 overlaps b1 and b1 overlaps b2 beyond 0.5, b0 and b2 do not.
#   IoU(b0, b1) = IoU(b1, b2) = 70 / 130 = 7/13 (0.538); IoU(b0, b2) = 40 / 160 = 0.25.
CHAIN = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 0.0, 13.0, 10.0], [6.0, 0.0, 16.0, 10.0]])
CHAIN_SCORES = torch.tensor([0.9, 0.8, 0.7])
ONE_CLASS = torch.zeros(3, dtype=torch.long)
NEAR = 7 / 13  # IoU of neighbours in the chain
FAR = 0.25  # IoU of the chain's ends
# DIoU's rho^2 / c^2 of the neighbours (centres 3 apart, enclosing box 13 x 10) and of the ends.
R_NEAR, R_FAR = 9 / (13**2 + 10**2), 36 / (16**2 + 10**2)


def _run(kind, **settings):
    return nms(CHAIN, CHAIN_SCORES, ONE_CLASS, kind, **settings)


def test_hard_nms_keeps_the_chain_ends_and_fast_nms_only_the_best():
    assert _run("hard", iou_threshold=0.5).keep.tolist() == [0, 2]
    # Fast NMS lets the suppressed b1 still suppress b2.
    assert _run("fast", iou_threshold=0.5).keep.tolist() == [0]


def test_cluster_nms_gives_greedy_nms_and_its_first_step_is_fast_nms():
    assert _run("cluster", iou_threshold=0.5).keep.tolist() == [0, 2]
    assert _run("cluster", iou_threshold=0.5, max_iterations=1).keep.tolist() == [0]
    kept = _run("cluster", iou_threshold=0.5)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7]) and torch.equal(kept.boxes, CHAIN[[0, 2]])


@pytest.mark.parametrize("seed", range(5))
def test_cluster_nms_equals_torchvision_nms_on_random_crowded_boxes(seed):
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(60, 2, generator=generator) * 40
    boxes = torch.cat([corners, corners + 10 + torch.rand(60, 2, generator=generator) * 20], dim=1)
    scores = torch.rand(60, generator=generator)
    labels = torch.randint(0, 2, (60,), generator=generator)
    for threshold in (0.3, 0.5, 0.7):
        # torchvision's plain nms, class by class, is the reference count.
        expected = sum(len(torchvision_nms(boxes[labels == c], scores[labels == c], threshold)) for c in (0, 1))
        cluster = nms(boxes, scores, labels, "cluster", iou_threshold=threshold).keep
        hard = nms(boxes, scores, labels, "hard", iou_threshold=threshold).keep
        assert sorted(cluster.tolist()) == sorted(hard.tolist())
        assert len(cluster) == expected
        fast = nms(boxes, scores, labels, "fast", iou_threshold=threshold).keep
        assert set(fast.tolist()) <= set(cluster.tolist())  # Fast NMS removes at least as much


def test_soft_nms_linear_decays_only_overlaps_above_the_threshold_and_keeps_every_box():
    kept = _run("soft_linear", iou_threshold=0.3)
    # b0 first; b1 (IoU 7/13 > 0.3) -> 0.8 (6/13); b2 (0.25) untouched, picked next, then
    # decays b1 again: 0.8 (6/13)^2.
    assert kept.keep.tolist() == [0, 2, 1]
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * (6 / 13) ** 2], rel=1e-5)


def test_soft_nms_gaussian_decays_by_exp_of_minus_iou_squared_over_sigma():
    kept = _run("soft_gaussian", sigma=0.5)
    b1_once, b2 = 0.8 * math.exp(-(NEAR**2) / 0.5), 0.7 * math.exp(-(FAR**2) / 0.5)  # 0.448, 0.618
    assert kept.keep.tolist() == [0, 2, 1]
    assert kept.scores.tolist() == pytest.approx([0.9, b2, b1_once * math.exp(-(NEAR**2) / 0.5)], rel=1e-5)


def test_soft_nms_drops_a_decayed_box_below_the_minimum_score_and_is_public_for_cornernet():
    kept = soft_nms(CHAIN, CHAIN_SCORES, ONE_CLASS, method="linear", iou_threshold=0.3, score_threshold=0.2)
    assert kept.keep.tolist() == [0, 2]  # b1 ends at 0.17 < 0.2
    untouched = soft_nms(CHAIN[:1], torch.tensor([0.0001]), ONE_CLASS[:1])
    assert untouched.keep.tolist() == [0]  # never decayed: kept, as the official code


def test_matrix_nms_decays_by_the_worst_overlap_compensated_by_the_suppressor_own_overlap():
    kept = _run("matrix", sigma=0.5)
    # b1: min over better boxes of exp(-(IoU^2 - comp^2) / sigma): only b0 (comp 0).
    # b2: b0 gives exp(-0.25^2 / 0.5); b1 gives exp(-(NEAR^2 - NEAR^2) / 0.5) = 1.
    b1, b2 = 0.8 * math.exp(-(NEAR**2) / 0.5), 0.7 * math.exp(-(FAR**2) / 0.5)
    assert kept.keep.tolist() == [0, 2, 1]
    assert kept.scores.tolist() == pytest.approx([0.9, b2, b1], rel=1e-5)
    assert _run("matrix", min_score=0.5).keep.tolist() == [0, 2]  # b1 (0.448) below 0.5


def test_cluster_spm_penalises_every_box_by_the_kept_boxes_overlapping_it():
    kept = _run("cluster_spm", iou_threshold=0.5)
    # Kept: b0 and b2; only b0 overlaps worse boxes. sigma 0.2, min score 0.01.
    b1, b2 = 0.8 * math.exp(-(NEAR**2) / 0.2), 0.7 * math.exp(-(FAR**2) / 0.2)  # 0.188, 0.512
    assert kept.keep.tolist() == [0, 2, 1]
    assert kept.scores.tolist() == pytest.approx([0.9, b2, b1], rel=1e-5)


def test_cluster_diou_softens_the_penalty_by_the_centre_distance():
    kept = _run("cluster_diou", iou_threshold=0.5, beta=0.6)
    b1 = 0.8 * min(math.exp(-(NEAR**2) / 0.2) + R_NEAR**0.6, 1)
    b2 = 0.7 * min(math.exp(-(FAR**2) / 0.2) + R_FAR**0.6, 1)
    assert kept.keep.tolist() == [0, 2, 1]
    assert kept.scores.tolist() == pytest.approx([0.9, b2, b1], rel=1e-5)


def test_cluster_weighted_averages_a_kept_box_with_the_boxes_it_overlaps_beyond_0_8():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 11.0]])  # IoU 100 / 110
    kept = nms(boxes, torch.tensor([0.9, 0.6]), torch.zeros(2, dtype=torch.long), "cluster_weighted", iou_threshold=0.5)
    iou, rho2_over_c2 = 100 / 110, 0.25 / (10**2 + 11**2)
    s1 = 0.6 * min(math.exp(-(iou**2) / 0.2) + rho2_over_c2**0.6, 1)  # 0.020 > 0.01: b1 stays
    assert kept.scores.tolist() == pytest.approx([0.9, s1], rel=1e-5)
    bottom = (0.9 * 10 + iou * s1 * 11) / (0.9 + iou * s1)
    assert kept.boxes[0].tolist() == pytest.approx([0.0, 0.0, 10.0, bottom], rel=1e-5)
    assert kept.boxes[1].tolist() == [0.0, 0.0, 10.0, 11.0]  # suppressed: averages nothing


def test_diou_nms_keeps_a_box_whose_centre_is_far_from_the_better_one():
    # IoU - R^beta: neighbours 7/13 - R_NEAR^0.6 = 0.408, ends 0.25 - R_FAR^0.6 < 0.
    assert _run("diou", iou_threshold=0.5, beta=0.6).keep.tolist() == [0, 1, 2]  # hard NMS keeps [0, 2]
    assert _run("diou", iou_threshold=0.4, beta=0.6).keep.tolist() == [0, 2]
    assert NEAR - R_NEAR**0.6 == pytest.approx(0.408, abs=1e-3)
    # Concentric boxes: no distance term, DIoU-NMS suppresses as NMS does.
    concentric = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 9.0, 9.0]])  # IoU 0.64
    kept = nms(concentric, torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.long), "diou", iou_threshold=0.5)
    assert kept.keep.tolist() == [0]


@pytest.mark.parametrize("kind", NMS_KINDS)
def test_every_kind_is_class_aware_and_takes_empty_input(kind):
    same_box = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)
    kept = nms(same_box, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), kind)
    assert kept.keep.tolist() == [0, 1] and kept.scores.tolist() == pytest.approx([0.9, 0.8])  # another class: untouched
    empty = nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), kind)
    assert empty.keep.numel() == 0 and empty.boxes.shape == (0, 4)


def test_postprocess_takes_every_kind_and_the_old_booleans():
    assert Postprocess(nms=True).nms == "hard" and Postprocess(nms=False).nms == "none"
    labels = torch.zeros(3, dtype=torch.long)
    chain_soft = Postprocess(nms="soft_linear", nms_iou=0.3).select(CHAIN, CHAIN_SCORES, labels)
    assert chain_soft["scores"].tolist() == pytest.approx([0.9, 0.7, 0.8 * (6 / 13) ** 2], rel=1e-5)
    assert Postprocess(nms="cluster", nms_iou=0.5, topk=1).select(CHAIN, CHAIN_SCORES, labels)["boxes"].tolist() == [
        [0.0, 0.0, 10.0, 10.0]
    ]
    with pytest.raises(ValueError, match="nms must be true, false or one of none, hard"):
        Postprocess(nms="greedy")
    with pytest.raises(ValueError, match="unknown NMS kind 'greedy'"):
        nms(CHAIN, CHAIN_SCORES, labels, "greedy")


@pytest.mark.parametrize("kind", ["soft_linear", "soft_gaussian"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_wide_soft_nms_keeps_the_same_boxes_and_rescored_scores_as_per_image(kind, seed):
    """The fixed-shape form a deployment graph runs: per image, soft_nms's first K picks in its
    order with its rescored scores; padding (score 0) never picked before a real box, and the
    images of a batch never touch each other (their boxes are the same coordinates)."""
    generator = torch.Generator().manual_seed(seed)
    batch, num, topk = 3, 60, 40
    corners = torch.rand(batch, num, 2, generator=generator) * 40
    boxes = torch.cat([corners, corners + 8 + torch.rand(batch, num, 2, generator=generator) * 20], dim=-1)
    scores = torch.rand(batch, num, generator=generator) * (torch.rand(batch, num, generator=generator) > 0.2)
    labels = torch.randint(0, 3, (batch, num), generator=generator)
    post = Postprocess(nms=kind, topk=topk, nms_iou=0.4, nms_min_score=0.05)
    padded = post.select_padded(boxes, scores, labels)
    assert padded["boxes"].shape == (batch, topk, 4) and padded["scores"].shape == padded["labels"].shape == (batch, topk)
    for image in range(batch):
        real = scores[image] > 0
        want = post.select(boxes[image][real], scores[image][real], labels[image][real])
        n = len(want["scores"])
        assert n > 10
        torch.testing.assert_close(padded["scores"][image, :n], want["scores"], rtol=0, atol=0)
        torch.testing.assert_close(padded["boxes"][image, :n], want["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(padded["labels"][image, :n], want["labels"])
        assert not padded["scores"][image, n:].any()  # the rest is padding
