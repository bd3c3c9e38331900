"""Detections as the served models give them, on numpy and pandas alone (no torch).

Shared by the torch pyfunc (:mod:`.pyfunc`), prediction on files (:mod:`.predict`) and the
ONNX model server (:mod:`.onnx_pyfunc`), so every path answers alike:

- the request: a DataFrame with one column ``image`` of encoded image bytes (JPEG, PNG, ...;
  base64 in MLflow's JSON), any size, and the param ``score_threshold`` (default 0.3);
- network-pixel detections mapped back to the original image (:func:`original_pixels`);
- the answer: one row per detection (:func:`detections_frame`): ``image_index`` (row of the
  input), ``category_id``, ``category_name``, ``score`` and ``x, y, width, height`` in the
  original image's pixels.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from anchorless.errors import DataError

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("image_index", "category_id", "category_name", "score", "x", "y", "width", "height")
DEFAULT_SCORE_THRESHOLD = 0.3


def original_pixels(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    scale: float,
    width: int,
    height: int,
    score_threshold: float = 0.0,
) -> dict[str, np.ndarray]:
    """Network-pixel detections → original pixels, clipped to the image (the letterbox padding
    is not image); those under ``score_threshold`` or left with no area are dropped."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / float(scale)  # (N, 4), float32 as torch's
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)  # (N,)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)  # (N,)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    keep = (scores >= score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def score_threshold(params: Mapping[str, Any] | None) -> float:
    return float((params or {}).get("score_threshold", DEFAULT_SCORE_THRESHOLD))


def encoded_images(model_input: Any) -> list[bytes]:
    """The request's image bytes, in row order (a DataFrame's ``image`` column, or the column itself)."""
    if hasattr(model_input, "columns"):
        if IMAGE_COLUMN not in model_input.columns:
            raise DataError(f"the input has no {IMAGE_COLUMN!r} column (columns: {list(model_input.columns)})")
        model_input = model_input[IMAGE_COLUMN]
    return [bytes(data) for data in model_input]


@contextlib.contextmanager
def bad_request_errors() -> Iterator[None]:
    """A request the model cannot use (:class:`DataError`: not an image, too many pixels, no
    ``image`` column) raised as MLflow's invalid-parameter error, which its scoring server
    answers with HTTP 400 and this message (any other error gets a generic one)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except DataError as exc:
        raise MlflowException.invalid_parameter_value(str(exc)) from None


def detections_frame(detections: Sequence[Mapping[str, Any]], categories: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per detection (see the module docstring) from per-image ``boxes`` xyxy (original
    pixels), ``scores`` and contiguous ``labels`` (numpy arrays or tensors: anything with ``tolist``)."""
    category_of = {int(c["label"]): int(c["coco_id"]) for c in categories}
    names = {int(c["coco_id"]): c["name"] for c in categories}
    rows = []
    for index, detection in enumerate(detections):
        columns = (detection["boxes"].tolist(), detection["scores"].tolist(), detection["labels"].tolist())
        for box, score, label in zip(*columns):
            category_id = category_of[int(label)]
            x0, y0, x1, y1 = box
            rows.append((index, category_id, names[category_id], float(score), x0, y0, x1 - x0, y1 - y0))
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    return frame.astype({"image_index": "int64", "category_id": "int64", "score": "float64"})


def pyfunc_signature():
    """The MLflow signature both pyfunc models (torch's and ONNX's) are logged with."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec("long", "image_index"),
                ColSpec("long", "category_id"),
                ColSpec("string", "category_name"),
                ColSpec("double", "score"),
                *(ColSpec("double", name) for name in ("x", "y", "width", "height")),
            ]
        ),
        params=ParamSchema([ParamSpec("score_threshold", "double", DEFAULT_SCORE_THRESHOLD)]),
    )


def pinned_requirements(*packages: str) -> list[str]:
    """The packages pinned to what is running, so MLflow's loader infers nothing (slow, guesses)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def example_input() -> pd.DataFrame:
    """A one-row input: a small grey PNG."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (48, 32), (114, 114, 114)).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})
