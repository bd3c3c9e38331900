"""Where the MLflow store is, whether it answers, and the tags every run and version carries.

The tracking URI, in order: ``cfg.tracking.tracking_uri``, ``$MLFLOW_TRACKING_URI``,
then the embedded default, a SQLite store ``<workspace>/mlflow.db`` with artifacts
under ``<workspace>/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from anchorless.errors import AnchorlessError

# Run and model-version tags (the registry reads the same names).
TAG_MANIFEST_SHA256 = "anchorless.data_manifest_sha256"
TAG_SOURCE_SHA256 = "anchorless.data_source_sha256"
TAG_VERSION = "anchorless.version"
TAG_CONFIG_NAME = "anchorless.config_name"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own key: its UI shows it
TAG_GIT_DIRTY = "anchorless.git_dirty"
TAG_FORMATS = "anchorless.formats"  # on a model version: the formats its logged model holds (pyfunc, onnx)

CONFIG_ARTIFACT = "config/resolved_config.yaml"
DEEPSPEED_ARTIFACT = "config/deepspeed_config.json"
MANIFEST_ARTIFACT = "data/manifest.json"

# MLflow's own HTTP client retries 7 times with backoff up to two minutes per
# call; the Tracker retries on its own, so it asks for a short leash unless the
# user has set these.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
REACHABILITY_TIMEOUT_SECONDS = 10

# Error codes that no retry can fix: the request itself is wrong.
_PERMANENT_ERROR_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "ENDPOINT_NOT_FOUND",
}


class TrackingError(AnchorlessError):
    """The tracking store cannot be used (unreachable, refused, unknown run)."""


# --- where the store is -------------------------------------------------------------------------


def default_tracking_uri(workspace: str | os.PathLike[str]) -> str:
    """The embedded default: a SQLite store in the workspace (absolute path)."""
    return f"sqlite:///{(Path(workspace).resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(tracking_uri: str | None = None, workspace: str | os.PathLike[str] = "workspace") -> str:
    """``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI``, else the workspace's SQLite store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return default_tracking_uri(workspace)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative SQLite path would move with the process's working directory
        # (Ray Train workers run elsewhere), so pin it now.
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve().as_posix()}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside it in ``mlartifacts/``; a server decides its own."""
    database = _sqlite_path(uri)
    if database is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "experiment"
    return (database.parent / "mlartifacts" / folder).as_uri()


def check_reachable(uri: str) -> None:
    """Fail fast, with the URI in the message, if the store does not answer."""
    database = _sqlite_path(uri)
    if database is not None:
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"tracking store {uri}: cannot create {database.parent} ({exc.strerror})") from None
        if not os.access(database.parent, os.W_OK):
            raise TrackingError(f"tracking store {uri}: {database.parent} is not writable")
        return
    if not uri.startswith(("http://", "https://")):
        return  # other schemes (databricks, file) are checked by the first client call
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        # One request, no retries: any HTTP answer means the server is up.
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/get-by-name",
            "GET",
            params={"experiment_name": "Default"},
            max_retries=0,
            timeout=REACHABILITY_TIMEOUT_SECONDS,
            raise_on_status=False,
        )
    except Exception as exc:  # connection refused, DNS, timeout: all mean "not reachable"
        reason = short_reason(exc)
        raise TrackingError(f"tracking store {uri} is not reachable: {reason}") from None
    if response.status_code in (401, 403):
        raise TrackingError(
            f"tracking store {uri} refused the request (HTTP {response.status_code}); "
            "set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN (a local cluster's accounts are "
            "in its state directory, mlflow_user.json; the command line reads them for that cluster's server)"
        )
    if response.status_code >= 500:
        raise TrackingError(f"tracking store {uri} answered HTTP {response.status_code}: {response.text[:200]}")


def short_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker.lower()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def limit_http_retries() -> None:
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def mlflow_store(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` for a block.

    ``Model.log``, ``register_model`` and ``models:/`` downloads have no client
    argument (or ignore it) and read these globals; ``set_tracking_uri`` also
    writes ``$MLFLOW_TRACKING_URI``. Globals and environment are put back after.
    The globals are private to MLflow, hence the test that covers this.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection trouble, timeouts, server errors, a locked database."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT_ERROR_CODES
    return not isinstance(exc, (TypeError, ValueError, KeyError, AttributeError))
