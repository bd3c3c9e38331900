import pytest
import torch

from anchorless.detectors.postprocess import Postprocess


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
