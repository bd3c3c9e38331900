"""CornerNet-Saccade: the paper's defaults, the attention head and loss, and the two-step
inference end to end on a stub network (where it looks, what it crops, where boxes land)."""

from __future__ import annotations

import math

import pytest
import torch

from anchorless.detectors import build_detector, default_detector_config
from anchorless.detectors.backbones import Hourglass54

from .lite_configs import lite_config

TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


def tiny(**postprocess) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(lite_config("cornernet_saccade", postprocess=postprocess))


def test_defaults_are_the_papers_and_the_official_saccade_configs():
    cfg = default_detector_config("cornernet_saccade")
    assert cfg["backbone"]["stacks"] == 3 and cfg["backbone"]["channels"] == [256, 384, 384, 512]
    assert cfg["assigner"]["min_overlap"] == 0.5 and cfg["assigner"]["size_bounds"] == [32.0, 96.0]
    assert (cfg["loss"]["attention"], cfg["loss"]["attention_alpha"], cfg["loss"]["pull"]) == (1.0, 2.0, 0.1)
    post = cfg["postprocess"]
    assert post["init_sizes"] == [255, 192] and post["attention_threshold"] == 0.3 and post["k_max"] == 30
    assert post["zoom_scales"] == [4.0, 2.0, 1.0] and post["target_sides"] == [24.0, 64.0, 192.0]
    assert (post["crop_size"], post["border_margin"], post["max_zoom"]) == (255, 4.0, 4.0)
    assert (post["box_threshold"], post["coarse_threshold"], post["location_distance"]) == (0.5, 0.3, 16.0)
    assert (post["corner_topk"], post["candidates"], post["max_embedding_distance"]) == (12, 12, 0.3)
    assert (post["nms"], post["nms_iou"], post["nms_sigma"]) == ("soft_gaussian", 0.5, 0.7)


def test_the_default_build_has_three_attention_branches_per_stack_on_the_upsampling_levels():
    model = build_detector({"name": "cornernet_saccade", "num_classes": 80})
    assert isinstance(model.backbone, Hourglass54) and len(model.head.stacks) == len(model.head.attention) == 3
    for branches in model.head.attention:
        assert [b[0].in_channels for b in branches] == [256, 384, 384]  # the stride-4, 8 and 16 levels
        assert all(b[0].kernel_size == (3, 3) and b[-1].kernel_size == (1, 1) and b[-1].out_channels == 1 for b in branches)
        assert all(b[-1].bias.detach().eq(-2.19).all() for b in branches)
    # ~116.8M parameters, the paper's CornerNet-Saccade
    assert 116e6 < sum(p.numel() for p in model.parameters()) < 118e6


def test_training_adds_the_attention_loss_and_every_stack_learns():
    model = tiny()
    losses = model(torch.rand(2, 3, 64, 64), TARGETS)
    assert set(losses) == {"loss_heatmap", "loss_pull", "loss_push", "loss_offset", "loss_attention", "loss"}
    losses["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_the_attention_loss_is_the_focal_loss_on_hand_counted_centres():
    model = tiny()
    _, outputs = model._network(torch.rand(2, 3, 64, 64))
    outputs["attention"] = [[torch.zeros_like(level) for level in stack] for stack in outputs["attention"]]
    losses = model.losses(outputs, TARGETS, (64, 64))
    # Every probability is 0.5: each cell, positive or not, costs 0.5^2 ln 2. Box 1 (44 px) marks
    # the 2 x 8 x 8 medium map once, box 2 (30 px) the 2 x 16 x 16 small map once; the 2 x 4 x 4
    # large map has no centre (normaliser 1). The same in every stack: the mean is one stack's.
    per_cell = 0.25 * math.log(2)
    want = per_cell * (2 * 16 * 16 / 1 + 2 * 8 * 8 / 1 + 2 * 4 * 4 / 1)
    assert losses["loss_attention"].item() == pytest.approx(want, rel=1e-5)


def test_predict_padded_and_export_are_refused_with_the_reason():
    model = tiny().eval()
    with pytest.raises(NotImplementedError, match="crops a number of locations that depends on the image"):
        model.predict_padded(torch.rand(1, 3, 64, 64))


def _stub_outputs(canvas: torch.Tensor, corners: dict | None, attention_peak: tuple | None) -> dict:
    """Last-stack logits for (N, 3, S, S) canvases: nothing anywhere, except a class-1 box from
    corner cells ``corners`` (x, y) and one small-object attention peak (row, column)."""
    n, side = canvas.shape[0], canvas.shape[-1]
    cells = side // 4
    stack = {f"{kind}_{name}": torch.full((n, c, cells, cells), -20.0 if name == "heatmap" else 0.0)
             for kind in ("tl", "br") for name, c in (("heatmap", 3), ("embedding", 1), ("offset", 2))}  # fmt: skip
    if corners is not None:
        (tx, ty), (bx, by) = corners["tl"], corners["br"]
        stack["tl_heatmap"][:, 1, ty, tx] = 3.0
        stack["br_heatmap"][:, 1, by, bx] = 3.0
    attention = [torch.full((n, 1, side // s, side // s), -20.0) for s in (4, 8, 16)]
    if attention_peak is not None:
        attention[0][:, 0, attention_peak[0], attention_peak[1]] = 5.0
    return {"stacks": [stack], "attention": [attention]}


def test_two_steps_look_where_attention_points_zoom_crop_and_map_the_box_back_to_image_pixels(monkeypatch):
    model = tiny(init_sizes=[128], crop_size=128, k_max=4).eval()
    seen = []

    def network(images):
        seen.append(images.clone())
        if len(seen) == 1:  # step 1: one view, a small-object peak at cell (row 8, column 6)
            return (128, 128), _stub_outputs(images, None, (8, 6))
        return (128, 128), _stub_outputs(images, {"tl": (5, 6), "br": (25, 20)}, None)  # step 2: a box in the crop

    monkeypatch.setattr(model, "_network", network)
    image = torch.rand(1, 3, 128, 128)
    detections = model.predict(image)[0]
    view, crops = seen
    # Step 1 sees the image whole (zoom 128 / 128, nothing padded).
    torch.testing.assert_close(view, image, rtol=0, atol=1e-5)
    # The peak's cell centre (6.5, 8.5) * 4 = (26, 34) is zoomed by s_s = 4: one crop of 128 px
    # from zoomed pixel (26 * 4 - 64, 34 * 4 - 64) = (40, 72), i.e. image pixels 10..42, 18..50.
    assert crops.shape == (1, 3, 128, 128)
    expected = torch.nn.functional.interpolate(image[:, :, 18:50, 10:42], scale_factor=4, mode="bilinear")
    torch.testing.assert_close(crops[:, :, 8:-8, 8:-8], expected[:, :, 8:-8, 8:-8], rtol=0, atol=1e-5)
    # The crop's box: corners at cells (5, 6) and (25, 20) -> crop pixels (20, 24, 100, 80),
    # back in the image: ((20 + 40) / 4, (24 + 72) / 4, (100 + 40) / 4, (80 + 72) / 4).
    assert detections["boxes"].tolist() == [[15.0, 24.0, 35.0, 38.0]]
    assert detections["labels"].tolist() == [1]
    assert detections["scores"].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())


def test_a_box_touching_the_crop_border_is_dropped(monkeypatch):
    model = tiny(init_sizes=[128], crop_size=128).eval()
    calls = []

    def network(images):
        calls.append(len(images))
        if len(calls) == 1:
            return (128, 128), _stub_outputs(images, None, (8, 6))
        return (128, 128), _stub_outputs(images, {"tl": (0, 6), "br": (25, 20)}, None)  # its left edge on the border

    monkeypatch.setattr(model, "_network", network)
    assert len(model.predict(torch.rand(1, 3, 128, 128))[0]["boxes"]) == 0 and calls == [1, 1]


def test_images_smaller_than_a_crop_and_k_max_zero_still_detect():
    model = tiny(k_max=0)
    detections = model.predict(torch.rand(2, 3, 32, 64))  # views zoom the 64-px side up to 255 and 192
    assert len(detections) == 2 and all(d["boxes"].shape[1] == 4 for d in detections)
    model = tiny()
    for det in model.predict(torch.rand(1, 3, 32, 32)):
        assert (det["boxes"][:, 0::2] <= 32).all() and (det["boxes"][:, 1::2] <= 32).all()
