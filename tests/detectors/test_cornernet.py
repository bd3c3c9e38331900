"""CornerNet: the paper's defaults, intermediate supervision, losses and decoding end to end."""

from __future__ import annotations

import pytest
import torch

from anchorless.detectors import build_detector, default_detector_config
from anchorless.detectors.layers import CornerPooling
from anchorless.detectors.postprocess import CornerPostprocess

# A 2-stack hourglass a few channels wide: the structure of Hourglass-104 at CPU cost.
TINY_HOURGLASS = {"depth": 104, "channels": [8, 8, 12, 12, 12, 16], "out_channels": 8}
TINY_HEAD = {"channels": 8, "pool_channels": 8}
TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # an image without objects
]


def tiny(name: str = "cornernet") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector({"name": name, "num_classes": 3, "backbone": TINY_HOURGLASS, "head": TINY_HEAD})


def test_defaults_are_the_papers():
    cfg = default_detector_config("cornernet")
    assert cfg["backbone"]["depth"] == 104 and cfg["head"]["channels"] == 256 and cfg["head"]["pool_channels"] == 128
    assert cfg["assigner"] == {"min_overlap": 0.3, "radius_formula": "original"}
    assert cfg["loss"] == {"heatmap": 1.0, "pull": 0.1, "push": 0.1, "offset": 1.0, "alpha": 2.0, "beta": 4.0, "margin": 1.0}
    post = cfg["postprocess"]
    assert (post["nms"], post["nms_iou"], post["nms_sigma"], post["topk"]) == ("soft_gaussian", 0.5, 0.5, 100)
    assert (post["corner_topk"], post["max_embedding_distance"], post["candidates"], post["peak_kernel"]) == (100, 0.5, 1000, 3)


def test_the_default_build_is_hourglass104_with_a_head_per_stack():
    model = build_detector({"name": "cornernet", "num_classes": 80})
    assert len(model.backbone.trunk.hourglasses) == 2 and len(model.head.stacks) == 2
    stack = model.head.stacks[0]
    assert isinstance(stack["tl_pool"], CornerPooling) and stack["tl_pool"].directions == ("top", "left")
    assert stack["br_pool"].directions == ("bottom", "right")
    assert stack["tl"].heatmap[-1].out_channels == 80 and stack["tl"].embedding[-1].out_channels == 1
    assert stack["tl"].heatmap[-1].bias.detach().eq(-2.19).all()
    assert isinstance(model.postprocess, CornerPostprocess)


def test_every_stack_learns_and_only_the_last_predicts():
    model = tiny()
    features = model.neck(model.backbone(torch.rand(2, 3, 64, 64)))
    assert len(model.forward_head(features)["stacks"]) == 2
    model.eval()
    assert len(model.forward_head(features)["stacks"]) == 1
    model.train()
    losses = model(torch.rand(2, 3, 64, 64), TARGETS)
    assert set(losses) == {"loss_heatmap", "loss_pull", "loss_push", "loss_offset", "loss"}
    losses["loss"].backward()
    for index, stack in enumerate(model.head.stacks):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters()), index


def test_the_loss_is_the_mean_over_the_stacks():
    model = tiny()
    _, outputs = model._network(torch.rand(2, 3, 64, 64))
    first, second = outputs["stacks"]
    one = model.losses({"stacks": [first]}, TARGETS, (64, 64))
    other = model.losses({"stacks": [second]}, TARGETS, (64, 64))
    both = model.losses({"stacks": [first, second]}, TARGETS, (64, 64))
    for name in both:
        torch.testing.assert_close(both[name], (one[name] + other[name]) / 2)


def test_no_objects_at_all_give_a_finite_loss_with_nothing_to_pull_or_push():
    model = tiny()
    empty = [TARGETS[1], TARGETS[1]]
    losses = model(torch.rand(2, 3, 64, 64), empty)
    assert torch.isfinite(losses["loss"]) and losses["loss_pull"] == 0 and losses["loss_push"] == 0
    assert losses["loss_offset"] == 0 and losses["loss_heatmap"] > 0


def test_predict_decodes_the_last_stack_in_input_pixels():
    model = tiny().eval()
    images = torch.rand(1, 3, 64, 64)
    _, outputs = model._network(images)
    logits = {name: torch.full_like(value, -20.0) if name.endswith("_heatmap") else torch.zeros_like(value)
              for name, value in outputs["stacks"][-1].items()}  # fmt: skip
    logits["tl_heatmap"][0, 1, 2, 3] = 3.0  # a class-1 top-left at cell (3, 2)
    logits["br_heatmap"][0, 1, 9, 12] = 1.0  # its bottom-right at cell (12, 9)
    logits["tl_offset"][0, :, 2, 3] = torch.tensor([0.5, 0.25])
    decoded = model.inference({"stacks": [logits]}, (64, 64))[0]
    assert decoded["boxes"][0].tolist() == [14.0, 9.0, 48.0, 36.0] and decoded["labels"][0] == 1
    want = (torch.sigmoid(torch.tensor(3.0)) + torch.sigmoid(torch.tensor(1.0))) / 2  # plain sigmoid, no clamp
    assert decoded["scores"][0].item() == pytest.approx(want.item())
