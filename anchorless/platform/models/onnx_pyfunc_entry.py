"""The MLflow model of an ONNX graph, as "models from code": MLflow runs this file to load
it. Imports nothing of torch (see :mod:`anchorless.platform.models.onnx_pyfunc`)."""

from mlflow.models import set_model

from anchorless.platform.models.onnx_pyfunc import OnnxDetectorPyfunc

set_model(OnnxDetectorPyfunc())
