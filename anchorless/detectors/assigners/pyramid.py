"""The assignment of the FPN detectors by config: FCOS's point rule or ATSS.

Shapes: R = locations of all levels of one image, M = its ground-truth boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from anchorless.detectors.assigners.atss import ATSSAssigner
from anchorless.detectors.assigners.base import AssignResult
from anchorless.detectors.assigners.point import PointAssigner


class PyramidAssigner(nn.Module):
    """FCOS's assignment, switchable to ATSS (``kind``); both take the same inputs and return
    one ground truth per positive location.

    Args:
        size_ranges, center_sampling_radius: :class:`PointAssigner` ("point" only).
        kind: "point" (FCOS, the default) or "atss" (the paper's "FCOS + ATSS": ATSS in
            place of the size ranges and centre sampling).
        topk, anchor_scale: :class:`ATSSAssigner` ("atss" only): candidates per level (9),
            each location's anchor side in strides (8).
    """

    def __init__(
        self,
        *,
        size_ranges: Sequence[float] = (-1.0, 64.0, 128.0, 256.0, 512.0, math.inf),
        center_sampling_radius: float = 1.5,
        kind: Literal["point", "atss"] = "point",
        topk: int = 9,
        anchor_scale: float = 8.0,
    ) -> None:
        super().__init__()
        if kind == "point":
            self.rule: nn.Module = PointAssigner(size_ranges=size_ranges, center_sampling_radius=center_sampling_radius)
        elif kind == "atss":
            self.rule = ATSSAssigner(topk=topk, anchor_scale=anchor_scale)
        else:
            raise ValueError(f"kind must be 'point' or 'atss', got {kind!r}")
        self.kind = kind

    @property
    def num_levels(self) -> int | None:
        """Levels the size ranges describe; None for ATSS, which fits any number."""
        return self.rule.num_levels if self.kind == "point" else None

    def forward(
        self,
        points: torch.Tensor,
        point_strides: torch.Tensor,
        point_levels: torch.Tensor,
        gt_boxes: torch.Tensor,
    ) -> AssignResult:
        """points (R, 2), point_strides (R,), point_levels (R,), gt_boxes (M, 4)."""
        return self.rule(points, point_strides, point_levels, gt_boxes)
