import pytest
import torch

from anchorless.detectors.postprocess import topk_dense


def test_topk_dense_ranks_every_location_class_pair_without_nms():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.85, 0.0]])  # (R=3, C=2)
    top, points, labels = topk_dense(scores, 3)
    assert top.tolist() == pytest.approx([0.9, 0.85, 0.8])
    assert points.tolist() == [0, 2, 1] and labels.tolist() == [1, 0, 0]
