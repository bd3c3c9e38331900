"""A model as an OpenVINO IR (``model.xml`` + ``model.bin``), converted from its checked ONNX graph.

``anchorless export --format openvino`` writes the ONNX graph first (:mod:`.onnx`, checked in
onnxruntime), then converts that file with OpenVINO's converter (``openvino.convert_model``:
every op of our graphs converts, ``TopK`` and FCOS's ``NonMaxSuppression`` included) and
checks the conversion the same way: OpenVINO's CPU device runs it on the check images and
its detections must match torch's within the ONNX export's tolerances, or nothing is
written. The IR has the same input and outputs as the ONNX graph, and the same metadata
(in its ``rt_info`` under ``anchorless``).

Weights stay float32 (``save_model`` would halve them to float16 by default) and the CPU
device is asked for float32 inference: on CPUs with bf16 units OpenVINO's default precision
is bf16, whose scores differ from torch's by a few 1e-4 (past the check's 1e-4 tolerance).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from anchorless.platform.models.export import ModelError
from anchorless.platform.models.onnx_runtime import (
    INPUT_NAME,
    OUTPUT_NAMES,
    metadata_from_props,
    onnx_metadata,
    require_agreement,
)

OPENVINO_FILE = "model.xml"  # and model.bin beside it: OpenVINO's IR is the pair
OPENVINO_DIR = "openvino"  # where a registered version's logged model keeps the pair
_RT_INFO = "anchorless"


def convert_onnx(onnx_path: str | os.PathLike[str], meta: Mapping[str, Any]):
    """The ONNX graph as an ``openvino.Model`` carrying our metadata; an op OpenVINO cannot
    convert is a :class:`ModelError` naming it (OpenVINO's own first lines)."""
    import openvino

    try:
        model = openvino.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO raises its own OpConversionFailure / RuntimeError
        reason = " ".join(str(exc).split())[:400]
        raise ModelError(f"OpenVINO cannot convert the ONNX graph {onnx_path}: {reason}") from None
    for key, value in onnx_metadata(meta).items():
        model.set_rt_info(value, [_RT_INFO, key.removeprefix(f"{_RT_INFO}.")])
    return model


def read_openvino_metadata(model) -> dict[str, Any] | None:
    """The meta :func:`convert_onnx` stored in an ``openvino.Model`` (None without it)."""
    keys = ("categories", "image_size", "manifest_sha256", "version", "detector")
    props = {f"{_RT_INFO}.{k}": model.get_rt_info([_RT_INFO, k]).astype(str) for k in keys if model.has_rt_info([_RT_INFO, k])}
    return metadata_from_props(props)


def compile_cpu(model, *, threads: int | None = None):
    """An ``openvino.Model`` (or the path of an IR) compiled for the CPU device in float32."""
    import openvino

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = openvino.Core()
    return core.compile_model(str(model) if isinstance(model, (str, Path)) else model, "CPU", config)


def run_openvino(compiled, images: np.ndarray) -> dict[str, np.ndarray]:
    """Detections from a compiled model for a (N, 3, S, S) float32 batch in 0-255 (as :func:`.onnx_runtime.run_onnx`)."""
    results = compiled({INPUT_NAME: np.ascontiguousarray(images, np.float32)})
    return {name: results[compiled.output(name)] for name in OUTPUT_NAMES}


def export_openvino(
    onnx_path: str | os.PathLike[str],
    meta: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    images: np.ndarray,
    reference: Mapping[str, np.ndarray],
) -> Path:
    """Convert the ONNX graph, check it against torch's ``reference`` detections on ``images``
    ((N, 3, S, S) float32 in 0-255, the batch the ONNX graph was checked on) and write
    ``out_dir/model.xml`` + ``model.bin``; returns the ``.xml`` path."""
    import openvino

    model = convert_onnx(onnx_path, meta)
    got = run_openvino(compile_cpu(model), images)
    require_agreement(got, reference, image_side=float(images.shape[-1]), runtime="OpenVINO export: OpenVINO", artifact="the IR")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / OPENVINO_FILE
    # The IR is two files: written beside their places, then renamed weights first, so a
    # reader that finds the new model.xml finds its model.bin.
    with tempfile.TemporaryDirectory(dir=out, prefix=".openvino-") as tmp:
        staged = Path(tmp) / OPENVINO_FILE
        openvino.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(staged, target)
    return target
