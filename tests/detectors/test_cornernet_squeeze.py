"""CornerNet-Squeeze: the paper's defaults, 1x1 prediction branches, decoding at stride 8."""

from __future__ import annotations

import pytest
import torch

from anchorless.detectors import build_detector, default_detector_config
from anchorless.detectors.backbones import HourglassSqueeze

from .lite_configs import lite_config

TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(lite_config("cornernet_squeeze"))


def test_defaults_are_the_papers_and_the_official_squeeze_configs():
    cfg, cornernet = default_detector_config("cornernet_squeeze"), default_detector_config("cornernet")
    assert cfg["backbone"] == {
        "stacks": 2, "channels": [256, 256, 384, 384, 512], "blocks": [2, 2, 2, 2, 4], "stem_channels": 128,
        "out_channels": 256, "norm": "bn",
    }  # fmt: skip
    assert cfg["head"]["branch_kernel"] == 1 and cornernet["head"]["branch_kernel"] == 3
    assert cfg["loss"] == cornernet["loss"] and cfg["assigner"] == cornernet["assigner"]  # CornerNet's training
    post = cfg["postprocess"]
    assert (post["corner_topk"], post["candidates"], post["max_embedding_distance"]) == (20, 100, 0.5)
    assert (post["nms"], post["nms_iou"], post["nms_sigma"], post["topk"]) == ("soft_gaussian", 0.5, 0.5, 100)


def test_the_default_build_reads_stride_8_maps_through_1x1_branches():
    model = build_detector({"name": "cornernet_squeeze", "num_classes": 80})
    assert isinstance(model.backbone, HourglassSqueeze) and model.stride == 8 and len(model.head.stacks) == 2
    for branch in ("heatmap", "embedding", "offset"):
        assert getattr(model.head.stacks[0]["tl"], branch)[0].kernel_size == (1, 1)
    # ~31.8M parameters (the official CornerNet-Squeeze), a sixth of CornerNet's ~201M
    assert 31e6 < sum(p.numel() for p in model.parameters()) < 32.5e6


def test_every_stack_learns_from_corner_targets_at_stride_8():
    model = tiny()
    losses = model(torch.rand(2, 3, 64, 64), TARGETS)
    assert set(losses) == {"loss_heatmap", "loss_pull", "loss_push", "loss_offset", "loss"}
    losses["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # A fire module's squeeze-BN bias shifts every expanded channel by a constant that the
    # training-mode BN after it removes; only the depthwise conv's zero padding breaks the
    # constancy, which a 1x1 map (the innermost scale of a 64-px image) has none of.
    assert all(name.endswith("squeeze.1.bias") and ".inner.inner." in name for name in missing), missing
    _, outputs = model._network(torch.rand(2, 3, 64, 64))
    assert outputs["stacks"][0]["tl_heatmap"].shape == (2, 3, 8, 8)


def test_predict_decodes_the_stride_8_map_in_input_pixels():
    model = tiny().eval()
    _, outputs = model._network(torch.rand(1, 3, 128, 128))
    logits = {name: torch.full_like(value, -20.0) if name.endswith("_heatmap") else torch.zeros_like(value)
              for name, value in outputs["stacks"][-1].items()}  # fmt: skip
    logits["tl_heatmap"][0, 1, 2, 3] = 3.0  # a class-1 top-left at cell (3, 2)
    logits["br_heatmap"][0, 1, 9, 12] = 1.0  # its bottom-right at cell (12, 9)
    logits["tl_offset"][0, :, 2, 3] = torch.tensor([0.5, 0.25])
    decoded = model.inference({"stacks": [logits]}, (128, 128))[0]
    assert decoded["boxes"][0].tolist() == [28.0, 18.0, 96.0, 72.0] and decoded["labels"][0] == 1  # cells x 8
    want = (torch.sigmoid(torch.tensor(3.0)) + torch.sigmoid(torch.tensor(1.0))) / 2
    assert decoded["scores"][0].item() == pytest.approx(want.item())
