"""The MLflow model of an export, as "models from code": MLflow logs this file with each
model and runs it to load one, instead of unpickling a Python object."""

from mlflow.models import set_model

from anchorless.platform.models.pyfunc import DetectorPyfunc

set_model(DetectorPyfunc())
