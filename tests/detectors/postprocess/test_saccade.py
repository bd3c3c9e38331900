"""CornerNet-Saccade's location step on hand-made attention maps and boxes, and the crops:
zoom, cut and map back to the pixel."""

from __future__ import annotations

import pytest
import torch

from anchorless.detectors.postprocess.saccade import (
    Locations,
    attention_locations,
    box_locations,
    crop_origins,
    crop_to_image,
    select_locations,
    touches_border,
    view_locations,
    zoom_crops,
)


def _locations(rows: list[tuple[int, float, float, float, float, bool]]) -> Locations:
    """(image, x, y, zoom, score, from_box) rows."""
    image, xs, ys, zooms, scores, boxed = zip(*rows)
    return Locations(
        torch.tensor(image), torch.tensor([xs, ys]).T.float(), torch.tensor(zooms), torch.tensor(scores), torch.tensor(boxed)
    )


def test_views_centre_each_image_downsized_to_each_initial_size():
    views = view_locations(2, (128, 256), (255, 192))
    assert views.image.tolist() == [0, 0, 1, 1]
    assert views.zooms.tolist() == pytest.approx([255 / 256, 0.75, 255 / 256, 0.75])
    assert views.centres.tolist() == [[128.0, 64.0]] * 4
    # The 192 view on a 256 canvas: the image's zoomed 192 x 96 sits in the middle.
    assert crop_origins(views.centres[1:2], views.zooms[1:2], 256).tolist() == [[-32.0, -80.0]]


def _hand_made_attention() -> list[torch.Tensor]:
    small, medium, large = torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 16, 16)
    small[0, 0, 20, 10] = 0.9  # a peak at row 20, column 10
    small[0, 0, 20, 11] = 0.8  # its neighbour: not a peak
    small[0, 0, 40, 40] = 0.29  # under the threshold
    small[0, 0, 2, 2] = 0.5  # above the image (the view's padding)
    medium[0, 0, 10, 5] = 0.6
    large[0, 0, 8, 8] = 0.31
    return [small, medium, large]


def test_attention_peaks_above_the_threshold_become_locations_zoomed_by_their_size_class():
    # One 128 x 256 image seen whole at zoom 1 on a 256 canvas: rows 64..192 hold the image.
    views = view_locations(1, (128, 256), (256,))
    origins = crop_origins(views.centres, views.zooms, 256)
    assert origins.tolist() == [[0.0, -64.0]]
    found = attention_locations(_hand_made_attention(), (4, 8, 16), views, origins, (128, 256))
    # Cell centres: small (10.5, 20.5) * 4 = (42, 82); medium (5.5, 10.5) * 8 = (44, 84);
    # large (8.5, 8.5) * 16 = (136, 136); minus the view's 64-row offset.
    assert found.centres.tolist() == [[42.0, 18.0], [44.0, 20.0], [136.0, 72.0]]
    assert found.zooms.tolist() == [4.0, 2.0, 1.0]  # s_s, s_m, s_l times the view's zoom 1
    assert found.scores.tolist() == pytest.approx([0.9, 0.6, 0.31])
    assert found.image.tolist() == [0, 0, 0] and not found.from_box.any()


def test_attention_locations_asking_to_zoom_past_the_limit_are_dropped():
    views = view_locations(1, (128, 256), (256,))
    origins = crop_origins(views.centres, views.zooms, 256)
    found = attention_locations(_hand_made_attention(), (4, 8, 16), views, origins, (128, 256), max_zoom=3.0)
    assert found.zooms.tolist() == [2.0, 1.0]


def test_coarse_boxes_become_locations_zoomed_to_their_class_target_side():
    boxes = torch.tensor([[0.0, 0, 20, 10], [0, 0, 50, 40], [0, 0, 200, 100], [0, 0, 30, 30], [10, 10, 12, 12]])
    scores = torch.tensor([0.9, 0.6, 0.55, 0.4, 0.95])
    found = box_locations(boxes, scores, torch.tensor([0, 0, 1, 1, 1]))
    assert found.zooms.tolist() == pytest.approx([24 / 20, 64 / 50, 192 / 200, 4.0])  # the 2-px box is capped at 4
    assert found.centres.tolist() == [[10.0, 5.0], [25.0, 20.0], [100.0, 50.0], [11.0, 11.0]]
    assert found.image.tolist() == [0, 0, 1, 1] and found.from_box.all()  # the 0.4 box stays below 0.5


def test_box_locations_rank_first_near_duplicates_of_a_similar_zoom_are_dropped_and_k_max_cuts():
    locations = _locations([
        (0, 100, 100, 2.0, 0.9, False),   # A: covered by B (4 and 3 px apart, 16 / 2 = 8 allowed)
        (0, 104, 103, 2.0, 0.6, True),    # B: box-derived, first despite its score
        (0, 100, 130, 2.0, 0.8, False),   # C: 27 px below B, kept (one shared column is not "close")
        (0, 104, 103, 4.0, 0.7, False),   # D: B's place at twice the zoom, kept
        (0, 101, 101, 2.2, 0.5, False),   # E: zoom 2.2 / 2 within the 0.2 tolerance: covered
        (1, 104, 103, 2.0, 0.1, False),   # image 1's only location, on its own
    ])  # fmt: skip
    chosen = select_locations(locations)
    assert chosen.image.tolist() == [0, 0, 0, 1]
    assert chosen.scores.tolist() == pytest.approx([0.6, 0.8, 0.7, 0.1])  # B, C, D; image 1
    assert select_locations(locations, k_max=2).scores.tolist() == pytest.approx([0.6, 0.8, 0.1])  # per image
    assert select_locations(locations, distance=60.0).scores.tolist() == pytest.approx([0.6, 0.7, 0.1])  # 30 px: C too


def test_a_box_in_a_zoomed_crop_maps_back_to_the_box_in_the_image_to_the_pixel():
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, 20:30, 10:40] = 1.0  # the box [10, 20, 40, 30]
    where = _locations([(0, 25.0, 25.0, 2.0, 1.0, True)])
    crops, origins = zoom_crops(image, where, 64)
    assert origins.tolist() == [[18.0, 18.0]]  # 25 * 2 - 32
    ys, xs = torch.nonzero(crops[0, 0] > 0.5, as_tuple=True)
    in_crop = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float()  # pixel edges
    assert in_crop.tolist() == [[2.0, 22.0, 62.0, 42.0]]  # twice the box, less the origin
    assert crop_to_image(in_crop[None], origins, where.zooms).tolist() == [[[10.0, 20.0, 40.0, 30.0]]]


def test_at_zoom_one_a_crop_copies_the_images_pixels_and_outside_holds_the_fill():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 48, 64)
    where = _locations([(1, 32.0, 40.0, 1.0, 1.0, False), (0, 0.0, 0.0, 1.0, 1.0, False)])
    crops, origins = zoom_crops(images, where, 32, fill=torch.tensor([0.25, 0.5, 0.75]))
    assert origins.tolist() == [[16.0, 24.0], [-16.0, -16.0]]
    torch.testing.assert_close(crops[0, :, :24], images[1, :, 24:48, 16:48], rtol=0, atol=1e-5)  # the image's last 24 rows
    assert (crops[0, :, 24:] - torch.tensor([0.25, 0.5, 0.75]).view(3, 1, 1)).abs().max() < 1e-6  # below the image
    torch.testing.assert_close(crops[1, :, 16:, 16:], images[0, :, :16, :16], rtol=0, atol=1e-5)  # the top-left corner
    assert (crops[1, 0, :16] - 0.25).abs().max() < 1e-6  # above the image


def test_boxes_touching_a_crop_border_are_flagged():
    boxes = torch.tensor([[[0.5, 10, 20, 20], [5, 5, 250, 250], [5, 5, 253, 100], [10, 3.9, 20, 20]]])
    assert touches_border(boxes, 256, 4.0).tolist() == [[True, False, True, True]]
