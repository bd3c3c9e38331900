import pytest
import torch

from anchorless.detectors import build_detector

from .conftest import small_config


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
