"""CenterNet keypoint triplets: CornerNet plus centre keypoints and the central-region check."""

from __future__ import annotations

import torch

from anchorless.detectors import default_detector_config
from anchorless.detectors.layers import CascadeCornerPooling, CenterPooling
from anchorless.detectors.postprocess import TripletPostprocess

from .test_cornernet import TARGETS, tiny


def test_defaults_are_the_papers():
    post = default_detector_config("centernet_triplets")["postprocess"]
    assert (post["corner_topk"], post["center_topk"]) == (70, 70)  # the official COCO top_k
    assert (post["small_n"], post["large_n"], post["scale_split"]) == (3, 5, 150.0)
    assert (post["nms"], post["nms_iou"], post["max_embedding_distance"]) == ("soft_gaussian", 0.5, 0.5)


def test_head_has_cascade_corner_pooling_and_a_centre_branch_per_stack():
    model = tiny("centernet_triplets")
    assert isinstance(model.postprocess, TripletPostprocess)
    for stack in model.head.stacks:
        assert isinstance(stack["tl_pool"], CascadeCornerPooling) and stack["tl_pool"].directions == ("top", "left")
        assert isinstance(stack["br_pool"], CascadeCornerPooling) and stack["br_pool"].directions == ("bottom", "right")
        assert isinstance(stack["ct_pool"], CenterPooling) and stack["ct"].embedding is None


def test_the_centre_heatmap_and_offsets_are_trained_on_every_stack():
    model = tiny("centernet_triplets")
    _, outputs = model._network(torch.rand(2, 3, 64, 64))
    assert {"ct_heatmap", "ct_offset"} <= set(outputs["stacks"][0]) and "ct_embedding" not in outputs["stacks"][0]
    with_centre = model.losses(outputs, TARGETS, (64, 64))
    corners_only = type(model).__mro__[1].losses.__get__(model)  # CornerNet's losses, same weights
    model.keypoints = ("tl", "br")
    without = corners_only(outputs, TARGETS, (64, 64))
    del model.keypoints
    assert with_centre["loss_heatmap"] > without["loss_heatmap"] and with_centre["loss_offset"] >= without["loss_offset"]
    torch.testing.assert_close(with_centre["loss_pull"], without["loss_pull"])
    with_centre["loss"] = sum(with_centre.values())
    with_centre["loss"].backward()
    for stack in model.head.stacks:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack["ct"].parameters())
        assert all(p.grad is not None for p in stack["ct_pool"].parameters())
