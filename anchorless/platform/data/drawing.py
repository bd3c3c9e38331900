"""Boxes drawn on images: the one drawing stack of the project (torchvision's
``draw_bounding_boxes``), used by shard inspection, prediction and the evaluation
pictures logged to MLflow, with one palette so a class has one colour everywhere."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# A qualitative palette (one colour per label, cycling): readable on photos.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
]
GROUND_TRUTH_COLOR = (255, 255, 255)


def class_color(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def to_hwc_uint8(image: Any) -> np.ndarray:
    """An image array (H,W,3) or (3,H,W), uint8 or float in [0,1], numpy or torch, as (H,W,3) uint8."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"expected an image with 3 dimensions, got shape {array.shape}")
    if array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.transpose(array, (1, 2, 0))
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def draw_boxes(
    image: Any,
    boxes: Any,
    *,
    texts: Sequence[str] | None = None,
    colors: Sequence[tuple[int, int, int]] | tuple[int, int, int] | None = None,
    width: int = 2,
) -> np.ndarray:
    """``image`` with xyxy ``boxes`` (in its pixels) drawn; returns (H,W,3) uint8."""
    import torch
    from torchvision.utils import draw_bounding_boxes

    hwc = to_hwc_uint8(image)
    if not hwc.flags.writeable:  # torch refuses to wrap a read-only array (a PIL image's, a batch's)
        hwc = hwc.copy()
    box_tensor = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    if box_tensor.numel() == 0:
        return hwc
    height, width_px = hwc.shape[:2]
    box_tensor[:, 0::2] = box_tensor[:, 0::2].clamp(0, width_px - 1)
    box_tensor[:, 1::2] = box_tensor[:, 1::2].clamp(0, height - 1)
    if isinstance(colors, list):
        colors = [tuple(color) for color in colors]
    drawn = draw_bounding_boxes(
        torch.from_numpy(hwc).permute(2, 0, 1),
        box_tensor,
        labels=list(texts) if texts is not None else None,
        colors=colors,
        width=width,
    )
    return np.ascontiguousarray(drawn.permute(1, 2, 0).numpy())


def draw_coco_detections(
    image: Any,
    detections: Iterable[Mapping[str, Any]],
    category_names: Mapping[int, str],
    *,
    scale: float = 1.0,
    score_threshold: float = 0.0,
    ground_truth: Iterable[Mapping[str, Any]] = (),
) -> np.ndarray:
    """Draw COCO-style records (``bbox`` xywh, ``category_id``, ``score``) on an image.

    ``scale`` maps the records' pixels to the image's (e.g. network px / original px
    for a letterboxed image); ground-truth boxes, if given, are drawn thin and white.
    """
    category_ids = sorted(category_names)
    color_index = {category_id: index for index, category_id in enumerate(category_ids)}

    def xyxy(record: Mapping[str, Any]) -> list[float]:
        x, y, w, h = record["bbox"]
        return [x * scale, y * scale, (x + w) * scale, (y + h) * scale]

    truth = list(ground_truth)
    hwc = to_hwc_uint8(image)
    if truth:
        hwc = draw_boxes(hwc, [xyxy(record) for record in truth], colors=GROUND_TRUTH_COLOR, width=1)
    kept = sorted((d for d in detections if d.get("score", 1.0) >= score_threshold), key=lambda d: d.get("score", 1.0))
    if not kept:
        return hwc
    texts = [f"{category_names.get(d['category_id'], d['category_id'])} {d.get('score', 1.0):.2f}" for d in kept]
    colors = [class_color(color_index.get(d["category_id"], 0)) for d in kept]
    return draw_boxes(hwc, [xyxy(d) for d in kept], texts=texts, colors=colors, width=2)


def image_grid(images: Sequence[Any], *, columns: int = 4, tile: int = 256, padding: int = 4) -> np.ndarray:
    """Images of any sizes fitted (aspect kept) into square tiles of a grid; (H,W,3) uint8."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    if not images:
        raise ValueError("image_grid needs at least one image")
    tiles = []
    for image in images:
        hwc = to_hwc_uint8(image)
        pil = Image.fromarray(hwc)
        pil.thumbnail((tile, tile), Image.Resampling.BILINEAR)
        canvas = np.zeros((tile, tile, 3), dtype=np.uint8)
        canvas[: pil.height, : pil.width] = np.asarray(pil)
        tiles.append(torch.from_numpy(canvas).permute(2, 0, 1))
    grid = make_grid(tiles, nrow=min(columns, len(tiles)), padding=padding, pad_value=0)
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())
