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


def test_centernet_size_scale_multiplies_the_size_branch_only():
    from anchorless.detectors.centernet import CenterNetHead

    torch.manual_seed(0)
    plain = CenterNetHead(16, 3)
    scaled = CenterNetHead(16, 3, size_scale=8.0)
    scaled.load_state_dict(plain.state_dict())  # same weights: only the scale differs
    features = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        (heat_p, size_p, off_p), (heat_s, size_s, off_s) = plain(features), scaled(features)
    torch.testing.assert_close(size_s, 8.0 * size_p)
    torch.testing.assert_close(heat_s, heat_p)
    torch.testing.assert_close(off_s, off_p)
    assert build_detector(small_config("centernet", head={"size_scale": 8.0})).head.size_scale == 8.0
    with pytest.raises(ValueError, match="size_scale must be > 0"):
        CenterNetHead(16, 3, size_scale=0.0)


class _FixedHead(torch.nn.Module):
    """A head that ignores its input and returns fixed (heatmap logits, size, offset)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, features):
        size = torch.full((1, 2, *self.logits.shape[-2:]), 2.0)
        return self.logits, size, torch.zeros_like(size)


def test_two_adjacent_confident_logits_give_one_detection_not_two():
    # Clamped to 1 - 1e-4 at inference, sigmoid(11) and sigmoid(10) were equal, both survived
    # the 3x3 max-pool and one object gave two confident boxes; the clamp is the loss's alone.
    model = build_detector(small_config("centernet")).eval()
    logits = torch.full((1, 3, 8, 8), -10.0)
    logits[0, 1, 3, 5], logits[0, 1, 3, 6] = 11.0, 10.0
    model.head = _FixedHead(logits)
    for detections in (model.predict(torch.rand(1, 3, 32, 32))[0], model.predict_padded(torch.rand(1, 3, 32, 32))):
        scores = detections["scores"].flatten()
        assert int((scores > 0.5).sum()) == 1
        assert scores.max().item() == pytest.approx(torch.sigmoid(torch.tensor(11.0)).item())


def test_the_loss_still_clamps_so_a_saturated_heatmap_stays_finite():
    model = build_detector(small_config("centernet")).eval()  # BatchNorm on a 1 x 1 map needs eval
    logits = torch.full((1, 3, 8, 8), -200.0, requires_grad=True)  # sigmoid underflows to 0
    model.head = _FixedHead(logits)
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1])}
    losses = model(torch.rand(1, 3, 32, 32), [target])
    # the one peak at probability 1e-4 (clamped): -(1 - 1e-4)^2 log(1e-4), over one peak
    want = -torch.log(torch.tensor(1e-4)).item() * (1 - 1e-4) ** 2
    assert torch.isfinite(losses["loss"]) and losses["loss_heatmap"].item() == pytest.approx(want, rel=1e-3)
