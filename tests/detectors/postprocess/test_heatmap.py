import pytest
import torch

from anchorless.detectors.postprocess import heatmap_peaks, topk_heatmap


def test_heatmap_peaks_keep_only_3x3_local_maxima():
    heat = torch.zeros(1, 1, 5, 5)
    heat[0, 0, 1, 1] = 0.9
    heat[0, 0, 1, 2] = 0.7  # neighbour of a higher cell: suppressed
    heat[0, 0, 3, 4] = 0.6  # its own peak
    peaks = heatmap_peaks(heat)
    assert torch.nonzero(peaks[0, 0]).tolist() == [[1, 1], [3, 4]]
    scores, labels, ys, xs = topk_heatmap(peaks[0], 2)
    assert scores.tolist() == pytest.approx([0.9, 0.6]) and ys.tolist() == [1, 3] and xs.tolist() == [1, 4]
