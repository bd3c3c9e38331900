import pytest
import torch

from anchorless.detectors import build_detector
from anchorless.detectors.necks import DeconvUpsampler

from ..conftest import small_config


def test_deformable_neck_option_builds_and_trains():
    model = build_detector(small_config("centernet", neck={"deform": True, "channels": [32, 32, 64]}))
    losses = model(torch.rand(1, 3, 64, 64), [{"boxes": torch.tensor([[8.0, 8, 40, 50]]), "labels": torch.tensor([1])}])
    losses["loss"].backward()
    assert model.neck.layers[0].offset_mask.weight.grad is not None


def test_neck_skips_feed_c2_to_c4_into_the_upsampler_and_change_its_output():
    torch.manual_seed(0)
    plain = build_detector(small_config("onenet"))
    torch.manual_seed(0)
    skipped = build_detector(small_config("onenet", neck={"skips": True}))
    images = torch.rand(1, 3, 64, 64)
    features = skipped.backbone((images - skipped.pixel_mean) / skipped.pixel_std)
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]  # C2..C5 of a 64-pixel image
    # Same weights where both have them: the skips' projections are the only difference.
    missing, unexpected = skipped.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith("neck.skips.") for key in missing)
    (out_plain,), (out_skipped,) = plain.neck(features), skipped.neck(features)
    assert out_plain.shape == out_skipped.shape == (1, 64, 16, 16)
    assert not torch.allclose(out_plain, out_skipped)
    skipped(images, [{"boxes": torch.tensor([[8.0, 8, 40, 50]]), "labels": torch.tensor([1])}])["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in skipped.neck.skips.parameters())


def test_neck_skips_without_the_channels_of_c2_to_c5_is_a_clear_error():
    with pytest.raises(ValueError, match="skips need the channels of C2..C5"):
        DeconvUpsampler(512, skips=True)
