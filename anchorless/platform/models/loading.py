"""Finding a model: a ``.pt`` export, a directory holding one, or an MLflow model URI.

:func:`load_model` gives a ready-to-predict detector and its meta from any of them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from anchorless.platform.models.export import EXPORT_FILE, ModelError, model_from_export, read_export
from anchorless.platform.tracking.store import mlflow_store, resolve_tracking_uri

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
