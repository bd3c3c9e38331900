"""CornerNet-Saccade's attention-map targets: which of the three maps owns an object (by
the longer side of its box), and a 1 at its centre's cell on that map.

The three maps, fine to coarse, are those of small, medium and large objects; the same
split decides, at inference, how far a box-derived location is zoomed
(:mod:`~anchorless.detectors.postprocess.saccade`).

Shapes: M ground-truth boxes, h x w an attention map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from anchorless.detectors.assigners.corners import CornerTarget

SMALL, MEDIUM, LARGE = 0, 1, 2


def size_class(longer_side: torch.Tensor, bounds: Sequence[float] = (32.0, 96.0)) -> torch.Tensor:
    """0 (small: longer side < bounds[0]), 1 (medium: up to bounds[1]) or 2 (large: above it),
    as int64 of the same shape; sides in input pixels."""
    low, high = bounds
    return (longer_side >= low).long() + (longer_side > high).long()


def attention_targets(
    boxes: torch.Tensor,
    map_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    image_size: tuple[int, int],
    bounds: Sequence[float] = (32.0, 96.0),
) -> list[torch.Tensor]:
    """One (h, w) map per size class (small, medium, large), 1 at the cell holding the centre of
    each box of that class, 0 elsewhere (the official ``create_attention_mask``).

    boxes (M, 4) xyxy in input pixels are clipped to the image first; a box with nothing left
    inside it marks no map.
    """
    height, width = image_size
    clipped = boxes.float().clone()  # (M, 4)
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    sides = clipped[:, 2:] - clipped[:, :2]  # (M, 2)
    keep = (sides > 0).all(dim=1)  # (M,)
    clipped, sides = clipped[keep], sides[keep]
    owner = size_class(sides.amax(dim=1), bounds)  # (K,)
    centres = (clipped[:, :2] + clipped[:, 2:]) / 2  # (K, 2) x, y
    maps = []
    for level, ((map_h, map_w), stride) in enumerate(zip(map_sizes, strides)):
        target = torch.zeros(map_h, map_w, device=boxes.device)
        cells = (centres[owner == level] / stride).floor().long()  # (K_l, 2)
        target[cells[:, 1].clamp(0, map_h - 1), cells[:, 0].clamp(0, map_w - 1)] = 1.0
        maps.append(target)
    return maps


class SaccadeTarget(CornerTarget):
    """CornerNet's corner targets (:class:`CornerTarget`), plus the attention maps' targets
    (:func:`attention_targets`).

    Args:
        min_overlap: as :class:`CornerTarget`; 0.5 in the official Saccade config.
        radius_formula: as :class:`CornerTarget`.
        size_bounds: longer box sides, in input pixels, that split small from medium and
            medium from large objects (32, 96).
    """

    def __init__(
        self,
        *,
        min_overlap: float = 0.5,
        radius_formula: Literal["original", "corrected"] = "original",
        size_bounds: Sequence[float] = (32.0, 96.0),
    ) -> None:
        super().__init__(min_overlap=min_overlap, radius_formula=radius_formula)
        if len(size_bounds) != 2 or not 0 < size_bounds[0] < size_bounds[1]:
            raise ValueError(f"size_bounds must be two increasing positive sides, got {list(size_bounds)}")
        self.size_bounds = tuple(float(b) for b in size_bounds)

    @torch.no_grad()
    def attention(
        self,
        gt_boxes: torch.Tensor,
        map_sizes: Sequence[tuple[int, int]],
        strides: Sequence[int],
        image_size: tuple[int, int],
    ) -> list[torch.Tensor]:
        """:func:`attention_targets` with this assigner's size bounds."""
        return attention_targets(gt_boxes, map_sizes, strides, image_size, self.size_bounds)
