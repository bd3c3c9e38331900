"""A model as one ONNX graph, from image tensor to detections, checked against torch.

The graph takes a float image batch ``(N, 3, S, S)`` in 0-255 at the model's training
size ``S`` (letterboxed outside, by :func:`~anchorless.platform.data.transforms.letterbox_images`,
the helper ``predict`` uses) and returns ``boxes (N, K, 4)`` xyxy in those pixels,
``scores (N, K)`` and ``labels (N, K)``, K the model's maximum detections, padded with
score 0. Normalisation, the network and the decoding are inside: top-k for the NMS-free
detectors, ONNX's ``NonMaxSuppression`` (what torchvision's NMS exports to) where NMS
is on. BatchNorm is folded first, as in every served model. The model's categories,
image size, data manifest checksum and anchorless version ride along in the ONNX
metadata, so the file is all a deployment needs.

Every export is run by onnxruntime on real images and compared with torch before it is
written; a mismatch is an error.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from anchorless import __version__
from anchorless.errors import AnchorlessError
from anchorless.files import atomic_path
from anchorless.platform.data.images import decode_image_bytes, read_image
from anchorless.platform.data.shards import iter_shard_tables, read_manifest
from anchorless.platform.data.transforms import letterbox_images
from anchorless.platform.models.export import ModelError
from anchorless.platform.models.loading import load_model
from anchorless.platform.tracking.store import TAG_FORMATS, resolve_tracking_uri

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# Opset 18: the newest every onnxruntime of the last two years runs, and the dynamo
# exporter's own default (its translations are written against it).
OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels")
# Parity on export: the same top detections, boxes within 1e-3 relative, scores within 1e-4.
BOX_RTOL, SCORE_ATOL = 1e-3, 1e-4


class DetectionGraph(torch.nn.Module):
    """What the ONNX graph computes: 0-255 images in, padded detections out."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        padded = self.detector.predict_padded(images / 255.0)
        return padded["boxes"], padded["scores"], padded["labels"]


def onnx_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """The export's meta as ONNX metadata props (strings; the category table as JSON)."""
    return {
        "anchorless.categories": json.dumps(meta["categories"]),
        "anchorless.image_size": str(int(meta["image_size"])),
        "anchorless.manifest_sha256": str(meta.get("manifest_sha256") or ""),
        "anchorless.version": __version__,
        "anchorless.detector": str(meta["config"]["detector"]["name"]),
        "anchorless.input": "float32 (N, 3, S, S) RGB in 0-255, letterboxed to S = image_size",
    }


def export_onnx(
    model: torch.nn.Module,
    meta: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    check_images: Sequence[torch.Tensor],
) -> Path:
    """Write ``out_dir/model.onnx`` for a loaded (BatchNorm-folded) model, after checking
    onnxruntime's detections on ``check_images`` ((3, H, W) uint8, letterboxed here) against torch's."""
    import onnx

    if not check_images:
        raise ModelError("ONNX export: no images to check the graph on")
    graph = DetectionGraph(model.eval()).eval()
    size = int(meta["image_size"])
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():  # the exporter narrates deprecations of torch's own internals
        warnings.simplefilter("ignore")
        # The dynamo-based exporter (torch.export + onnxscript): the TorchScript one is
        # deprecated, and this one translates torchvision's NMS to NonMaxSuppression.
        program = torch.onnx.export(
            graph, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            verbose=False,
        )  # fmt: skip
    proto = program.model_proto
    for key, value in onnx_metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    serialized = proto.SerializeToString()
    batch, _ = letterbox_images(list(check_images), size)
    check_parity(graph, serialized, batch.float())
    path = Path(out_dir) / ONNX_FILE
    with atomic_path(path, mode=0o644) as tmp:
        tmp.write_bytes(serialized)
    log.info("ONNX graph (opset %d) written to %s", OPSET, path)
    return path


def onnxruntime_session(model: bytes | str | os.PathLike[str]):
    import onnxruntime

    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """Detections from an onnxruntime session for a (N, 3, S, S) float32 batch in 0-255."""
    boxes, scores, labels = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, np.float32)})
    return {"boxes": boxes, "scores": scores, "labels": labels}


def check_parity(graph: DetectionGraph, onnx_bytes: bytes, images: torch.Tensor) -> None:
    """onnxruntime's detections must be torch's (see :func:`unmatched_detections`); raises ModelError."""
    with torch.inference_mode():
        want = dict(zip(OUTPUT_NAMES, (t.numpy() for t in graph(images))))
    got = run_onnx(onnxruntime_session(onnx_bytes), images.numpy())
    if got["boxes"].shape != want["boxes"].shape:
        raise ModelError(f"ONNX export: onnxruntime gave boxes {got['boxes'].shape}, torch {want['boxes'].shape}")
    for image in range(images.shape[0]):
        one = lambda d: {key: value[image] for key, value in d.items()}  # noqa: E731
        missing = unmatched_detections(one(got), one(want), image_side=float(images.shape[-1]))
        if missing:
            raise ModelError(
                f"ONNX export: onnxruntime and torch disagree on check image {image} ({missing} of torch's "
                "detections have no equal in onnxruntime's); the graph was not written"
            )


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


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta written by :func:`export_onnx` (categories decoded), from the file alone."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {entry.key: entry.value for entry in proto.metadata_props}
    if "anchorless.categories" not in props:
        raise ModelError(f"{path}: not an anchorless ONNX export (no anchorless metadata)")
    return {
        "categories": json.loads(props["anchorless.categories"]),
        "image_size": int(props["anchorless.image_size"]),
        "manifest_sha256": props.get("anchorless.manifest_sha256") or None,
        "anchorless_version": props.get("anchorless.version"),
        "detector": props.get("anchorless.detector"),
    }


# --- from a model reference to a file, and back into the registry ------------------------------

NUM_CHECK_IMAGES = 4


def check_images_from(meta: Mapping[str, Any], image_paths: Sequence[str | os.PathLike[str]] = ()) -> list[torch.Tensor]:
    """The images an export is checked on: the given files, else the first few of the model's
    own validation shards (its config's ``data.val``), else a clear error asking for files."""
    if image_paths:
        return [read_image(path) for path in image_paths]
    val = (meta.get("config") or {}).get("data", {}).get("val")
    if val:
        try:
            table = next(iter(iter_shard_tables(val, read_manifest(val))))
            rows = table.slice(0, NUM_CHECK_IMAGES).to_pylist()
            return [decode_image_bytes(row["image"], f"{val}: image id {row['image_id']}") for row in rows]
        except (AnchorlessError, OSError, StopIteration):
            pass
    raise ModelError(
        "ONNX export checks the graph on real images: pass some with --check-images "
        f"(the model's validation shards {val!r} are not readable here)" if val else
        "ONNX export checks the graph on real images: pass some with --check-images"
    )


def export_model(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    check_image_paths: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Export a ``.pt`` export, a run's model or a registered version to ``out_dir/model.onnx``.

    A registered version (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) also gets the
    file added to its logged model, beside the pyfunc, and its formats tag updated, so the
    registry knows it can be served from ONNX. Returns ``{onnx, model, registered}``.
    """
    model, meta = load_model(source, tracking_uri=tracking_uri)  # BatchNorm folded
    path = export_onnx(model, meta, out_dir, check_images_from(meta, check_image_paths))
    registered = None
    if isinstance(source, str) and source.startswith("models:/"):
        registered = add_to_registered_version(source, path, tracking_uri=tracking_uri)
    return {"onnx": str(path), "model": str(source), "registered": registered}


def add_to_registered_version(model_uri: str, onnx_path: Path, *, tracking_uri: str | None = None) -> str:
    """Log ``onnx_path`` into the logged model of the version ``model_uri`` names; returns NAME/VERSION."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    store = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    reference = model_uri.removeprefix("models:/")
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = reference.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (MlflowException, ValueError) as exc:
        raise ModelError(f"{model_uri}: no such registered version ({str(exc).splitlines()[0][:200]})") from None
    # The logged model behind the version: its id, or the one its source URI names (models:/m-...).
    model_id = version.model_id or (version.source or "").removeprefix("models:/").split("/")[0]
    if not model_id.startswith("m-"):
        raise ModelError(f"{model_uri}: the version has no logged model to add the ONNX graph to ({version.source})")
    client.log_model_artifact(model_id, str(onnx_path))
    formats = sorted({*(version.tags or {}).get(TAG_FORMATS, "pyfunc").split(","), "onnx"})
    client.set_model_version_tag(version.name, version.version, TAG_FORMATS, ",".join(formats))
    return f"{version.name}/{version.version}"
