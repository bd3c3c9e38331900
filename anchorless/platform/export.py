"""A trained model as one portable file, and as an MLflow model that loads and predicts.

The export is a single ``.pt`` file holding only plain data, so it loads with
``torch.load(path, weights_only=True)``::

    {"format": "anchorless-model", "format_version": 1,
     "state_dict": {...},            # the detector's plain state_dict (CPU tensors)
     "config": {...},                # the resolved experiment config
     "categories": [{"label", "coco_id", "name"}, ...],
     "manifest_sha256": "...",       # the training data's manifest checksum
     "anchorless_version": "..."}

:func:`load_model` rebuilds the detector from the config and loads the weights,
from a file, a directory holding one, or an MLflow model URI.
:func:`log_and_register` logs the export to MLflow as a ``pyfunc`` model and
registers it as a new version tagged with its evaluation metrics.

The pyfunc model's input is a pandas DataFrame with one column ``image`` of
*encoded image bytes* (the contents of a JPEG/PNG file; base64 in a REST call),
so images of any size go through one schema; :func:`images_frame` builds it from
paths. Its output is one row per detection: ``image_index`` (row of the input),
``category_id``, ``category_name``, ``score`` and ``x, y, width, height`` in the
original image's pixels. The param ``score_threshold`` (default 0.3) filters.
Loading it needs ``anchorless`` importable (the model class is pickled by
reference), so serve it from this project's environment (``--env-manager local``).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import mlflow.pyfunc
import pandas as pd
import torch

from anchorless.platform.errors import AnchorlessError
from anchorless.platform.files import atomic_path
from anchorless.platform.shards import manifest_checksum
from anchorless.platform.tracking import TAG_MANIFEST_SHA256, mlflow_store, resolve_tracking_uri

if TYPE_CHECKING:
    from anchorless.platform.config import ExperimentConfig
    from anchorless.platform.tracking import Tracker

log = logging.getLogger(__name__)

FORMAT = "anchorless-model"
FORMAT_VERSION = 1
EXPORT_FILE = "model.pt"
MLFLOW_MODEL_NAME = "model"  # the logged model's name within its run: runs:/<run>/model
PYFUNC_ARTIFACT = "export"
OUTPUT_COLUMNS = ("image_index", "category_id", "category_name", "score", "x", "y", "width", "height")


class ModelError(AnchorlessError):
    """A model that cannot be loaded or does not fit the data (file, URI, categories)."""


# --- the export file ------------------------------------------------------------------------------


def category_table(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest's categories as plain ``{"label", "coco_id", "name"}`` dicts, by label."""
    try:
        table = [
            {"label": int(c["label"]), "coco_id": int(c["coco_id"]), "name": str(c["name"])}
            for c in manifest["categories"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"data manifest: no usable category table ({exc!r})") from None
    table.sort(key=lambda c: c["label"])
    if [c["label"] for c in table] != list(range(len(table))):
        raise ModelError(f"data manifest: labels are not contiguous 0..{len(table) - 1}: {[c['label'] for c in table]}")
    return table


def plain_state_dict(state_dict_or_model: Any) -> dict[str, torch.Tensor]:
    """A CPU ``state_dict`` of a model, a DeepSpeed engine / DDP wrapper, or a state dict."""
    if isinstance(state_dict_or_model, Mapping):
        state = dict(state_dict_or_model)
    else:
        module = getattr(state_dict_or_model, "module", state_dict_or_model)  # DeepSpeed engine, DDP
        state = module.state_dict()
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    # clone(): a view would drag its whole storage into the file.
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def export_checkpoint(
    state_dict_or_model: Any,
    cfg: "ExperimentConfig | Mapping[str, Any]",
    manifest: Mapping[str, Any],
    out_path: str | os.PathLike[str],
) -> Path:
    """Write the single-file export (see the module docstring) atomically; returns its path.

    ``out_path`` may be a directory, which then gets ``model.pt``. The detector's
    class count must match the manifest's category table.
    """
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else copy.deepcopy(dict(cfg))
    categories = category_table(manifest)
    num_classes = config.get("detector", {}).get("num_classes")
    if num_classes != len(categories):
        raise ModelError(
            f"detector.num_classes is {num_classes} but the data manifest has {len(categories)} categories "
            f"({', '.join(c['name'] for c in categories)})"
        )
    from anchorless import __version__

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": plain_state_dict(state_dict_or_model),
        "config": config,
        "categories": categories,
        "manifest_sha256": manifest_checksum(manifest),
        "anchorless_version": __version__,
    }
    path = Path(out_path)
    if path.is_dir():
        path = path / EXPORT_FILE
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_export(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The export's payload, loaded with ``weights_only=True``; a clear error for anything else."""
    import pickle

    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a loadable model export ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path}: not an {FORMAT} export (a raw checkpoint? export it with export_checkpoint)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: export format_version {payload.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return payload


def model_from_export(
    payload: Mapping[str, Any], *, device: torch.device | str = "cpu", fold_batchnorm: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the detector the export describes and load its weights; (model in eval mode, meta).

    With ``fold_batchnorm`` (the default: the model is for inference) its BatchNorms are
    folded into the convolutions before them: the same detections up to float rounding,
    and a faster forward. Such a model must not train; pass False to fine-tune it.
    """
    from anchorless.detectors import build_detector
    from anchorless.detectors.fusion import fold_batchnorm as fold

    detector_cfg = copy.deepcopy(payload["config"]["detector"])
    detector_cfg.setdefault("backbone", {})["pretrained"] = None  # the export holds every weight
    model = build_detector(detector_cfg)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelError(
            f"export does not fit detector {detector_cfg.get('name')!r}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.to(device).eval()
    return (fold(model) if fold_batchnorm else model), export_meta(payload)


def export_meta(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Everything about an export but its weights."""
    return {
        "config": payload["config"],
        "categories": [dict(c) for c in payload["categories"]],
        "manifest_sha256": payload.get("manifest_sha256"),
        "anchorless_version": payload.get("anchorless_version"),
        "image_size": int(payload["config"]["data"]["image_size"]),
    }


# --- finding a model -----------------------------------------------------------------------------

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(MLFLOW_SCHEMES)


def find_export_file(directory: str | os.PathLike[str]) -> Path:
    """The one ``.pt`` export in a directory (``model.pt`` preferred), searched recursively."""
    directory = Path(directory)
    preferred = directory / EXPORT_FILE
    if preferred.is_file():
        return preferred
    candidates = sorted(directory.rglob("*.pt"))
    if not candidates:
        raise ModelError(f"{directory}: no .pt model export in this directory")
    if len(candidates) > 1:
        shown = ", ".join(str(c.relative_to(directory)) for c in candidates[:5])
        raise ModelError(f"{directory}: several .pt files ({shown}); name the one to use")
    return candidates[0]


def load_export(source: str | os.PathLike[str], *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The payload of a ``.pt`` export, a directory holding one, or an MLflow model URI.

    MLflow URIs resolve against ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``,
    else the embedded default store under ``./workspace``. ``payload["source"]``
    records where it came from.
    """
    if is_mlflow_uri(source):
        payload = _load_mlflow_export(str(source), tracking_uri)
    else:
        path = Path(source)
        if path.is_dir():
            path = find_export_file(path)
        elif not path.exists():
            raise ModelError(
                f"{source}: no such model file, directory or MLflow URI "
                "(models:/NAME/VERSION, models:/NAME@alias, runs:/RUN/model)"
            )
        payload = read_export(path)
    payload["source"] = str(source)
    return payload


def _load_mlflow_export(uri: str, tracking_uri: str | None) -> dict[str, Any]:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    store = resolve_tracking_uri(tracking_uri)
    # MLflow draws a bar per download; a model load is one quick step of a job that shows
    # its own progress, and in Ray workers (evaluation actors) the bars interleave.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="anchorless-model-") as tmp:
        try:
            # models:/ URIs resolve through MLflow's process-wide registry URI, whatever is passed.
            with mlflow_store(store):
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=tmp, tracking_uri=store, registry_uri=store
                )
        except MlflowException as exc:
            message = str(exc).splitlines()[0][:300]
            raise ModelError(f"{uri}: cannot be resolved in tracking store {store} ({message})") from None
        local_path = Path(local)
        return read_export(local_path if local_path.is_file() else find_export_file(local_path))


def load_model(
    source: Any,
    *,
    tracking_uri: str | None = None,
    device: torch.device | str = "cpu",
    fold_batchnorm: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ready-to-predict detector and its meta (config, categories, manifest checksum, image size).

    ``source``: a ``.pt`` export path, a directory containing one, an MLflow model
    URI (``models:/NAME/VERSION``, ``models:/NAME@alias``, ``runs:/RUN/model``), or an
    already-loaded ``(model, meta)`` pair (returned as is). ``fold_batchnorm``: see
    :func:`model_from_export`.
    """
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], torch.nn.Module):
        return source
    payload = load_export(source, tracking_uri=tracking_uri)
    model, meta = model_from_export(payload, device=device, fold_batchnorm=fold_batchnorm)
    meta["source"] = payload["source"]
    return model, meta


# --- MLflow model -----------------------------------------------------------------------------------

class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """The MLflow ``pyfunc`` face of an export: encoded images in, detections in original pixels out."""

    def load_context(self, context) -> None:
        self.model, self.meta = model_from_export(read_export(context.artifacts[PYFUNC_ARTIFACT]))
        self.label_to_category = {c["label"]: c["coco_id"] for c in self.meta["categories"]}
        self.names = {c["coco_id"]: c["name"] for c in self.meta["categories"]}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from anchorless.platform.predict import decode_image_bytes, detect

        threshold = float((params or {}).get("score_threshold", 0.3))
        column = model_input["image"] if hasattr(model_input, "columns") else model_input
        images = [decode_image_bytes(bytes(data), f"input row {row}") for row, data in enumerate(column)]
        detections = detect(self.model, images, image_size=self.meta["image_size"], score_threshold=threshold)
        rows = []
        for index, detection in enumerate(detections):
            columns = (detection["boxes"].tolist(), detection["scores"].tolist(), detection["labels"].tolist())
            for box, score, label in zip(*columns):
                category_id = self.label_to_category[int(label)]
                x0, y0, x1, y1 = box
                rows.append((index, category_id, self.names[category_id], float(score), x0, y0, x1 - x0, y1 - y0))
        frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
        return frame.astype({"image_index": "int64", "category_id": "int64", "score": "float64"})


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("long", "image_index"),
                ColSpec("long", "category_id"),
                ColSpec("string", "category_name"),
                ColSpec("double", "score"),
                *(ColSpec("double", name) for name in ("x", "y", "width", "height")),
            ]
        ),
        params=ParamSchema([ParamSpec("score_threshold", "double", 0.3)]),
    )


def example_input() -> pd.DataFrame:
    """A one-row input: a small grey PNG."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (48, 32), (114, 114, 114)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def images_frame(paths: Sequence[str | os.PathLike[str]]):
    """The pyfunc model's input for image files: a DataFrame with their bytes in column ``image``."""
    from anchorless.platform.errors import DataError

    data = []
    for path in paths:
        try:
            data.append(Path(path).read_bytes())
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return pd.DataFrame({"image": data})


def _pip_requirements() -> list[str]:
    """Pinned to what is running, so the loader needs no requirement inference (slow, guesses)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("anchorless", "torch", "torchvision", "mlflow", "pandas", "numpy", "pillow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


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
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),  # loads without unpickling
            artifacts={PYFUNC_ARTIFACT: str(export_path)},
            signature=pyfunc_signature(),
            input_example=example_input(),  # MLflow predicts on it once: the logged model is known to work
            pip_requirements=_pip_requirements(),
            metadata={"categories": payload["categories"], TAG_MANIFEST_SHA256: payload.get("manifest_sha256")},
        )
        name = cfg.tracking.registered_model
        if not name:
            return f"runs:/{run_id}/{MLFLOW_MODEL_NAME}"
        version = mlflow.register_model(info.model_uri, name, await_registration_for=await_registration_for, tags=tags)
    log.info("registered %s version %s (run %s)", name, version.version, run_id)
    return f"models:/{name}/{version.version}"
