import pytest
import torch

from anchorless.detectors import build_detector
from anchorless.detectors.postprocess import Postprocess, heatmap_peaks, topk_dense, topk_heatmap

from .conftest import small_config


def test_topk_dense_ranks_every_location_class_pair_without_nms():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.85, 0.0]])  # (R=3, C=2)
    top, points, labels = topk_dense(scores, 3)
    assert top.tolist() == pytest.approx([0.9, 0.85, 0.8])
    assert points.tolist() == [0, 2, 1] and labels.tolist() == [1, 0, 0]


def test_heatmap_peaks_keep_only_3x3_local_maxima():
    heat = torch.zeros(1, 1, 5, 5)
    heat[0, 0, 1, 1] = 0.9
    heat[0, 0, 1, 2] = 0.7  # neighbour of a higher cell: suppressed
    heat[0, 0, 3, 4] = 0.6  # its own peak
    peaks = heatmap_peaks(heat)
    assert torch.nonzero(peaks[0, 0]).tolist() == [[1, 1], [3, 4]]
    scores, labels, ys, xs = topk_heatmap(peaks[0], 2)
    assert scores.tolist() == pytest.approx([0.9, 0.6]) and ys.tolist() == [1, 3] and xs.tolist() == [1, 4]


def test_postprocess_nms_switch_removes_same_class_duplicates_only_when_on():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.5, 0.0, 10.5, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([0, 0, 1])
    off = Postprocess(nms=False).finalize(boxes, scores, labels)
    on = Postprocess(nms=True, nms_iou=0.6).finalize(boxes, scores, labels)
    assert off["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert on["scores"].tolist() == pytest.approx([0.9, 0.7])  # the other class survives
    thresholded = Postprocess(score_threshold=0.75, topk=1).finalize(boxes, scores, labels)
    assert thresholded["scores"].tolist() == pytest.approx([0.9])


def test_centernet_decodes_a_constructed_peak_size_and_offset_into_a_box():
    model = build_detector(small_config("centernet"))
    heat = torch.full((1, 3, 8, 8), 1e-4)
    heat[0, 1, 3, 5] = 0.9
    size = torch.zeros(1, 2, 8, 8)
    size[0, :, 3, 5] = torch.tensor([4.0, 2.0])  # w, h in cells
    offset = torch.zeros(1, 2, 8, 8)
    offset[0, :, 3, 5] = torch.tensor([0.5, 0.25])
    det = model.inference({"heatmap": heat, "size": size, "offset": offset}, (32, 32))[0]
    # centre ((5 + 0.5) * 4, (3 + 0.25) * 4) = (22, 13); size (16, 8)
    assert det["boxes"][0].tolist() == pytest.approx([14.0, 9.0, 30.0, 17.0])
    assert det["scores"][0].item() == pytest.approx(0.9) and det["labels"][0].item() == 1
    assert len(det["scores"]) == 100


def test_onenet_decodes_location_plus_minus_ltrb_and_clips_to_the_image():
    model = build_detector(small_config("onenet", postprocess={"topk": 2}))
    logits = torch.full((1, 4, 3), -10.0)  # R = 4 locations, C = 3
    logits[0, 2, 0], logits[0, 1, 2] = 3.0, 1.0
    boxes = torch.tensor([[[0.0, 0, 4, 4], [2, 2, 40, 6], [4, 4, 12, 10], [0, 0, 1, 1]]])
    det = model.inference({"heads": [{"cls_logits": logits, "boxes": boxes}]}, (32, 32))[0]
    assert det["labels"].tolist() == [0, 2]
    assert det["boxes"].tolist() == [[4.0, 4.0, 12.0, 10.0], [2.0, 2.0, 32.0, 6.0]]
    assert det["scores"].tolist() == pytest.approx(torch.sigmoid(torch.tensor([3.0, 1.0])).tolist())


def test_fcos_thresholds_on_class_probability_scores_by_sqrt_of_cls_times_centerness_and_applies_nms():
    model = build_detector(small_config("fcos"))
    levels = [4, 1, 1, 1, 1]
    num_points = sum(levels)
    cls = torch.full((1, num_points, 3), -10.0)
    ctr = torch.full((1, num_points), 0.0)
    boxes = torch.zeros(1, num_points, 4)
    # Two near-identical class-0 boxes on level 0 and one on level 1; one low-prob candidate.
    cls[0, 0, 0], cls[0, 1, 0], cls[0, 4, 0], cls[0, 2, 1] = 2.0, 1.0, 0.0, -3.5  # p(-3.5) = 0.029 < 0.05
    boxes[0, 0] = torch.tensor([0.0, 0, 10, 10])
    boxes[0, 1] = torch.tensor([0.5, 0, 10.5, 10])
    boxes[0, 4] = torch.tensor([20.0, 20, 30, 30])
    det = model.inference(
        {"cls_logits": cls, "centerness": ctr, "boxes": boxes, "level_sizes": levels}, (64, 64)
    )[0]
    p = torch.sigmoid(torch.tensor([2.0, 0.0]))
    expected = torch.sqrt(p * 0.5)  # centerness logit 0 -> 0.5
    assert det["scores"].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert det["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]
