"""A synthetic COCO data set of simple shapes: the embedded default.

Three classes told apart by shape (rectangle, ellipse, triangle), in random
colours, from small to large, with partial overlaps, on textured and noisy
backgrounds, and some images with no objects at all. The layout matches a real
COCO download (``annotations/instances_{train,val}.json`` + ``images/*.jpg``) so
every later step treats it like real data. Same seed, same bytes.
"""

from __future__ import annotations

import json
from io import BytesIO
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from anchorless.files import write_atomic

CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]

# Shapes may overlap, but never hide more than this fraction of the smaller one:
# a shape mostly covered by another is no longer recognisable as its class.
MAX_COVERED_FRACTION = 0.3


@dataclass(frozen=True)
class SynthSpec:
    num_images: int = 200
    size: int = 192
    seed: int = 0
    val_fraction: float = 0.2
    max_objects: int = 6
    empty_fraction: float = 0.05
    min_object_fraction: float = 0.08
    max_object_fraction: float = 0.5


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth colour gradient, a few faint stripes and pixel noise."""
    top, bottom = rng.uniform(40, 215, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    pixels = top * (1 - ramp) + bottom * ramp  # (size, 1, 3)
    pixels = np.broadcast_to(pixels, (size, size, 3)).copy()
    for _ in range(rng.integers(0, 4)):
        period = rng.uniform(6, 30)
        phase = rng.uniform(0, 2 * np.pi)
        axis = np.arange(size)[None, :] if rng.random() < 0.5 else np.arange(size)[:, None]
        pixels += (12 * np.sin(axis / period + phase))[..., None]
    pixels += rng.normal(0, rng.uniform(3, 14), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _covered_fraction(box: list[float], others: list[list[float]]) -> float:
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    worst = 0.0
    for ox0, oy0, ox1, oy1 in others:
        inter = max(0.0, min(x1, ox1) - max(x0, ox0)) * max(0.0, min(y1, oy1) - max(y0, oy0))
        other_area = (ox1 - ox0) * (oy1 - oy0)
        worst = max(worst, inter / min(area, other_area))
    return worst


def _draw_image(rng: np.random.Generator, spec: SynthSpec) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    image = _background(rng, spec.size)
    draw = ImageDraw.Draw(image)
    objects: list[tuple[int, list[float]]] = []
    wanted = 0 if rng.random() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    for _ in range(wanted * 10):  # bounded rejection sampling
        if len(objects) == wanted:
            break
        side = spec.size * np.exp(
            rng.uniform(np.log(spec.min_object_fraction), np.log(spec.max_object_fraction))
        )
        w = max(6.0, side * rng.uniform(0.7, 1.3))
        h = max(6.0, side * rng.uniform(0.7, 1.3))
        x0 = rng.uniform(0, spec.size - w)
        y0 = rng.uniform(0, spec.size - h)
        box = [x0, y0, x0 + w, y0 + h]
        if _covered_fraction(box, [b for _, b in objects]) > MAX_COVERED_FRACTION:
            continue
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        outline = tuple(max(0, c - 60) for c in colour)
        if category == 1:
            draw.rectangle(box, fill=colour, outline=outline)
        elif category == 2:
            draw.ellipse(box, fill=colour, outline=outline)
        else:
            apex = x0 + rng.uniform(0.2, 0.8) * w
            points = [(apex, y0), (x0 + w, y0 + h), (x0, y0 + h)]
            if rng.random() < 0.5:  # upside down
                points = [(apex, y0 + h), (x0 + w, y0), (x0, y0)]
            draw.polygon(points, fill=colour, outline=outline)
        objects.append((category, box))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return image, objects


def generate_synthetic_coco(
    out_dir: str | Path,
    *,
    num_images: int = 200,
    size: int = 192,
    seed: int = 0,
    val_fraction: float = 0.2,
    max_objects: int = 6,
    empty_fraction: float = 0.05,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the data set; returns the annotation file of each split."""
    spec = SynthSpec(
        num_images=num_images,
        size=size,
        seed=seed,
        val_fraction=val_fraction,
        max_objects=max_objects,
        empty_fraction=empty_fraction,
    )
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2 (one per split), got {num_images}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    annotations_dir = out_dir / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    num_val = max(1, int(round(num_images * val_fraction)))
    splits = {"train": range(num_images - num_val), "val": range(num_images - num_val, num_images)}
    files: dict[str, Path] = {}
    with tqdm(total=num_images, desc="synth", unit="img", disable=not progress) as bar:
        for split, indices in splits.items():
            coco = {"images": [], "annotations": [], "categories": CATEGORIES}
            for index in indices:
                image, objects = _draw_image(rng, spec)
                file_name = f"synth_{index:06d}.jpg"
                # JPEG encoding is deterministic for the same pixels and settings.
                buffer = BytesIO()
                image.save(buffer, format="JPEG", quality=92)
                write_atomic(images_dir / file_name, buffer.getvalue())
                image_id = index + 1
                coco["images"].append(
                    {"id": image_id, "file_name": file_name, "width": spec.size, "height": spec.size}
                )
                for category, (x0, y0, x1, y1) in objects:
                    w, h = x1 - x0, y1 - y0
                    coco["annotations"].append(
                        {
                            "id": len(coco["annotations"]) + 1,
                            "image_id": image_id,
                            "category_id": category,
                            "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                            "area": round(w * h, 2),
                            "iscrowd": 0,
                        }
                    )
                bar.update(1)
            path = annotations_dir / f"instances_{split}.json"
            write_atomic(path, json.dumps(coco).encode())
            files[split] = path
    return files
