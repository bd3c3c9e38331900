"""Gaussian heatmaps of objects (CornerNet, CenterNet): the radius a point may move by,
and drawing one Gaussian per object on its class channel."""

from __future__ import annotations

from typing import Literal

import torch


def gaussian_radius(
    height: torch.Tensor | float,
    width: torch.Tensor | float,
    min_overlap: float = 0.7,
    formula: Literal["original", "corrected"] = "original",
) -> torch.Tensor:
    """Radius r such that a box whose corners move by up to r keeps IoU >= min_overlap.

    CornerNet solves three quadratics a r^2 - b r + c = 0 (both corners moved inward,
    both outward, one each way) and takes the smallest root. Its code, copied by CenterNet,
    uses (b + sqrt(b^2 - 4ac)) / 2 for all three: the wrong root for the first two and a
    missing factor 1/a (princeton-vl/CornerNet issue 110). In practice the minimum is
    then the third case times a3 = 4 * min_overlap (2.8 at 0.7): about three times the
    radius the geometry asks for. ``formula="corrected"`` uses the right roots (as
    mmdetection does).

    Default "original": it is what the CenterNet paper's COCO numbers and its loss
    weights (heatmap 1, size 0.1) were obtained with; the corrected radius shrinks the
    Gaussians about 3x (small objects become single-pixel peaks at stride 4), which
    changes the positive/negative balance of the penalty-reduced focal loss the paper tuned.
    """
    h = torch.as_tensor(height, dtype=torch.float64)
    w = torch.as_tensor(width, dtype=torch.float64)
    o = min_overlap
    a1, b1, c1 = 1.0, h + w, w * h * (1 - o) / (1 + o)
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - o) * w * h
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    sq1 = torch.sqrt(b1**2 - 4 * a1 * c1)
    sq2 = torch.sqrt(b2**2 - 4 * a2 * c2)
    sq3 = torch.sqrt(b3**2 - 4 * a3 * c3)
    if formula == "original":
        r1, r2, r3 = (b1 + sq1) / 2, (b2 + sq2) / 2, (b3 + sq3) / 2
    elif formula == "corrected":
        r1, r2, r3 = (b1 - sq1) / (2 * a1), (b2 - sq2) / (2 * a2), (b3 + sq3) / (2 * a3)
    else:
        raise ValueError(f"formula must be 'original' or 'corrected', got {formula!r}")
    return torch.minimum(torch.minimum(r1, r2), r3)


def check_radius_settings(min_overlap: float, radius_formula: str) -> None:
    """ValueError for settings :func:`gaussian_radius` cannot use (the heatmap targets' check)."""
    if not 0 < min_overlap < 1:
        raise ValueError(f"min_overlap must be in (0, 1), got {min_overlap}")
    if radius_formula not in ("original", "corrected"):
        raise ValueError(f"radius_formula must be 'original' or 'corrected', got {radius_formula!r}")


def object_radii(
    box_w: torch.Tensor, box_h: torch.Tensor, min_overlap: float, formula: Literal["original", "corrected"], min_radius: int = 0
) -> torch.Tensor:
    """(K,) float32 Gaussian radii, whole cells, of boxes (K,) wide and high in output cells:
    :func:`gaussian_radius` of the box rounded up, floored, at least ``min_radius``."""
    radius = gaussian_radius(box_h.ceil(), box_w.ceil(), min_overlap, formula)  # (K,) float64
    return radius.floor().clamp(min=min_radius).to(torch.float32).to(box_w.device)


def draw_gaussians(
    cells: torch.Tensor, radius: torch.Tensor, labels: torch.Tensor, num_classes: int, output_size: tuple[int, int]
) -> torch.Tensor:
    """A (C, h, w) heatmap with one Gaussian per object, peaking at exactly 1 on its cell.

    cells (K, 2) integer (x, y) cells as floats, radius (K,) in cells, labels (K,). Sigma is
    diameter / 6 with diameter 2r + 1, the Gaussian is cut to the (2r+1)^2 window, and
    overlapping Gaussians of one class take the element-wise max (not the sum).
    """
    out_h, out_w = output_size
    device = cells.device
    sigma = (2 * radius + 1) / 6  # (K,)
    dx = torch.arange(out_w, device=device, dtype=torch.float32)[None, :] - cells[:, 0:1]  # (K, w)
    dy = torch.arange(out_h, device=device, dtype=torch.float32)[None, :] - cells[:, 1:2]  # (K, h)
    gx = torch.exp(-(dx**2) / (2 * sigma[:, None] ** 2)) * (dx.abs() <= radius[:, None])  # (K, w)
    gy = torch.exp(-(dy**2) / (2 * sigma[:, None] ** 2)) * (dy.abs() <= radius[:, None])  # (K, h)
    gaussians = gy[:, :, None] * gx[:, None, :]  # (K, h, w)

    heatmap = torch.zeros(num_classes, out_h * out_w, device=device)  # (C, h*w)
    if labels.numel() > 0:
        index = labels[:, None].expand(-1, out_h * out_w)  # (K, h*w)
        heatmap.scatter_reduce_(0, index, gaussians.reshape(len(labels), -1), reduce="amax")
    return heatmap.view(num_classes, out_h, out_w)
