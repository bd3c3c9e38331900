"""The MLflow ``pyfunc`` model that serves an exported ONNX graph in onnxruntime, without torch.

``anchorless models serve NAME@ALIAS --format onnx`` serves this model: the same request and
answer as the torch pyfunc (:mod:`.detections`), the same detections as ``anchorless predict``
within the export's tolerances (:class:`~.onnx_runtime.OnnxDetector` decodes, letterboxes and
maps back exactly as predict does), but neither torch, torchvision nor the detectors are
imported, so the serving environment needs onnxruntime, numpy, Pillow, pandas and MLflow
only. The model states on the server's output, once loaded and once after its first
request, whether torch has been imported in its process (it must not have been).

:func:`save_onnx_pyfunc` writes the MLflow model (a directory) for a ``model.onnx``: the graph
as its data (``data/model.onnx``) and this module as its loader, which MLflow imports by name
from the environment and calls :func:`_load_pyfunc` of (MLflow's custom loader module), so the
model directory holds no code. It is written at serve time and never registered, so there is
no older form of it to load.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from anchorless.platform.models.detections import (
    bad_request_errors,
    detections_frame,
    encoded_images,
    example_input,
    pinned_requirements,
    pyfunc_signature,
    score_threshold,
)
from anchorless.platform.models.onnx_runtime import OnnxDetector

TORCH_REPORT = "anchorless ONNX model"  # the start of the line it prints, which tests read


def torch_imported() -> bool:
    return "torch" in sys.modules


class OnnxDetectorPyfunc:
    """Encoded images in, detections in original pixels out, from an ONNX graph in onnxruntime."""

    def __init__(self, onnx_path: str | Path) -> None:
        self.detector = OnnxDetector(onnx_path)
        self.answered = False
        self._report("loaded")

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        with bad_request_errors():
            detections = self.detector.detect_encoded(encoded_images(model_input), score_threshold=score_threshold(params))
        if not self.answered:
            self.answered = True
            self._report("answered its first request")
        return detections_frame(detections, self.detector.meta["categories"])

    def _report(self, stage: str) -> None:
        import onnxruntime

        torch = "yes (it should not be)" if torch_imported() else "no"
        print(f"{TORCH_REPORT} {stage}: onnxruntime {onnxruntime.__version__}, torch imported: {torch}",
              file=sys.stderr, flush=True)  # fmt: skip


def _load_pyfunc(data_path: str) -> OnnxDetectorPyfunc:
    """MLflow's entry: the model serving the graph at ``data_path`` (the model's ``data/model.onnx``)."""
    return OnnxDetectorPyfunc(data_path)


def save_onnx_pyfunc(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """Write the MLflow pyfunc model serving ``onnx_path`` to the new directory ``out_dir``."""
    mlflow.pyfunc.save_model(
        path=str(out_dir),
        loader_module=__name__,  # imported from the environment: the model directory holds data only
        data_path=str(onnx_path),
        signature=pyfunc_signature(),
        input_example=example_input(),  # MLflow predicts on it once: the model is known to load and answer
        pip_requirements=pinned_requirements("anchorless", "onnxruntime", "mlflow", "pandas", "numpy", "pillow"),
    )
    return Path(out_dir)
