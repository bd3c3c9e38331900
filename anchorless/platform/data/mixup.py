"""Mixup for detection (``data.mixup``): two training images blended, the boxes of both kept.

An image is mixed, with probability ``prob``, with another image of the same decode block,
both already augmented and letterboxed to the training canvas: pixels ``w * a + (1 - w) * b``
with ``w ~ Beta(alpha, alpha)``, boxes and labels of both. The detectors' losses take no
per-box weights, so every box trains at full weight whatever its image's share, as in YOLOX
(whose mixup keeps both images' boxes unweighted). The draw is seeded by (seed, pass, image
id) like the other augmentations, so it does not depend on which task decodes the block.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torchvision import tv_tensors

from anchorless.platform.data.transforms import Sample

# Keeps mixup's random stream apart from the one the same image's augmentations draw from.
_MIXUP_STREAM = 0x6D69


def mixup(first: Sample, second: Sample, weight: float) -> Sample:
    """``first`` blended with ``second`` (same canvas) at ``weight`` to ``1 - weight``; boxes of both."""
    if first.image.shape != second.image.shape:
        raise ValueError(f"mixup needs images of one shape, got {tuple(first.image.shape)} and {tuple(second.image.shape)}")
    pixels = first.image.float() * weight + second.image.float() * (1 - weight)
    boxes = torch.cat([first.boxes.as_subclass(torch.Tensor), second.boxes.as_subclass(torch.Tensor)])
    return replace(
        first,
        image=pixels.round_().clamp_(0, 255).to(torch.uint8),
        boxes=tv_tensors.wrap(boxes, like=first.boxes),
        labels=torch.cat([first.labels, second.labels]),
    )


def mix_samples(
    samples: list[Sample], image_ids: list[int], *, prob: float, alpha: float, seed: int, epoch: int
) -> list[Sample]:
    """Each sample, mixed with probability ``prob`` with another one of ``samples`` (the originals,
    never an already mixed one)."""
    if len(samples) < 2:
        return list(samples)
    mixed = []
    for index, (sample, image_id) in enumerate(zip(samples, image_ids)):
        rng = np.random.default_rng([seed, epoch, image_id % 2**63, _MIXUP_STREAM])
        if rng.random() >= prob:
            mixed.append(sample)
            continue
        partner = (index + 1 + int(rng.integers(len(samples) - 1))) % len(samples)  # any other sample
        mixed.append(mixup(sample, samples[partner], float(rng.beta(alpha, alpha))))
    return mixed
