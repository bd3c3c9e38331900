"""The detector contract: losses, gradients, robustness, predict."""

import pytest
import torch
from torch import nn

from anchorless.detectors import build_detector

from .conftest import small_config
from .lite_configs import lite_config

LOSS_NAMES = {
    "onenet": {"loss_cls", "loss_l1", "loss_giou", "loss"},
    "onenet_fpn": {"loss_cls", "loss_l1", "loss_giou", "loss"},
    "centernet": {"loss_heatmap", "loss_size", "loss_offset", "loss"},
    "fcos": {"loss_cls", "loss_box", "loss_centerness", "loss"},
    "gfl": {"loss_qfl", "loss_box", "loss_dfl", "loss"},
    "gfl_v2": {"loss_qfl", "loss_box", "loss_dfl", "loss"},
    "cornernet": {"loss_heatmap", "loss_pull", "loss_push", "loss_offset", "loss"},
    "centernet_triplets": {"loss_heatmap", "loss_pull", "loss_push", "loss_offset", "loss"},
    "cornernet_squeeze": {"loss_heatmap", "loss_pull", "loss_push", "loss_offset", "loss"},
    "cornernet_saccade": {"loss_heatmap", "loss_pull", "loss_push", "loss_offset", "loss_attention", "loss"},
}
SIZE = 128
# FCOS's size ranges are scaled down so that every level of a 128-pixel image gets positives.
CONFIGS = {
    "onenet": small_config("onenet"),
    "onenet_fpn": small_config("onenet_fpn"),  # one match over every level's locations
    "centernet": small_config("centernet"),
    "fcos": small_config("fcos", assigner={"size_ranges": [-1, 16, 32, 48, 64, 1e8]}),
    "gfl": small_config("gfl"),  # ATSS: every level takes part whatever the image size
    "gfl_v2": small_config("gfl_v2"),
    # The corner-keypoint detectors on their ResNet-18 variant, narrow branches.
    "cornernet": small_config("cornernet", head={"channels": 32, "pool_channels": 32}),
    "centernet_triplets": small_config("centernet_triplets", head={"channels": 32, "pool_channels": 32}),
    # CornerNet-Lite, a few channels wide; Squeeze with three levels so the innermost map of a
    # 128-px image is 2x2 (on a 1x1 map a fire module's squeeze-BN bias gets no gradient).
    "cornernet_squeeze": lite_config("cornernet_squeeze", backbone={"channels": [8, 8, 12, 16], "blocks": [2, 2, 2, 4]}),
    "cornernet_saccade": lite_config("cornernet_saccade"),
}

# Corner (and centre) pooling sends each location's gradient to the largest of a whole row or
# column; at random init those maxima are near-ties that bf16's rounding reorders, so the
# backbone's gradient turns more: 0.67-0.75 (CornerNet) and 0.65-0.70 (triplets) over three
# seeds, the heads' own 0.87-0.97. Computing the pooling modules in float32 changed nothing.
# CornerNet-Saccade's 8-channel test trunk, three stacks of pooled ties: 0.47, 0.97 and 0.995 over
# three seeds (Squeeze's: 0.92-0.93).
MIN_BF16_GRAD_COSINE = {"cornernet": 0.6, "centernet_triplets": 0.6, "cornernet_saccade": 0.4}


def _targets():
    # One box per FCOS level in image 0 (P3, P4, P5, P6 and P7), the whole image in image 1.
    return [
        {"boxes": torch.tensor([[8.0, 12, 28, 32], [40, 16, 88, 60], [60, 60, 124, 120], [0, 0, 90, 90]]),
         "labels": torch.tensor([0, 1, 2, 0])},
        {"boxes": torch.tensor([[0.0, 0.0, 128.0, 128.0]]), "labels": torch.tensor([1])},
    ]


@pytest.fixture(params=sorted(CONFIGS))
def detector(request):
    torch.manual_seed(0)
    return request.param, build_detector(CONFIGS[request.param])


def test_forward_with_targets_returns_named_losses_and_their_sum(detector):
    name, model = detector
    losses = model(torch.rand(2, 3, SIZE, SIZE), _targets())
    assert set(losses) == LOSS_NAMES[name]
    parts = sum(v for k, v in losses.items() if k != "loss")
    assert losses["loss"].item() == pytest.approx(parts.item(), rel=1e-6)
    assert all(torch.isfinite(v) and v.item() >= 0 for v in losses.values())


def test_gradients_reach_every_trainable_parameter(detector):
    name, model = detector
    model(torch.rand(2, 3, SIZE, SIZE), _targets())["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    if name in ("fcos", "gfl_v2"):
        # Every level's learnable scale (GFL v1's only where ATSS finds positives; v2's quality
        # reads every level's distributions).
        assert (model.head.scales.grad != 0).all()


def test_under_bf16_autocast_losses_stay_float32_and_close_to_float32_training(detector):
    """bf16 training on CPU runs the forward under autocast; the losses, assignment and
    decoding must stay float32, and the gradient must point where the float32 one does."""
    name, model = detector
    images = torch.rand(2, 3, SIZE, SIZE)
    reference = model(images, _targets())
    reference["loss"].backward()
    reference_grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, _targets())
    assert all(value.dtype == torch.float32 for value in losses.values())
    for key, value in reference.items():  # bf16 keeps ~3 significant digits through the network
        assert losses[key].item() == pytest.approx(value.item(), rel=0.05, abs=0.02), key
    losses["loss"].backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    # Measured 0.80-0.92 at random init (early layers see the rounding most); that it trains as
    # well as float32 is test_learning's bf16 case.
    assert torch.nn.functional.cosine_similarity(grad, reference_grad, dim=0) > MIN_BF16_GRAD_COSINE.get(name, 0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model.predict(images)
    assert all(d["boxes"].dtype == torch.float32 and d["scores"].dtype == torch.float32 for d in detections)


AWKWARD = [
    (torch.tensor([[10.0, 10.0, 10.5, 10.4]]), torch.tensor([1])),  # sub-pixel box
    (torch.tensor([[0.0, 0.0, 128.0, 128.0]]), torch.tensor([2])),  # the whole image
    (torch.tensor([[-10.0, 110.0, 20.0, 140.0]]), torch.tensor([0])),  # crosses two borders
    (torch.tensor([[5.0, 5.0, 5.0, 20.0], [8.0, 8.0, 20.0, 20.0]]), torch.tensor([0, 1])),  # zero width
    (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),  # no objects in this image
]


def _assert_finite_losses_and_gradients(model, targets):
    losses = model(torch.rand(len(targets), 3, SIZE, SIZE), targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_losses_and_gradients_stay_finite_on_tiny_whole_image_border_and_zero_size_boxes(detector):
    _, model = detector
    _assert_finite_losses_and_gradients(model, [{"boxes": b, "labels": l} for b, l in AWKWARD])


def test_a_batch_without_any_object_gives_finite_losses(detector):
    _, model = detector
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    _assert_finite_losses_and_gradients(model, [empty, empty])


def test_predict_returns_clipped_detections_and_restores_training_mode(detector):
    _, model = detector
    model.train()
    detections = model.predict(torch.rand(2, 3, 64, 96))
    assert model.training
    assert len(detections) == 2
    for det in detections:
        assert set(det) == {"boxes", "scores", "labels"}
        n = len(det["scores"])
        assert n <= 100 and det["boxes"].shape == (n, 4) and det["labels"].dtype == torch.long
        assert (det["boxes"][:, 0::2] >= 0).all() and (det["boxes"][:, 0::2] <= 96).all()
        assert (det["boxes"][:, 1::2] >= 0).all() and (det["boxes"][:, 1::2] <= 64).all()
        assert not det["scores"].requires_grad
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_images_are_normalised_inside_the_model_with_imagenet_statistics():
    model = build_detector(small_config("centernet")).eval()
    assert model.pixel_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert model.pixel_std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    seen = {}

    def record(module, args):
        seen["input"] = args[0]

    model.backbone.stem.register_forward_pre_hook(record)
    mean_image = model.pixel_mean.expand(1, 3, 32, 32).clone()
    model.predict(mean_image)
    assert seen["input"].abs().max().item() < 1e-6  # the mean image becomes zeros


@pytest.mark.parametrize(
    "images, targets, message",
    [
        (torch.rand(1, 3, 60, 64), None, "multiples of 32"),
        (torch.rand(1, 1, 64, 64), None, r"\(B, 3, H, W\)"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), None, "floats"),
        (torch.rand(1, 3, 64, 64), [{"boxes": torch.tensor([[0.0, 0, 9, 9]]), "labels": torch.tensor([3])}], "labels must be in 0..2"),
        (torch.rand(2, 3, SIZE, SIZE), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}], "1 targets for 2 images"),
    ],
)
def test_bad_inputs_are_rejected_with_a_clear_message(images, targets, message):
    model = build_detector(small_config("onenet"))
    with pytest.raises(ValueError, match=message):
        model(images, targets)


def test_onenet_multi_head_training_adds_losses_per_head_and_infers_from_the_first_only():
    torch.manual_seed(0)
    model = build_detector(small_config("onenet", head={"num_heads": 2}))
    losses = model(torch.rand(2, 3, SIZE, SIZE), _targets())
    assert set(losses) == LOSS_NAMES["onenet"] | {"loss_cls_1", "loss_l1_1", "loss_giou_1"}
    losses["loss"].backward()
    assert model.head.stages[0].weight.grad.abs().sum() > 0  # the second head learns
    model.eval()
    features = torch.rand(1, 64, 16, 16)
    assert len(model.head(features)) == 1


@pytest.mark.parametrize("shares_boxes", [True, False])
def test_onenet_one_to_many_head_adds_training_losses_and_leaves_inference_to_the_one_to_one_head(shares_boxes):
    torch.manual_seed(0)
    head = {"one_to_many_topk": 9, "one_to_many_shares_boxes": shares_boxes}
    model = build_detector(small_config("onenet", head=head, loss={"one_to_many": 0.5}))
    images = torch.rand(2, 3, SIZE, SIZE)
    losses = model(images, _targets())
    assert set(losses) == LOSS_NAMES["onenet"] | {"loss_cls_o2m", "loss_l1_o2m", "loss_giou_o2m"}
    assert losses["loss"].item() == pytest.approx(sum(v.item() for k, v in losses.items() if k != "loss"), rel=1e-5)
    losses["loss"].backward()
    auxiliary = model.head.one_to_many
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in auxiliary.parameters())  # it learns
    # The auxiliary terms are the factor times what the same head scores at factor 1.
    model.zero_grad()
    full = build_detector(small_config("onenet", head=head))
    full.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    model.train(), full.train()
    half, whole = model(images, _targets()), full(images, _targets())
    assert half["loss_giou_o2m"].item() == pytest.approx(0.5 * whole["loss_giou_o2m"].item(), rel=1e-5)
    # Inference reads the one-to-one head only: the same detections as without the auxiliary head.
    plain = build_detector(small_config("onenet"))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".one_to_many." not in k})
    model.eval(), plain.eval()
    with torch.no_grad():
        ours, reference = model(images), plain(images)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])


def test_onenet_one_to_many_head_shares_boxes_by_default_classifies_only_and_trains_the_one_to_one_regression():
    torch.manual_seed(0)
    model = build_detector(small_config("onenet", head={"one_to_many_topk": 9}))
    images = torch.rand(2, 3, SIZE, SIZE)
    outputs = model.forward_head(model.neck(model.backbone(images)))
    torch.testing.assert_close(outputs["one_to_many"]["boxes"], outputs["heads"][0]["boxes"])  # the same boxes
    assert not any(isinstance(m, nn.Conv2d) and m.out_channels == 4 for m in model.head.one_to_many.modules())
    # Only the auxiliary box terms: their gradient reaches the one-to-one regression.
    losses = model(images, _targets())
    (losses["loss_l1_o2m"] + losses["loss_giou_o2m"]).backward()
    assert model.head.ltrb_pred.weight.grad.abs().sum() > 0
    assert model.head.cls_score.weight.grad is None or model.head.cls_score.weight.grad.abs().sum() == 0
    # Inference is the plain OneNet's.
    plain = build_detector(small_config("onenet"))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".one_to_many." not in k})
    model.eval(), plain.eval()
    with torch.no_grad():
        for a, b in zip(model(images), plain(images)):
            torch.testing.assert_close(a["boxes"], b["boxes"])
            torch.testing.assert_close(a["scores"], b["scores"])
