"""Corner pairing and the central-region check on hand-made heatmaps and embeddings."""

from __future__ import annotations

import pytest
import torch

from anchorless.detectors.postprocess import CornerPostprocess, TripletPostprocess
from anchorless.detectors.postprocess.corners import Candidates, central_regions, filter_by_centers

SIZE, STRIDE = 16, 4  # a 16 x 16 map of a 64 x 64 image


def _maps(with_centres: bool = False) -> dict[str, torch.Tensor]:
    """Two objects: A (class 0) from cell (2, 3) to (10, 12), B (class 1) from (5, 1) to (14, 8);
    A's and B's embeddings are close (0, 0.1 and 0.2, 0.3), so only the class tells them
    apart; and a stray top-left of class 0 at (1, 1) whose embedding (5) is far from A's."""
    maps = {
        "tl_heatmap": torch.zeros(1, 2, SIZE, SIZE),
        "br_heatmap": torch.zeros(1, 2, SIZE, SIZE),
        "tl_embedding": torch.full((1, 1, SIZE, SIZE), -10.0),  # empty cells never pair
        "br_embedding": torch.full((1, 1, SIZE, SIZE), 10.0),
        "tl_offset": torch.zeros(1, 2, SIZE, SIZE),
        "br_offset": torch.zeros(1, 2, SIZE, SIZE),
    }

    def corner(kind: str, label: int, x: int, y: int, score: float, tag: float) -> None:
        maps[f"{kind}_heatmap"][0, label, y, x] = score
        maps[f"{kind}_embedding"][0, 0, y, x] = tag

    corner("tl", 0, 2, 3, 0.9, 0.0)
    corner("br", 0, 10, 12, 0.7, 0.1)
    corner("tl", 1, 5, 1, 0.6, 0.2)
    corner("br", 1, 14, 8, 0.8, 0.3)
    corner("tl", 0, 1, 1, 0.95, 5.0)  # the stray corner
    maps["tl_offset"][0, :, 3, 2] = torch.tensor([0.5, 0.25])
    if with_centres:
        maps["ct_heatmap"] = torch.zeros(1, 2, SIZE, SIZE)
        maps["ct_offset"] = torch.zeros(1, 2, SIZE, SIZE)
        maps["ct_heatmap"][0, 0, 7, 6] = 0.5  # inside A's central region
        maps["ct_heatmap"][0, 0, 4, 9] = 0.9  # in B's central region, but of A's class
    return maps


A = [2.5 * STRIDE, 3.25 * STRIDE, 10 * STRIDE, 12 * STRIDE]
B = [5 * STRIDE, 1 * STRIDE, 14 * STRIDE, 8 * STRIDE]


def test_pairs_two_objects_rejecting_far_embeddings_and_other_classes():
    decoded = CornerPostprocess(nms="none").decode(_maps(), (64, 64), STRIDE)[0]
    assert decoded["boxes"].tolist() == [A, B]
    assert decoded["scores"].tolist() == pytest.approx([(0.9 + 0.7) / 2, (0.6 + 0.8) / 2])
    assert decoded["labels"].tolist() == [0, 1]


def test_an_embedding_threshold_above_the_stray_distance_accepts_the_wrong_pair():
    decoded = CornerPostprocess(nms="none", max_embedding_distance=5.0).decode(_maps(), (64, 64), STRIDE)[0]
    stray = [1 * STRIDE, 1 * STRIDE, 10 * STRIDE, 12 * STRIDE]
    assert decoded["boxes"].tolist()[0] == stray and decoded["scores"][0].item() == pytest.approx((0.95 + 0.7) / 2)


def test_a_bottom_right_left_of_its_top_left_is_no_box():
    maps = _maps()
    maps["br_heatmap"][0, 0, 12, 10] = 0.0
    maps["br_heatmap"][0, 0, 12, 1] = 0.7  # x 1 < the top-left's 2.5
    maps["br_embedding"][0, 0, 12, 1] = 0.1
    decoded = CornerPostprocess(nms="none").decode(maps, (64, 64), STRIDE)[0]
    assert decoded["boxes"].tolist() == [B]


def test_padded_decoding_equals_the_eager_one_then_zeros():
    post = CornerPostprocess(nms="none", topk=5)
    padded = post.decode_padded(_maps(), (64, 64), STRIDE)
    assert padded["boxes"][0, :2].tolist() == [A, B] and padded["scores"][0, 2:].eq(0).all()


def test_central_regions_follow_the_formula_with_n_3_below_150_px_and_5_above():
    boxes = torch.tensor([[0.0, 0.0, 30.0, 60.0], [10.0, 20.0, 210.0, 320.0]])
    regions = central_regions(boxes)
    # small (scale sqrt(1800) < 150), n = 3: ((4 tl + 2 br) / 6, (2 tl + 4 br) / 6)
    assert regions[0].tolist() == pytest.approx([10.0, 20.0, 20.0, 40.0])
    # large (scale 245), n = 5: ((6 tl + 4 br) / 10, (4 tl + 6 br) / 10)
    assert regions[1].tolist() == pytest.approx([90.0, 140.0, 130.0, 200.0])
    n7 = central_regions(boxes[:1], small_n=7)  # ((8 tl + 6 br) / 14, (6 tl + 8 br) / 14)
    assert n7[0].tolist() == pytest.approx([90 / 7, 180 / 7, 120 / 7, 240 / 7])


def test_a_box_without_a_centre_of_its_class_in_its_region_is_dropped_one_with_it_kept():
    candidates = Candidates(
        boxes=torch.tensor([[[0.0, 0.0, 30.0, 60.0], [40.0, 0.0, 70.0, 60.0], [80.0, 0.0, 110.0, 60.0]]]),
        scores=torch.tensor([[0.6, 0.9, 0.8]]),
        labels=torch.tensor([[0, 0, 0]]),
        valid=torch.tensor([[True, True, True]]),
    )
    centers = torch.tensor([[[15.0, 30.0], [75.0, 30.0], [55.0, 30.0]]])  # in box 0; outside all; in box 1
    center_labels = torch.tensor([[0, 0, 1]])  # the centre in box 1 is of another class
    kept = filter_by_centers(candidates, centers, torch.tensor([[0.3, 0.9, 0.9]]), center_labels)
    assert kept.valid.tolist() == [[True, False, False]]
    assert kept.scores[0, 0].item() == pytest.approx((2 * 0.6 + 0.3) / 3)  # mean of the three keypoints
    on_the_edge = torch.tensor([[[10.0, 30.0]]])  # on the region's left edge: not inside
    assert not filter_by_centers(candidates, on_the_edge, torch.tensor([[0.5]]), torch.tensor([[0]])).valid[0, 0]


def test_triplets_keep_the_pair_whose_centre_was_detected():
    post = TripletPostprocess(nms="none", center_topk=2)  # the two centres drawn, not the empty cells
    decoded = post.decode(_maps(with_centres=True), (64, 64), STRIDE)[0]
    assert decoded["boxes"].tolist() == [A]
    assert decoded["scores"].tolist() == pytest.approx([(0.9 + 0.7 + 0.5) / 3])
