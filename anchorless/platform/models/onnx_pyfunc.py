"""The MLflow ``pyfunc`` model that serves an exported ONNX graph in onnxruntime, without torch.

``anchorless models serve NAME@ALIAS --format onnx`` serves this model: the same request and
answer as the torch pyfunc (:mod:`.detections`), the same detections as ``anchorless predict``
within the export's tolerances (:class:`~.onnx_runtime.OnnxDetector` decodes, letterboxes and
maps back exactly as predict does), but neither torch, torchvision nor the detectors are
imported, so the serving environment needs onnxruntime, numpy, Pillow, pandas and MLflow
only. The model states on the server's output, once loaded and once after its first
request, whether torch has been imported in its process (it must not have been).

:func:`save_onnx_pyfunc` writes the MLflow model (a directory) for a ``model.onnx``;
``onnx_pyfunc_entry.py`` is its "model from code".
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from anchorless.platform.models.detections import (
    detections_frame,
    encoded_images,
    example_input,
    pinned_requirements,
    pyfunc_signature,
    score_threshold,
)
from anchorless.platform.models.onnx_runtime import OnnxDetector

ONNX_ARTIFACT = "onnx"
TORCH_REPORT = "anchorless ONNX model"  # the start of the line it prints, which tests read


def torch_imported() -> bool:
    return "torch" in sys.modules


class OnnxDetectorPyfunc(mlflow.pyfunc.PythonModel):
    """Encoded images in, detections in original pixels out, from an ONNX graph in onnxruntime."""

    def load_context(self, context) -> None:
        self.detector = OnnxDetector(context.artifacts[ONNX_ARTIFACT])
        self.answered = False
        self._report("loaded")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
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


def save_onnx_pyfunc(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """Write the MLflow pyfunc model serving ``onnx_path`` to the new directory ``out_dir``."""
    mlflow.pyfunc.save_model(
        path=str(out_dir),
        python_model=str(Path(__file__).with_name("onnx_pyfunc_entry.py")),  # loads without unpickling
        artifacts={ONNX_ARTIFACT: str(onnx_path)},
        signature=pyfunc_signature(),
        input_example=example_input(),  # MLflow predicts on it once: the model is known to load and answer
        pip_requirements=pinned_requirements("anchorless", "onnxruntime", "mlflow", "pandas", "numpy", "pillow"),
    )
    return Path(out_dir)
