"""An exported ONNX graph run by onnxruntime, on numpy alone (no torch).

The graph's contract (written by :mod:`.onnx`): input ``images``, float32 ``(N, 3, S, S)``
RGB in 0-255 letterboxed to the model's size S; outputs ``boxes (N, K, 4)`` xyxy in those
pixels, ``scores (N, K)``, ``labels (N, K)``, best first, padded with score 0; the model's
categories and size in the file's metadata props. :class:`OnnxDetector` is ``anchorless
predict``'s path on it: decode, letterbox (:func:`~anchorless.platform.data.images.letterbox_array`,
the same pixels), run, map back to the original pixels. The ONNX model server
(:mod:`.onnx_pyfunc`) and the export benchmark use it; the parity check on export
(:func:`unmatched_detections`) is here too, for every runtime a graph is checked in.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from anchorless import __version__
from anchorless.errors import AnchorlessError, ModelError
from anchorless.platform.data.images import decode_image_array, letterbox_array
from anchorless.platform.models.detections import original_pixels

ONNX_FILE = "model.onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels")
# Parity on export: the same top detections, boxes within 1e-3 relative, scores within 1e-4.
BOX_RTOL, SCORE_ATOL = 1e-3, 1e-4
_META = "anchorless."  # prefix of our metadata props


def onnx_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """An export's meta as ONNX metadata props (strings; the category table as JSON)."""
    return {
        f"{_META}categories": json.dumps(meta["categories"]),
        f"{_META}image_size": str(int(meta["image_size"])),
        f"{_META}manifest_sha256": str(meta.get("manifest_sha256") or ""),
        f"{_META}version": __version__,
        f"{_META}detector": str(meta["config"]["detector"]["name"]),
        f"{_META}input": "float32 (N, 3, S, S) RGB in 0-255, letterboxed to S = image_size",
    }


def metadata_from_props(props: Mapping[str, str]) -> dict[str, Any] | None:
    """The meta :func:`onnx_metadata` wrote (categories decoded); None for a graph without it."""
    if f"{_META}categories" not in props:
        return None
    return {
        "categories": json.loads(props[f"{_META}categories"]),
        "image_size": int(props[f"{_META}image_size"]),
        "manifest_sha256": props.get(f"{_META}manifest_sha256") or None,
        "anchorless_version": props.get(f"{_META}version"),
        "detector": props.get(f"{_META}detector"),
    }


def onnxruntime_session(model: bytes | str | os.PathLike[str], *, threads: int | None = None):
    """A CPU onnxruntime session; ``threads`` caps its intra-op threads (default: onnxruntime's, all cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """Detections from an onnxruntime session for a (N, 3, S, S) float32 batch in 0-255."""
    boxes, scores, labels = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, np.float32)})
    return {"boxes": boxes, "scores": scores, "labels": labels}


def unmatched_detections(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], *, image_side: float) -> int:
    """How many of ``want``'s detections (one image: boxes (K, 4), scores (K,), labels (K,))
    have no equal in ``got``: the same label, the score within 1e-4 and the box within 1e-3
    of the image side. Matched as sets, not rank by rank: two detections whose scores differ
    in the 8th digit may swap places between runtimes. Padding (score 0) and detections
    within the tolerance of the last one kept (which the other runtime may have cut) are
    not asked for."""
    scores = want["scores"]
    floor = scores[-1] + SCORE_ATOL if scores[-1] > 0 else SCORE_ATOL
    used = np.zeros(len(got["scores"]), dtype=bool)
    missing = 0
    for box, score, label in zip(want["boxes"], scores, want["labels"]):
        if score <= floor:
            continue
        close = (
            ~used
            & (got["labels"] == label)
            & (np.abs(got["scores"] - score) <= SCORE_ATOL)
            & (np.abs(got["boxes"] - box).max(axis=1) <= BOX_RTOL * image_side)
        )
        if close.any():
            used[np.flatnonzero(close)[0]] = True
        else:
            missing += 1
    return missing


def require_agreement(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], *, image_side: float, runtime: str, artifact: str) -> None:
    """A :class:`ModelError` unless two padded batches of detections ((N, K, 4), (N, K), (N, K)),
    ``runtime``'s (``got``) and torch's (``want``), agree image by image
    (:func:`unmatched_detections`); the error says ``artifact`` was not written."""
    if got["boxes"].shape != want["boxes"].shape:
        raise ModelError(f"{runtime} gave boxes {got['boxes'].shape}, torch {want['boxes'].shape}; {artifact} was not written")
    for image in range(len(want["scores"])):
        missing = unmatched_detections(
            {key: value[image] for key, value in got.items()}, {key: value[image] for key, value in want.items()},
            image_side=image_side,
        )  # fmt: skip
        if missing:
            raise ModelError(
                f"{runtime} and torch disagree on check image {image} ({missing} of torch's detections have no "
                f"equal within boxes {BOX_RTOL:g} of the side, scores {SCORE_ATOL:g}); {artifact} was not written"
            )


class OnnxDetector:
    """``anchorless predict``'s path on an exported graph, without torch: (H, W, 3) uint8 RGB
    images in, detections in their original pixels out (numpy ``boxes``, ``scores``, ``labels``)."""

    def __init__(self, model: bytes | str | os.PathLike[str], *, threads: int | None = None) -> None:
        name = "the ONNX graph" if isinstance(model, bytes) else str(model)
        try:
            self.session = onnxruntime_session(model, threads=threads)
        except Exception as exc:  # onnxruntime's own exception types are not importable by a stable name
            raise AnchorlessError(f"{name}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
        meta = metadata_from_props(self.session.get_modelmeta().custom_metadata_map)
        if meta is None:
            raise AnchorlessError(f"{name}: not an anchorless ONNX export (no anchorless metadata)")
        self.meta = meta

    def detect(
        self, images: Sequence[np.ndarray], *, score_threshold: float = 0.0, batch_size: int = 8
    ) -> list[dict[str, np.ndarray]]:
        size = self.meta["image_size"]
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            letterboxed = [letterbox_array(image, size) for image in chunk]
            batch = np.stack([pixels for pixels, _ in letterboxed]).astype(np.float32)
            out = run_onnx(self.session, batch)
            for index, (image, (_, scale)) in enumerate(zip(chunk, letterboxed)):
                real = out["scores"][index] > 0  # the graph pads with score 0
                detections = (out[key][index][real] for key in OUTPUT_NAMES)
                results.append(original_pixels(*detections, scale, image.shape[1], image.shape[0], score_threshold))
        return results

    def detect_encoded(self, encoded: Sequence[bytes], *, score_threshold: float = 0.0) -> list[dict[str, np.ndarray]]:
        """:meth:`detect` on encoded image bytes (JPEG, PNG, ...), decoded as everywhere else."""
        images = [decode_image_array(data, f"input row {row}") for row, data in enumerate(encoded)]
        return self.detect(images, score_threshold=score_threshold)
