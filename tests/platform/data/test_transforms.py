"""Boxes stay on their objects through every transform.

Property-style: two filled rectangles, one in the red channel (label 0) and one in
the green channel (label 1), are drawn on a black image exactly where their boxes
are; after a transform each surviving box must bound the pixels of its own
rectangle within a pixel or two (resizing blurs edges by at most that).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anchorless.platform.config import AugmentConfig
from anchorless.platform.data.transforms import (
    MIN_BOX_SIDE,
    PAD_VALUE,
    Sample,
    color_jitter,
    crop,
    eval_transform,
    hflip,
    letterbox,
    pad_bottom_right,
    random_crop,
    resize,
    train_transform,
)

TOLERANCE_PX = 2.0
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def drawn_samples(draw: st.DrawFn) -> Sample:
    height = draw(st.integers(48, 160))
    width = draw(st.integers(48, 160))
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    boxes = []
    for channel in (0, 1):
        box_w = draw(st.integers(12, width - 4))
        box_h = draw(st.integers(12, height - 4))
        x0 = draw(st.integers(0, width - box_w))
        y0 = draw(st.integers(0, height - box_h))
        image[channel, y0 : y0 + box_h, x0 : x0 + box_w] = 255
        boxes.append([x0, y0, x0 + box_w, y0 + box_h])
    return Sample.create(image, np.asarray(boxes, dtype=np.float32), np.array([0, 1]))


def assert_boxes_bound_their_rectangles(sample: Sample, *, min_side: float = 4.0) -> None:
    """Each kept box bounds the thresholded pixels of the channel its label was drawn in."""
    assert sample.image.dtype == torch.uint8
    assert len(sample.boxes) == len(sample.labels)
    for box, label in zip(sample.boxes.tolist(), sample.labels.tolist()):
        x0, y0, x1, y1 = box
        if min(x1 - x0, y1 - y0) < min_side:
            continue  # too thin to survive antialiased resizing as a thresholded mask
        mask = sample.image[label] > 127  # (H, W)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(xs) > 0, f"box {box} (label {label}) kept but its rectangle vanished"
        pixels = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert np.allclose(box, pixels, atol=TOLERANCE_PX), f"label {label}: box {box} vs pixels {pixels}"


@SETTINGS
@given(sample=drawn_samples())
def test_hflip_moves_boxes_with_pixels(sample: Sample) -> None:
    assert_boxes_bound_their_rectangles(hflip(sample))


@SETTINGS
@given(sample=drawn_samples(), seed=st.integers(0, 2**32 - 1), min_fraction=st.floats(0.3, 1.0))
def test_random_crop_clips_boxes_to_the_window(sample: Sample, seed: int, min_fraction: float) -> None:
    out = random_crop(sample, np.random.default_rng(seed), min_fraction=min_fraction)
    assert_boxes_bound_their_rectangles(out, min_side=1.0)
    assert (out.boxes[:, 0] >= 0).all() and (out.boxes[:, 2] <= out.width).all()


@SETTINGS
@given(sample=drawn_samples(), height=st.integers(40, 300), width=st.integers(40, 300))
def test_resize_scales_boxes_with_pixels(sample: Sample, height: int, width: int) -> None:
    assert_boxes_bound_their_rectangles(resize(sample, height, width))


@SETTINGS
@given(sample=drawn_samples(), size=st.sampled_from([64, 96, 128, 192]), jitter=st.floats(0.5, 1.6), seed=st.integers(0, 99))
def test_letterbox_with_scale_jitter_keeps_boxes_on_objects(sample: Sample, size: int, jitter: float, seed: int) -> None:
    out = letterbox(sample, size, scale_factor=jitter, rng=np.random.default_rng(seed))
    assert out.image.shape == (3, size, size)
    assert_boxes_bound_their_rectangles(out)


@SETTINGS
@given(
    sample=drawn_samples(),
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([64, 128]),
    crop_prob=st.sampled_from([0.0, 0.5, 1.0]),
    hflip_prob=st.sampled_from([0.0, 0.5, 1.0]),
    strength=st.floats(0.0, 0.2),
)
def test_train_transform_keeps_every_box_on_its_object(
    sample: Sample, seed: int, size: int, crop_prob: float, hflip_prob: float, strength: float
) -> None:
    augment = AugmentConfig(crop_prob=crop_prob, hflip_prob=hflip_prob, color_jitter=strength, scale_jitter=(0.6, 1.5))
    out = train_transform(sample, np.random.default_rng(seed), size=size, augment=augment)
    assert out.image.shape == (3, size, size)
    assert_boxes_bound_their_rectangles(out)
    sides = torch.minimum(out.boxes[:, 2] - out.boxes[:, 0], out.boxes[:, 3] - out.boxes[:, 1])
    assert (sides >= MIN_BOX_SIDE).all()


@SETTINGS
@given(sample=drawn_samples(), size=st.sampled_from([64, 128, 256]))
def test_eval_letterbox_scale_maps_boxes_back_to_original_pixels(sample: Sample, size: int) -> None:
    out = eval_transform(sample, size)
    assert out.image.shape == (3, size, size)
    assert max(sample.height, sample.width) * out.scale == pytest.approx(size)
    # the content's sides are rounded to whole pixels: at most half a network pixel off
    assert torch.allclose(out.boxes / out.scale, sample.boxes, atol=0.5 / out.scale + 1e-3)
    assert_boxes_bound_their_rectangles(out)


def test_letterbox_pads_bottom_and_right_with_the_constant() -> None:
    sample = Sample.create(torch.full((3, 50, 100), 7, dtype=torch.uint8), np.zeros((0, 4)), np.zeros(0))
    out = eval_transform(sample, 64)
    assert out.scale == pytest.approx(0.64)
    assert (out.image[:, :32, :] == 7).all()  # 50 * 0.64 = 32 rows of content at the top
    assert (out.image[:, 32:, :] == PAD_VALUE).all()


def test_crop_drops_boxes_mostly_outside_and_keeps_the_image_when_none_remain() -> None:
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    boxes = np.array([[0, 0, 50, 50], [40, 40, 60, 60], [90, 90, 100, 100]], dtype=np.float32)
    out = crop(Sample.create(image, boxes, np.array([0, 1, 2])), 45, 45, 55, 55)
    # box 0 keeps 5x5 of 50x50 (1%): dropped; box 1 keeps 15x15 of 20x20 (56%): clipped; box 2 whole.
    assert out.labels.tolist() == [1, 2]
    assert out.boxes.tolist() == [[0.0, 0.0, 15.0, 15.0], [45.0, 45.0, 55.0, 55.0]]
    empty = crop(Sample.create(image, boxes[:1], np.array([0])), 60, 60, 40, 40)
    assert empty.image.shape == (3, 40, 40) and len(empty.boxes) == 0 and len(empty.labels) == 0


def test_color_jitter_changes_pixels_but_not_shape_and_zero_strength_is_identity() -> None:
    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    assert color_jitter(image, np.random.default_rng(0), 0.0) is image
    out = color_jitter(image, np.random.default_rng(0), 0.4)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert not torch.equal(out, image)


def test_same_seed_gives_the_same_augmentation() -> None:
    image = torch.randint(0, 256, (3, 80, 120), dtype=torch.uint8)
    sample = Sample.create(image, np.array([[10, 10, 60, 50]], dtype=np.float32), np.array([0]))
    augment = AugmentConfig(crop_prob=0.5)
    first = train_transform(sample, np.random.default_rng(7), size=64, augment=augment)
    second = train_transform(sample, np.random.default_rng(7), size=64, augment=augment)
    other = train_transform(sample, np.random.default_rng(8), size=64, augment=augment)
    assert torch.equal(first.image, second.image) and torch.equal(first.boxes, second.boxes)
    assert not torch.equal(first.image, other.image)


def test_pad_does_not_move_boxes() -> None:
    sample = Sample.create(torch.zeros(3, 20, 30, dtype=torch.uint8), np.array([[1, 2, 3, 4]], dtype=np.float32), np.array([0]))
    out = pad_bottom_right(sample, 32)
    assert out.image.shape == (3, 32, 32) and out.boxes.tolist() == [[1.0, 2.0, 3.0, 4.0]]
