"""Augmentations and the letterbox, on one image and its boxes.

Images are ``(3, H, W)`` uint8 tensors and stay uint8 to the end (the detector
normalises; the pipeline ships bytes, a quarter of float32). Boxes are xyxy in
the current image's pixels, held as torchvision ``BoundingBoxes`` so that
torchvision's v2 functional ops move them with the image (crop, resize, flip,
pad). Our own code decides only which boxes survive a crop.

``train_transform`` composes: random crop → scale jitter + letterbox resize
(a single resize; when the jittered image is larger than the canvas, a random
canvas-sized window is cut from the original first) → colour jitter → horizontal
flip → pad bottom/right to ``size x size``. With ``augment.object_crop`` the first
two steps are CornerNet-Saccade's crop around a random object instead
(:func:`object_crop`). ``eval_transform`` is the letterbox alone. Every result
records ``scale``, network pixels per original pixel, so
predictions on an evaluation image map back by dividing by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from anchorless.platform.config import AugmentConfig, ObjectCropConfig
from anchorless.platform.data.images import PAD_VALUE, letterbox_array, letterbox_factor, resized_shape

MIN_VISIBLE_FRACTION = 0.2  # a cropped box showing less of its object than this is dropped
MIN_BOX_SIDE = 2.0  # network pixels; thinner boxes carry no learnable signal
_GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R 601 luma, as torchvision uses


@dataclass
class Sample:
    image: torch.Tensor  # (3, H, W) uint8
    boxes: tv_tensors.BoundingBoxes  # (N, 4) float32 xyxy on the image's canvas
    labels: torch.Tensor  # (N,) int64
    scale: float = 1.0  # network pixels per original pixel

    @classmethod
    def create(cls, image: torch.Tensor, boxes: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> "Sample":
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        height, width = image.shape[-2:]
        return cls(
            image=image,
            boxes=tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            labels=torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
        )

    @property
    def height(self) -> int:
        return int(self.image.shape[-2])

    @property
    def width(self) -> int:
        return int(self.image.shape[-1])


def _keep(sample: Sample, mask: torch.Tensor) -> Sample:
    return replace(sample, boxes=tv_tensors.wrap(sample.boxes[mask], like=sample.boxes), labels=sample.labels[mask])


def _areas(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def crop(sample: Sample, top: int, left: int, height: int, width: int, *, min_visible: float = MIN_VISIBLE_FRACTION) -> Sample:
    """Cut a window; boxes are clipped to it and dropped if less than ``min_visible`` of them remains."""
    before = _areas(sample.boxes)
    boxes = F.crop(sample.boxes, top=top, left=left, height=height, width=width)  # clamps to the window
    cropped = replace(sample, image=F.crop(sample.image, top=top, left=left, height=height, width=width), boxes=boxes)
    visible = _areas(boxes) >= min_visible * before.clamp(min=1e-6)
    return _keep(cropped, visible & (_areas(boxes) > 0))


def random_crop(sample: Sample, rng: np.random.Generator, *, min_fraction: float) -> Sample:
    """A window whose sides are each a uniform fraction in [min_fraction, 1] of the image's."""
    height = max(1, int(round(sample.height * rng.uniform(min_fraction, 1.0))))
    width = max(1, int(round(sample.width * rng.uniform(min_fraction, 1.0))))
    top = int(rng.integers(0, sample.height - height + 1))
    left = int(rng.integers(0, sample.width - width + 1))
    return crop(sample, top, left, height, width)


def resize(sample: Sample, height: int, width: int) -> Sample:
    """Bilinear, antialiased; ``scale`` follows the horizontal factor (aspect is kept by callers)."""
    factor = width / sample.width
    return replace(
        sample,
        image=F.resize(sample.image, [height, width], antialias=True),
        boxes=F.resize(sample.boxes, [height, width]),
        scale=sample.scale * factor,
    )


def hflip(sample: Sample) -> Sample:
    return replace(sample, image=F.horizontal_flip(sample.image), boxes=F.horizontal_flip(sample.boxes))


def pad_bottom_right(sample: Sample, size: int, value: int = PAD_VALUE) -> Sample:
    """Pad to ``size x size``; the content stays at the top-left, so boxes do not move."""
    padding = [0, 0, size - sample.width, size - sample.height]  # left, top, right, bottom
    return replace(sample, image=F.pad(sample.image, padding, fill=value), boxes=F.pad(sample.boxes, padding))


def color_jitter(image: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Random brightness, contrast and saturation, each a factor in [1-strength, 1+strength].

    Fused into one float pass by hand: torchvision's three ``adjust_*`` calls cost
    about four times as much on uint8 images, more than decoding does.
    """
    if strength <= 0:
        return image
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    pixels = image.float()
    gray = (pixels * _GRAY_WEIGHTS).sum(0, keepdim=True)  # (1, H, W)
    mean = gray.mean()
    # saturation blends towards gray, contrast towards the mean gray, brightness scales.
    pixels.mul_(float(saturation)).add_(gray, alpha=float(1 - saturation))
    pixels.mul_(float(brightness * contrast)).add_(float(brightness * (1 - contrast)) * mean)
    return pixels.clamp_(0, 255).round_().to(torch.uint8)


def drop_small_boxes(sample: Sample, min_side: float = MIN_BOX_SIDE) -> Sample:
    sides = torch.minimum(sample.boxes[:, 2] - sample.boxes[:, 0], sample.boxes[:, 3] - sample.boxes[:, 1])
    return _keep(sample, sides >= min_side)


def letterbox(
    sample: Sample,
    size: int,
    *,
    scale_factor: float = 1.0,
    rng: np.random.Generator | None = None,
    pad: bool = True,
) -> Sample:
    """Resize keeping the aspect so the long side is ``size * scale_factor``, then pad to a square.

    When ``scale_factor > 1`` makes a side longer than ``size``, a ``size``-long
    window (random with ``rng``, else top-left) is cut from the original first,
    so there is only ever one resize and never more pixels than the canvas.
    """
    factor = letterbox_factor(sample.height, sample.width, size, scale_factor)
    out_h, out_w = sample.height * factor, sample.width * factor
    if out_h > size or out_w > size:
        win_h = min(sample.height, max(1, int(round(size / factor))))
        win_w = min(sample.width, max(1, int(round(size / factor))))
        top = int(rng.integers(0, sample.height - win_h + 1)) if rng is not None else 0
        left = int(rng.integers(0, sample.width - win_w + 1)) if rng is not None else 0
        sample = crop(sample, top, left, win_h, win_w)
    new_h, new_w = resized_shape(sample.height, sample.width, factor, size)
    if (new_h, new_w) != (sample.height, sample.width):
        scale = sample.scale * factor  # the isotropic factor, not the rounded per-axis one
        sample = replace(resize(sample, new_h, new_w), scale=scale)
    else:
        sample = replace(sample, scale=sample.scale * factor)
    return pad_bottom_right(sample, size) if pad else sample


def _window_start(low: float, high: float, extent: int, size: int, rng: np.random.Generator) -> float:
    """Start of a ``size`` window on an axis ``extent`` long (zoomed pixels) holding [low, high]:
    anywhere it fits, or centred when the axis is shorter than the window."""
    if extent <= size:
        return (extent - size) / 2
    first, last = max(high - size, 0.0), min(extent - size, low)
    return float(rng.uniform(first, max(first, last)))


def object_crop(sample: Sample, rng: np.random.Generator, *, size: int, settings: ObjectCropConfig) -> Sample:
    """CornerNet-Saccade's training crop: a ``size x size`` window of the image zoomed so a random
    object's longer side becomes a random size of its class (``settings.min_side`` to the first
    bound, between the bounds, the second bound to ``size``), centred on the object (within
    ``settings.centre_jitter``) with probability ``settings.centre_prob``, else anywhere that holds it.
    Where the window leaves the image it is padded; only the window is resized (never the
    whole zoomed image), and boxes follow as in :func:`crop`.
    """
    sides = (sample.boxes[:, 2:] - sample.boxes[:, :2]).amax(dim=1) if len(sample.labels) else torch.zeros(0)
    candidates = torch.nonzero(sides >= 1).squeeze(1)  # a box under a pixel has no size to zoom to
    zoomed_h, zoomed_w = sample.height, sample.width
    if len(candidates):
        chosen = int(candidates[int(rng.integers(len(candidates)))])
        longer = float(sides[chosen])
        small, large = settings.size_bounds
        low, high = (large, size) if longer > large else (small, large) if longer >= small else (settings.min_side, small)
        factor = float(rng.uniform(low, max(low, high))) / longer
        x0, y0, x1, y1 = (float(v) * factor for v in sample.boxes[chosen])
        zoomed_h, zoomed_w = sample.height * factor, sample.width * factor
        if rng.random() < settings.centre_prob:
            jitter = rng.integers(-settings.centre_jitter, settings.centre_jitter + 1, size=2)
            cx = min(max((x0 + x1) / 2 + float(jitter[0]), 0.0), zoomed_w)
            cy = min(max((y0 + y1) / 2 + float(jitter[1]), 0.0), zoomed_h)
            left = (zoomed_w - size) / 2 if zoomed_w <= size else cx - size / 2
            top = (zoomed_h - size) / 2 if zoomed_h <= size else cy - size / 2
        else:
            left = _window_start(x0, x1, int(zoomed_w), size, rng)
            top = _window_start(y0, y1, int(zoomed_h), size, rng)
    else:
        factor = float(rng.uniform(*settings.empty_scale))
        zoomed_h, zoomed_w = sample.height * factor, sample.width * factor
        left = _window_start(0.0, 0.0, int(zoomed_w), size, rng)
        top = _window_start(0.0, 0.0, int(zoomed_h), size, rng)
    # The window in original pixels; the part inside the image is cut, resized and padded.
    window = max(1, int(round(size / factor)))
    win_left, win_top = int(round(left / factor)), int(round(top / factor))
    inside_left, inside_top = max(win_left, 0), max(win_top, 0)
    inside_w = min(win_left + window, sample.width) - inside_left
    inside_h = min(win_top + window, sample.height) - inside_top
    scale = size / window
    if inside_w < 1 or inside_h < 1:  # the window missed the image: a padded canvas, no boxes
        blank = Sample.create(torch.full((3, size, size), PAD_VALUE, dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0))
        return replace(blank, scale=sample.scale * scale)
    sample = crop(sample, inside_top, inside_left, inside_h, inside_w)
    resized_h = min(size, max(1, int(round(inside_h * scale))))
    resized_w = min(size, max(1, int(round(inside_w * scale))))
    sample = replace(resize(sample, resized_h, resized_w), scale=sample.scale * scale)
    pad_left = min(size - resized_w, int(round((inside_left - win_left) * scale)))
    pad_top = min(size - resized_h, int(round((inside_top - win_top) * scale)))
    padding = [pad_left, pad_top, size - resized_w - pad_left, size - resized_h - pad_top]  # left, top, right, bottom
    return replace(sample, image=F.pad(sample.image, padding, fill=PAD_VALUE), boxes=F.pad(sample.boxes, padding))


def eval_transform(sample: Sample, size: int) -> Sample:
    """The letterbox alone: deterministic, nothing cropped or dropped."""
    return letterbox(sample, size)


def letterbox_images(images: Sequence[torch.Tensor], image_size: int) -> tuple[torch.Tensor, list[float]]:
    """(3, H, W) uint8 images → a (B, 3, S, S) uint8 batch and each image's scale (network px / original px).

    Prediction's letterbox: :func:`~anchorless.platform.data.images.letterbox_array`, the one the
    torch-free ONNX server uses too, and pixel for pixel :func:`eval_transform`'s.
    """
    batch, scales = [], []
    for image in images:
        pixels, scale = letterbox_array(image.permute(1, 2, 0).numpy(), image_size)
        batch.append(torch.from_numpy(pixels))
        scales.append(scale)
    return torch.stack(batch), scales


def train_transform(sample: Sample, rng: np.random.Generator, *, size: int, augment: AugmentConfig) -> Sample:
    """The training augmentations in order; see the module docstring."""
    if not augment.enabled:
        return drop_small_boxes(eval_transform(sample, size))
    if augment.object_crop.enabled:
        sample = object_crop(sample, rng, size=size, settings=augment.object_crop)
    else:
        if rng.random() < augment.crop_prob:
            sample = random_crop(sample, rng, min_fraction=augment.crop_min_fraction)
        low, high = augment.scale_jitter
        sample = letterbox(sample, size, scale_factor=float(rng.uniform(low, high)), rng=rng, pad=False)
    sample = replace(sample, image=color_jitter(sample.image, rng, augment.color_jitter))
    if rng.random() < augment.hflip_prob:
        sample = hflip(sample)
    return drop_small_boxes(pad_bottom_right(sample, size))
