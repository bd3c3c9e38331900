"""Box coding of point-based detectors: a location and its distances to the box sides."""

from __future__ import annotations

import torch


def decode_ltrb(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """xyxy boxes from locations (..., 2) as (x, y) and distances (..., 4) as (l, t, r, b).

    Broadcasts, so (R, 2) locations decode a batch (B, R, 4) of distances into (B, R, 4).
    """
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)
