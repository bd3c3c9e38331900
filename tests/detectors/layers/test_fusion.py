"""Folding BatchNorm into convolutions for inference: same detections, fewer layers."""

import pytest
import torch

from anchorless.detectors import build_detector
from anchorless.detectors.layers import count_batchnorms, fold_batchnorm

from ..conftest import small_config


def _with_trained_looking_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh BatchNorms are the identity; give them statistics and affine terms far from it."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(channels, generator=generator) * 2 + 0.1)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "config, batchnorms_left",
    [
        (small_config("onenet"), 0),  # ResNet and the upsampling neck: every BatchNorm folds
        (small_config("centernet"), 0),
        (small_config("fcos"), 0),  # the ResNet folds; its head's GroupNorms stay, as they must
        (small_config("onenet", backbone={"norm": "frozen_bn"}), 0),
        (small_config("cornernet", head={"channels": 32, "pool_channels": 32}), 0),  # and the pooling modules
        (small_config("centernet_triplets", head={"channels": 32, "pool_channels": 32}), 0),
    ],
    ids=["onenet", "centernet", "fcos", "onenet-frozen-bn", "cornernet", "centernet_triplets"],
)
def test_folded_model_detects_the_same_boxes_without_batchnorm(config, batchnorms_left):
    torch.manual_seed(0)
    model = _with_trained_looking_statistics(build_detector(config))
    before = count_batchnorms(model)
    folded = fold_batchnorm(model)
    assert before > 0 and count_batchnorms(folded) == batchnorms_left
    assert count_batchnorms(model) == before  # the original is untouched
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        reference_features = model.neck(model.backbone((images - model.pixel_mean) / model.pixel_std))
        folded_features = folded.neck(folded.backbone((images - folded.pixel_mean) / folded.pixel_std))
    for reference, got in zip(_as_list(reference_features), _as_list(folded_features)):
        assert torch.allclose(reference, got, rtol=1e-3, atol=1e-3 * reference.abs().max().item())
    expected, detections = model.predict(images), folded.predict(images)
    for want, got in zip(expected, detections):
        # Top-scoring detections agree; float rounding may reorder near-ties further down.
        assert torch.allclose(want["scores"][:10], got["scores"][:10], atol=1e-3)
        assert torch.allclose(want["boxes"][:10], got["boxes"][:10], atol=0.05)


def test_folding_refuses_a_model_in_training_mode():
    model = build_detector(small_config("onenet"))
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(model.train())


def _as_list(features):
    return features if isinstance(features, (list, tuple)) else [features]
