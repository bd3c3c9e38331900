"""Detections on images: letterboxed exactly as evaluation does, mapped back to the
original pixels; for image files, written as COCO-style JSON plus a copy of each
image with its boxes drawn.

:func:`detect` and :func:`to_original_pixels` are shared with offline evaluation,
training's validation and the MLflow pyfunc model, so every path from pixels to
detections is the same one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from anchorless.errors import DataError
from anchorless.files import atomic_path, write_json_atomic
from anchorless.platform.data.drawing import draw_coco_detections
from anchorless.platform.data.images import read_image
from anchorless.platform.data.transforms import letterbox_images
from anchorless.platform.models.detections import original_pixels
from anchorless.platform.models.loading import load_model

log = logging.getLogger(__name__)

DETECTIONS_FILE = "detections.json"


# --- detections ---------------------------------------------------------------------------------


def to_original_pixels(
    detection: Mapping[str, torch.Tensor], scale: float, width: int, height: int, score_threshold: float = 0.0
) -> dict[str, torch.Tensor]:
    """Network-pixel detections → original pixels, clipped to the image (the letterbox padding is not image).

    :func:`~anchorless.platform.models.detections.original_pixels` on tensors: one definition
    for every path, the torch-free ONNX server's included."""
    arrays = [torch.as_tensor(detection[key]).detach().cpu().numpy() for key in ("boxes", "scores", "labels")]
    kept = original_pixels(*arrays, scale, width, height, score_threshold)
    return {key: torch.from_numpy(value) for key, value in kept.items()}


def batch_to_original_pixels(
    detections: Sequence[Mapping[str, torch.Tensor]], meta: Mapping[str, Any]
) -> list[dict[str, torch.Tensor]]:
    """:func:`to_original_pixels` for each image of a pipeline batch; ``meta`` holds per image
    ``scale``, ``orig_width`` and ``orig_height`` (a batch's numpy columns or its tensors)."""
    return [
        to_original_pixels(detection, float(meta["scale"][i]), int(meta["orig_width"][i]), int(meta["orig_height"][i]))
        for i, detection in enumerate(detections)
    ]


def detect(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    *,
    image_size: int,
    score_threshold: float = 0.0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """Detections for (3, H, W) uint8 images in their original pixels: letterbox, predict, map back."""
    results: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch, scales = letterbox_images(chunk, image_size)
        with torch.inference_mode():
            detections = model.predict(batch.to(device).float().div_(255.0))
        for image, detection, scale in zip(chunk, detections, scales):
            width, height = int(image.shape[-1]), int(image.shape[-2])
            results.append(to_original_pixels(detection, scale, width, height, score_threshold))
    return results


# --- files out ----------------------------------------------------------------------------------


def predict_images(
    model_source: Any,
    image_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    score_threshold: float = 0.3,
    batch_size: int = 8,
    tracking_uri: str | None = None,
    progress: bool = True,
) -> Path:
    """Detect objects in image files; returns the path of ``out_dir/detections.json``.

    Args:
        model_source: a ``.pt`` export, a directory holding one, an MLflow model URI
            (``models:/NAME/VERSION``, ``models:/NAME@alias``, ``runs:/RUN/model``), or a
            ``(model, meta)`` pair from :func:`anchorless.platform.models.loading.load_model`.
        image_paths: image files (JPEG, PNG, and what PIL reads); a missing or
            unreadable one is an error naming it, raised before the model loads.
        out_dir: gets ``detections.json`` (COCO style: ``images``, ``annotations``
            with ``bbox`` xywh in original pixels, ``category_id``, ``category_name``,
            ``score``; ``categories``) and one drawn copy per image, named after it.
        score_threshold: detections below it are left out of the JSON and the drawings.
        tracking_uri: where ``models:/`` URIs resolve (see :func:`~anchorless.platform.models.loading.load_model`).
    """
    from tqdm import tqdm

    paths = [Path(path) for path in image_paths]
    if not paths:
        raise DataError("predict: no image files given")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: no such image file{more}")
    model, meta = load_model(model_source, tracking_uri=tracking_uri)
    image_size = int(meta["image_size"])
    categories = meta["categories"]
    category_of = {int(c["label"]): int(c["coco_id"]) for c in categories}
    names = {int(c["coco_id"]): c["name"] for c in categories}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images_json, annotations = [], []
    used_names: set[str] = set()
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixels = [read_image(path) for path in chunk]
        detections = detect(
            model, pixels, image_size=image_size, score_threshold=score_threshold, batch_size=batch_size
        )
        for offset, (path, image, detection) in enumerate(zip(chunk, pixels, detections)):
            image_id = start + offset + 1
            records = coco_records(detection, image_id, category_of, names, first_id=len(annotations) + 1)
            annotations.extend(records)
            drawn = draw_coco_detections(image, records, names)
            drawn_path = out / _unique_name(path, used_names)
            _save_image_atomic(drawn, drawn_path)
            images_json.append(
                {
                    "id": image_id,
                    "file_name": str(path),
                    "width": int(image.shape[-1]),
                    "height": int(image.shape[-2]),
                    "drawn": drawn_path.name,
                }
            )
        bar.update(len(chunk))
    bar.close()
    document = {
        "model": str(meta.get("source", model_source)),
        "score_threshold": score_threshold,
        "images": images_json,
        "annotations": annotations,
        "categories": [{"id": int(c["coco_id"]), "name": c["name"]} for c in categories],
    }
    target = out / DETECTIONS_FILE
    write_json_atomic(target, document, indent=1)
    log.info("%d detections on %d images -> %s", len(annotations), len(paths), target)
    return target


def coco_records(
    detection: Mapping[str, torch.Tensor],
    image_id: int,
    category_of: Mapping[int, int],
    names: Mapping[int, str],
    *,
    first_id: int = 1,
) -> list[dict[str, Any]]:
    """Original-pixel detections of one image as COCO annotation records, best score first."""
    order = torch.argsort(detection["scores"], descending=True, stable=True)
    records = []
    for index in order.tolist():
        x0, y0, x1, y1 = (float(v) for v in detection["boxes"][index])
        category_id = category_of[int(detection["labels"][index])]
        records.append(
            {
                "id": first_id + len(records),
                "image_id": image_id,
                "category_id": category_id,
                "category_name": names[category_id],
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round((x1 - x0) * (y1 - y0), 2),
                "score": round(float(detection["scores"][index]), 5),
            }
        )
    return records


def _unique_name(path: Path, used: set[str]) -> str:
    suffix = ".png" if path.suffix.lower() == ".png" else ".jpg"
    stem, name, counter = path.stem, path.stem + suffix, 1
    while name in used or name == DETECTIONS_FILE:
        counter += 1
        name = f"{stem}-{counter}{suffix}"
    used.add(name)
    return name


def _save_image_atomic(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG" if path.suffix == ".png" else "JPEG", quality=90)
