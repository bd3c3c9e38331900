"""CornerNet-Saccade's training crop (``data.augment.object_crop``): a window around a random
object, zoomed so that object's longer side falls in its size class's range; boxes stay on
their objects, the rest of the window is padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from anchorless.platform.config import AugmentConfig, ObjectCropConfig
from anchorless.platform.data.transforms import PAD_VALUE, Sample, object_crop, train_transform

SIZE = 128
ON = ObjectCropConfig(enabled=True)


def _one_object(box: list[float], height: int = 300, width: int = 400) -> Sample:
    """A black image with a white rectangle exactly on ``box``."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x0, y0, x1, y1 = (int(v) for v in box)
    image[:, y0:y1, x0:x1] = 255
    return Sample.create(image, [box], [0])


@pytest.mark.parametrize("box, low, high", [
    ([100, 100, 120, 110], 16, 32),    # small (20 px): zoomed to 16-32
    ([100, 100, 150, 130], 32, 96),    # medium (50 px): 32-96
    ([100, 50, 250, 250], 96, SIZE),   # large (200 px): 96 to the window
])  # fmt: skip
def test_the_object_is_zoomed_into_its_size_class_and_stays_on_its_pixels(box, low, high):
    for seed in range(8):
        out = object_crop(_one_object(box), np.random.default_rng(seed), size=SIZE, settings=ON)
        assert out.image.shape == (3, SIZE, SIZE) and out.labels.tolist() == [0]
        x0, y0, x1, y1 = out.boxes[0].tolist()
        assert low - 1 <= max(x1 - x0, y1 - y0) <= high + 1, (seed, out.boxes)
        ys, xs = torch.nonzero(out.image[0] > 127, as_tuple=True)  # the drawn rectangle, where it landed
        drawn = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert np.allclose(drawn, [x0, y0, x1, y1], atol=1.5), (seed, drawn, out.boxes)


def test_a_centred_window_puts_the_object_in_the_middle_and_another_holds_it_whole():
    box = [200.0, 120.0, 240.0, 160.0]
    centred = ObjectCropConfig(enabled=True, centre_prob=1.0, centre_jitter=0)
    for seed in range(5):
        out = object_crop(_one_object(box), np.random.default_rng(seed), size=SIZE, settings=centred)
        x0, y0, x1, y1 = out.boxes[0].tolist()
        half_pixel = out.scale / 2  # the window starts on a whole original pixel
        assert abs((x0 + x1) / 2 - SIZE / 2) <= half_pixel + 1e-3 and abs((y0 + y1) / 2 - SIZE / 2) <= half_pixel + 1e-3
    anywhere = ObjectCropConfig(enabled=True, centre_prob=0.0)
    for seed in range(5):
        out = object_crop(_one_object(box), np.random.default_rng(seed), size=SIZE, settings=anywhere)
        x0, y0, x1, y1 = out.boxes[0].tolist()
        side = max(x1 - x0, y1 - y0)
        assert 0 <= x0 and 0 <= y0 and x1 <= SIZE and y1 <= SIZE and 32 - 1 <= side <= 96 + 1  # whole, not clipped


def test_an_image_smaller_than_the_window_is_padded_around_it():
    small = _one_object([10, 10, 30, 20], height=40, width=50)  # a 20-px object: zoomed to at most 32 px
    out = object_crop(small, np.random.default_rng(0), size=SIZE, settings=ON)
    assert out.image.shape == (3, SIZE, SIZE) and len(out.labels) == 1
    assert (out.image[:, 0, 0] == PAD_VALUE).all() and (out.image[:, -1, -1] == PAD_VALUE).all()  # the window's corners


def test_an_image_without_objects_is_zoomed_by_the_empty_scale_and_still_fills_the_window():
    image = torch.full((3, 300, 400), 50, dtype=torch.uint8)
    out = object_crop(Sample.create(image, np.zeros((0, 4)), np.zeros(0)), np.random.default_rng(0), size=SIZE, settings=ON)
    assert out.image.shape == (3, SIZE, SIZE) and len(out.labels) == 0
    assert 0.5 <= out.scale <= 1.0 + 1e-3 and (out.image == 50).all()  # 400 * 0.5 > 128: all image, no padding


def test_train_transform_uses_it_when_enabled_and_the_same_seed_gives_the_same_crop():
    augment = AugmentConfig(object_crop={"enabled": True}, color_jitter=0.0, hflip_prob=0.0)
    sample = _one_object([100, 100, 150, 130])
    first = train_transform(sample, np.random.default_rng(3), size=SIZE, augment=augment)
    again = train_transform(sample, np.random.default_rng(3), size=SIZE, augment=augment)
    assert first.image.shape == (3, SIZE, SIZE) and torch.equal(first.image, again.image)
    assert torch.equal(first.boxes, again.boxes) and 32 - 1 <= (first.boxes[0, 2:] - first.boxes[0, :2]).max() <= 96 + 1


def test_bad_settings_are_refused_by_the_config():
    with pytest.raises(ValidationError, match="expected 0 < low <= high"):
        ObjectCropConfig(size_bounds=(96, 32))
    with pytest.raises(ValidationError):
        AugmentConfig(object_crop={"enabled": True, "centre_jiter": 3})  # unknown key
