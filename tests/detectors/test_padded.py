"""predict_padded: the batch-wide, fixed-shape decoding a deployment graph runs, equal to predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anchorless.detectors import DETECTORS, build_detector

from .lite_configs import TINY_LITE

PYRAMID = {"backbone": {"depth": 18}, "neck": {"out_channels": 32}, "head": {"num_convs": 1}}
KEYPOINT = {"backbone": {"depth": 18, "upsample_channels": [32, 32, 32]}, "head": {"channels": 32, "pool_channels": 32}}
SMALL = {
    "onenet": {"neck": {"channels": [32, 32, 32]}},
    "centernet": {"neck": {"channels": [32, 32, 32]}},
    "cornernet": KEYPOINT,
    "centernet_triplets": KEYPOINT,
    "cornernet_squeeze": TINY_LITE["cornernet_squeeze"],
}
# Two-step inference whose crops depend on the image: refused, with the reason (its own tests).
NO_GRAPH = {"cornernet_saccade"}


def _detector(name: str, nms: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"name": name, "num_classes": 3, **SMALL.get(name, PYRAMID), "postprocess": {"nms": nms, "score_threshold": 0.0}}
    model = build_detector(cfg).eval()
    with torch.no_grad():  # off the initial values, so scores spread and NMS has work to do
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def _canonical(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """An order best first in which equal scores come in a fixed order (by label, then box):
    corner pooling makes plateaus, so two corners can score exactly alike, and which of two
    tied detections is listed first is the sort's choice, not the decoding's."""
    keys = [boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels.double(), -scores.double().round(decimals=6)]
    return torch.from_numpy(np.lexsort([key.numpy() for key in keys]))


@pytest.mark.parametrize("nms", ["none", "hard", "soft_gaussian"])
@pytest.mark.parametrize("name", sorted(set(DETECTORS) - NO_GRAPH))
def test_padded_detections_are_predicts_in_order_then_score_zero(name, nms):
    model = _detector(name, nms)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    eager, padded = model.predict(images), model.predict_padded(images)
    k = model.postprocess.topk
    assert padded["boxes"].shape == (3, k, 4) and padded["scores"].shape == padded["labels"].shape == (3, k)
    for image, want in enumerate(eager):
        n = int((want["scores"] > 0).sum())  # a heatmap's empty cells score 0: padding either way
        got = {key: padded[key][image, :n] for key in ("boxes", "scores", "labels")}
        want = {key: want[key][:n] for key in ("boxes", "scores", "labels")}
        got_order, want_order = _canonical(**got), _canonical(**want)
        torch.testing.assert_close(got["scores"][got_order], want["scores"][want_order], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["labels"][got_order], want["labels"][want_order])
        torch.testing.assert_close(got["boxes"][got_order], want["boxes"][want_order], rtol=0, atol=1e-4)
        torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-6)  # best first, both
        assert (padded["scores"][image, n:] == 0).all()


def test_nms_kinds_without_a_graph_form_are_refused_by_name():
    model = _detector("fcos", "matrix")
    with pytest.raises(NotImplementedError, match="postprocess.nms='matrix' has no batch-wide graph form"):
        model.predict_padded(torch.rand(2, 3, 64, 64))
