"""A model as one ONNX graph, from image tensor to detections, checked against torch.

The graph takes a float image batch ``(N, 3, S, S)`` in 0-255 at the model's training
size ``S`` (letterboxed outside, by :func:`~anchorless.platform.data.images.letterbox_array`,
the helper ``predict`` uses) and returns ``boxes (N, K, 4)`` xyxy in those pixels,
``scores (N, K)`` and ``labels (N, K)``, K the model's maximum detections, padded with
score 0. Normalisation, the network and the decoding are inside: top-k for the NMS-free
detectors, ONNX's ``NonMaxSuppression`` (what torchvision's NMS exports to) where NMS
is on. BatchNorm is folded first, as in every served model. The model's categories,
image size, data manifest checksum and anchorless version ride along in the ONNX
metadata, so the file is all a deployment needs; running it needs no torch
(:mod:`.onnx_runtime`).

Every export is run by onnxruntime on real images and compared with torch before it is
written; a mismatch is an error. ``--format openvino`` converts the checked graph
(:mod:`.openvino`) and checks the conversion the same way.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from anchorless.errors import AnchorlessError
from anchorless.files import atomic_path
from anchorless.platform.data.images import decode_image_bytes, read_image
from anchorless.platform.data.shards import iter_shard_tables, read_manifest
from anchorless.platform.data.transforms import letterbox_images
from anchorless.platform.models.export import ModelError
from anchorless.platform.models.loading import load_model
from anchorless.platform.models.onnx_runtime import (
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAMES,
    metadata_from_props,
    onnx_metadata,
    onnxruntime_session,
    require_agreement,
    run_onnx,
)
from anchorless.platform.models.openvino import OPENVINO_DIR, export_openvino
from anchorless.platform.tracking.store import TAG_FORMATS, resolve_tracking_uri

log = logging.getLogger(__name__)

# Opset 18: the newest every onnxruntime of the last two years runs, and the dynamo
# exporter's own default (its translations are written against it).
OPSET = 18
FORMATS = ("onnx", "openvino")


class DetectionGraph(torch.nn.Module):
    """What the ONNX graph computes: 0-255 images in, padded detections out."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        padded = self.detector.predict_padded(images / 255.0)
        return padded["boxes"], padded["scores"], padded["labels"]


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
    check_parity(graph, serialized, check_batch(check_images, size))
    path = Path(out_dir) / ONNX_FILE
    with atomic_path(path, mode=0o644) as tmp:
        tmp.write_bytes(serialized)
    log.info("ONNX graph (opset %d) written to %s", OPSET, path)
    return path


def check_batch(images: Sequence[torch.Tensor], image_size: int) -> torch.Tensor:
    """(3, H, W) uint8 images as the graph's input: letterboxed, float32 in 0-255."""
    batch, _ = letterbox_images(list(images), image_size)
    return batch.float()


def torch_detections(graph: DetectionGraph, images: torch.Tensor) -> dict[str, np.ndarray]:
    """What the graph must give: torch's padded detections for a check batch."""
    with torch.inference_mode():
        return dict(zip(OUTPUT_NAMES, (t.numpy() for t in graph(images))))


def check_parity(graph: DetectionGraph, onnx_bytes: bytes, images: torch.Tensor) -> None:
    """onnxruntime's detections must be torch's (see :func:`.onnx_runtime.unmatched_detections`); raises ModelError."""
    want = torch_detections(graph, images)
    got = run_onnx(onnxruntime_session(onnx_bytes), images.numpy())
    require_agreement(got, want, image_side=float(images.shape[-1]), runtime="ONNX export: onnxruntime", artifact="the graph")


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta written by :func:`export_onnx` (categories decoded), from the file alone."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = metadata_from_props({entry.key: entry.value for entry in proto.metadata_props})
    if meta is None:
        raise ModelError(f"{path}: not an anchorless ONNX export (no anchorless metadata)")
    return meta


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
    format: str = "onnx",
    tracking_uri: str | None = None,
    check_image_paths: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Export a ``.pt`` export, a run's model or a registered version to ``out_dir/model.onnx``,
    and with ``format="openvino"`` also to the OpenVINO IR ``out_dir/model.xml`` (+ ``.bin``)
    converted from that graph; each file is checked against torch before it is written.

    A registered version (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) also gets the
    files added to its logged model, beside the pyfunc, and its formats tag updated, so the
    registry knows it can be served from ONNX. Returns ``{onnx, openvino, model, registered}``.
    """
    if format not in FORMATS:
        raise ModelError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    model, meta = load_model(source, tracking_uri=tracking_uri)  # BatchNorm folded
    images = check_images_from(meta, check_image_paths)
    path = export_onnx(model, meta, out_dir, images)
    files = {"onnx": path}
    if format == "openvino":
        batch = check_batch(images, int(meta["image_size"]))
        reference = torch_detections(DetectionGraph(model).eval(), batch)
        files["openvino"] = export_openvino(path, meta, out_dir, batch.numpy(), reference)
    registered = None
    if isinstance(source, str) and source.startswith("models:/"):
        registered = add_to_registered_version(source, files, tracking_uri=tracking_uri)
    return {
        "onnx": str(path),
        "openvino": str(files["openvino"]) if "openvino" in files else None,
        "model": str(source),
        "registered": registered,
    }


def add_to_registered_version(model_uri: str, files: Mapping[str, Path], *, tracking_uri: str | None = None) -> str:
    """Log exported ``files`` ({"onnx": model.onnx, "openvino": model.xml}) into the logged model
    of the version ``model_uri`` names and add their formats to its tag; returns NAME/VERSION.

    The ONNX graph lands at the logged model's top (``model.onnx`` beside ``MLmodel``), the
    OpenVINO pair under ``openvino/``."""
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
        raise ModelError(f"{model_uri}: the version has no logged model to add the exported files to ({version.source})")
    for format, path in files.items():
        if format == "openvino":
            for part in (Path(path), Path(path).with_suffix(".bin")):
                client.log_model_artifact(model_id, str(part), artifact_path=OPENVINO_DIR)
        else:
            client.log_model_artifact(model_id, str(path))
    formats = sorted({*(version.tags or {}).get(TAG_FORMATS, "pyfunc").split(","), *files})
    client.set_model_version_tag(version.name, version.version, TAG_FORMATS, ",".join(formats))
    return f"{version.name}/{version.version}"
