"""The MLflow ``pyfunc`` model of an export, and logging and registering it.

:func:`log_and_register` logs the export to MLflow as a ``pyfunc`` model and
registers it as a new version tagged with its evaluation metrics.

The pyfunc model's input is a pandas DataFrame with one column ``image`` of
*encoded image bytes* (the contents of a JPEG/PNG file; base64 in a REST call),
so images of any size go through one schema; :func:`images_frame` builds it from
paths. Its output is one row per detection: ``image_index`` (row of the input),
``category_id``, ``category_name``, ``score`` and ``x, y, width, height`` in the
original image's pixels. The param ``score_threshold`` (default 0.3) filters.
Request and answer are :mod:`.detections`', which the ONNX model server
(:mod:`.onnx_pyfunc`) shares.

The logged model holds data only: the export (``data/model.pt``, read weights-only) and
MLflow's metadata. Its code is this module, which MLflow imports by name from the
environment (MLflow's custom loader module: ``loader_module`` in the ``MLmodel`` names it,
:func:`_load_pyfunc` is called with the export's path), so no Python file and no pickle
of ours is stored with the model, and nobody who can write the artifact store can change
the code that loads it. Serve it from this project's environment (``--env-manager local``);
``anchorless models serve`` first checks the ``MLmodel`` (:func:`check_logged_model`) and
serves nothing that would load other code.

Versions logged before this (as MLflow "models from code", a ``pyfunc_entry.py`` stored in
the artifact and run on load) are not run: ``anchorless models serve`` and
``mlflow.pyfunc.load_model`` refuse them with a message saying to re-register them (their
weights still load where only the export is read: ``anchorless predict``, ``evaluate``,
``export``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import mlflow.pyfunc
import pandas as pd

from anchorless.errors import DataError
from anchorless.platform.data.images import decode_image_bytes
from anchorless.platform.models.detections import (
    IMAGE_COLUMN,
    bad_request_errors,
    detections_frame,
    encoded_images,
    example_input,
    pinned_requirements,
    pyfunc_signature,
    score_threshold,
)
from anchorless.platform.models.export import ModelError, model_from_export, read_export
from anchorless.platform.models.predict import detect
from anchorless.platform.tracking.store import TAG_MANIFEST_SHA256, mlflow_store, resolve_tracking_uri

if TYPE_CHECKING:
    from anchorless.platform.config import ExperimentConfig
    from anchorless.platform.tracking.tracker import Tracker

log = logging.getLogger(__name__)

MLFLOW_MODEL_NAME = "model"  # the logged model's name within its run: runs:/<run>/model
LEGACY_CLASS = "DetectorPyfunc"  # what the models-from-code file of older versions imports from here
LEGACY = (
    'logged by an older anchorless as MLflow "models from code" (its loader, a Python file stored in the '
    "artifact, is no longer run); re-register it from its export (log_and_register in "
    "anchorless.platform.models.pyfunc, on the version's model.pt) or train it again"
)


class ExportPyfunc:
    """The MLflow ``pyfunc`` face of an export: encoded images in, detections in original pixels out."""

    def __init__(self, export_path: str | os.PathLike[str]) -> None:
        self.model, self.meta = model_from_export(read_export(export_path))

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        with bad_request_errors():
            encoded = encoded_images(model_input)
            images = [decode_image_bytes(data, f"input row {row}") for row, data in enumerate(encoded)]
        detections = detect(self.model, images, image_size=self.meta["image_size"], score_threshold=score_threshold(params))
        return detections_frame(detections, self.meta["categories"])


def _load_pyfunc(data_path: str) -> ExportPyfunc:
    """MLflow's entry: the model of the export at ``data_path`` (the logged model's ``data/model.pt``)."""
    return ExportPyfunc(data_path)


def check_logged_model(model_dir: str | os.PathLike[str]) -> None:
    """Refuse a logged model (a local directory) that would load any code but this module's.

    Its ``MLmodel`` is what ``mlflow.pyfunc.load_model`` obeys, and anyone who can write the
    artifact store can write it: a ``loader_module`` naming another module, a ``code``
    directory put first on ``sys.path`` (where a package of the same name would shadow
    ours), or a models-from-code file would each run code from the artifact.
    """
    from mlflow.models import Model

    try:
        conf = Model.load(str(model_dir)).flavors.get(mlflow.pyfunc.FLAVOR_NAME)
    except Exception as exc:  # a missing, broken or forged MLmodel fails in MLflow's, YAML's or Python's types
        raise ModelError(f"{model_dir}: not an MLflow model ({str(exc).splitlines()[0][:200]})") from None
    if not conf:
        raise ModelError(f"{model_dir}: no MLflow pyfunc flavour to serve")
    code_file = conf.get("model_code_path")
    if code_file and Path(code_file).name == "pyfunc_entry.py":
        raise ModelError(f"{model_dir}: {LEGACY}")
    loader, code, method = conf.get("loader_module"), conf.get("code") or code_file, conf.get("predict_fn", "predict")
    if loader != __name__ or code or method != "predict":
        found = f"loader module {loader!r}, predict function {method!r}" + (f", code in the artifact ({code})" if code else "")
        raise ModelError(
            f"{model_dir}: its MLmodel names {found}; anchorless loads only models whose code is the "
            f"installed package's (loader module {__name__}, no code in the artifact); not loaded"
        )


def __getattr__(name: str) -> Any:
    # The models-from-code file of versions logged before loader modules imports DetectorPyfunc
    # and calls it without arguments: say what to do instead of a TypeError.
    if name == LEGACY_CLASS:
        raise ModelError(f"this model version was {LEGACY}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def images_frame(paths: Sequence[str | os.PathLike[str]]):
    """The pyfunc model's input for image files: a DataFrame with their bytes in column ``image``."""
    data = []
    for path in paths:
        try:
            data.append(Path(path).read_bytes())
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return pd.DataFrame({IMAGE_COLUMN: data})


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Scalar evaluation metrics as version tags under their own names (``per_class_AP.<name>`` for classes)."""
    tags = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            for name, inner in value.items():
                if isinstance(inner, (int, float)) and not isinstance(inner, bool):
                    tags[f"{key}.{name}"] = f"{float(inner):.6f}"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[key] = f"{float(value):.6f}"
    return tags


def log_and_register(
    tracker_or_run_id: "Tracker | str",
    export_path: str | os.PathLike[str],
    cfg: "ExperimentConfig",
    metrics: Mapping[str, Any],
    *,
    tracking_uri: str | None = None,
    await_registration_for: int = 120,
) -> str:
    """Log the export as the run's pyfunc model ``model``; register it if the config names a model.

    The new version is tagged with the scalar ``metrics`` (``AP``, ``AP50``, ...,
    ``duplicate_rate``) and the training data's manifest checksum. Returns
    ``models:/NAME/VERSION``, or ``runs:/RUN/model`` when ``cfg.tracking.registered_model``
    is unset. ``tracking_uri`` is needed only with a bare run id (default: resolved from ``cfg``).
    """
    import mlflow
    from mlflow.models import Model

    if isinstance(tracker_or_run_id, str):
        run_id = tracker_or_run_id
        store = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri, cfg.workspace)
    else:
        run_id, store = tracker_or_run_id.run_id, tracker_or_run_id.tracking_uri
    payload = read_export(export_path)  # refuse to log anything that will not load back
    tags = {TAG_MANIFEST_SHA256: payload.get("manifest_sha256") or "", **metric_tags(metrics)}

    with mlflow_store(store):
        # The logged model is created here, in the run's experiment: left to itself,
        # Model.log would put it in the process's active experiment.
        client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(experiment_id, name=MLFLOW_MODEL_NAME, source_run_id=run_id, tags=tags)
        info = Model.log(
            None,  # artifact_path: deprecated in favour of name, but still positional
            name=MLFLOW_MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            loader_module=__name__,  # imported from the environment: the artifact holds data only
            data_path=str(export_path),
            signature=pyfunc_signature(),
            input_example=example_input(),  # MLflow predicts on it once: the logged model is known to work
            pip_requirements=pinned_requirements("anchorless", "torch", "torchvision", "mlflow", "pandas", "numpy", "pillow"),
            metadata={"categories": payload["categories"], TAG_MANIFEST_SHA256: payload.get("manifest_sha256")},
        )
        name = cfg.tracking.registered_model
        if not name:
            return f"runs:/{run_id}/{MLFLOW_MODEL_NAME}"
        version = mlflow.register_model(info.model_uri, name, await_registration_for=await_registration_for, tags=tags)
    log.info("registered %s version %s (run %s)", name, version.version, run_id)
    return f"models:/{name}/{version.version}"
