"""MLflow tracking: one run per training run, logged from the driver and rank 0.

``Tracker.start`` (driver) resolves the tracking URI, checks the store answers,
creates the experiment and the run, or resumes a run by id so that worker
restarts and resumed runs never duplicate it. ``Tracker.attach`` (rank 0 of a
Ray Train worker) opens a client on that run. Everything logged during training
goes through :meth:`Tracker._call`: a transient failure is retried with backoff
and, if the store is still failing, logged as a warning and dropped, so a flaky
tracking server never kills training.

The tracking URI, in order: ``cfg.tracking.tracking_uri``, ``$MLFLOW_TRACKING_URI``,
then the embedded default, a SQLite store ``<workspace>/mlflow.db`` with artifacts
under ``<workspace>/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, TypeVar

from anchorless.platform.errors import AnchorlessError
from anchorless.platform.shards import manifest_checksum

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from anchorless.platform.config import ExperimentConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# Run and model-version tags (the registry reads the same names).
TAG_MANIFEST_SHA256 = "anchorless.data_manifest_sha256"
TAG_SOURCE_SHA256 = "anchorless.data_source_sha256"
TAG_VERSION = "anchorless.version"
TAG_CONFIG_NAME = "anchorless.config_name"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own key: its UI shows it
TAG_GIT_DIRTY = "anchorless.git_dirty"

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
        reason = _short_reason(exc)
        raise TrackingError(f"tracking store {uri} is not reachable: {reason}") from None
    if response.status_code in (401, 403):
        raise TrackingError(
            f"tracking store {uri} refused the request (HTTP {response.status_code}); "
            "set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
    if response.status_code >= 500:
        raise TrackingError(f"tracking store {uri} answered HTTP {response.status_code}: {response.text[:200]}")


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker.lower()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _limit_http_retries() -> None:
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


# --- what is logged -------------------------------------------------------------------------------


def source_checksum(manifest: Mapping[str, Any]) -> str | None:
    """sha256 of the COCO JSON the shards were made from, if the manifest records it."""
    source = manifest.get("source")
    value = source.get("sha256") if isinstance(source, Mapping) else manifest.get("source_sha256")
    return value if isinstance(value, str) else None


@functools.cache
def git_state() -> tuple[str, bool] | None:
    """(commit, dirty) of the repository holding this package's code, or None outside git."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(status.strip())) if commit else None


def param_value(value: Any) -> str:
    """A config leaf as MLflow param text (lists as JSON), cut to MLflow's length limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection trouble, timeouts, server errors, a locked database."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT_ERROR_CODES
    return not isinstance(exc, (TypeError, ValueError, KeyError, AttributeError))


# --- the tracker --------------------------------------------------------------------------------


class Tracker:
    """An MLflow run seen through a client; every logging call is retried, then dropped.

    Build it with :meth:`start` (driver) or :meth:`attach` (rank 0); the constructor
    takes any object with MlflowClient's methods, so tests can hand it a flaky one.
    """

    def __init__(
        self,
        client: "MlflowClient",
        run_id: str,
        tracking_uri: str,
        *,
        experiment_id: str | None = None,
        retries: int = 3,
        backoff_seconds: float = 1.0,
        quiet_seconds: float = 60.0,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.quiet_seconds = quiet_seconds
        self.dropped_calls = 0
        self._down_until = 0.0  # monotonic time until which the store is taken to be down

    # -- construction --

    @classmethod
    def start(
        cls,
        cfg: "ExperimentConfig",
        resume_run_id: str | None = None,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> "Tracker":
        """Create the run named after the config (or resume ``resume_run_id``) on the driver.

        ``parent_run_id`` nests the new run under another (a campaign's trials under
        the campaign); ``tags`` are added to a new run.
        """
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.workspace)
        _limit_http_retries()
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = _ensure_experiment(client, uri, cfg.tracking.experiment)
        if resume_run_id:
            try:
                run = client.get_run(resume_run_id)
            except MlflowException:
                raise TrackingError(f"tracking store {uri}: no run {resume_run_id} to resume") from None
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(f"tracking store {uri}: run {resume_run_id} is deleted; restore it or start afresh")
            client.update_run(resume_run_id, status="RUNNING")
            log.info("MLflow: resumed run %s (%s) at %s", run.info.run_name, resume_run_id, uri)
            return cls(client, resume_run_id, uri, experiment_id=run.info.experiment_id)
        run_name = cfg.tracking.run_name or cfg.name
        run_tags = {TAG_CONFIG_NAME: cfg.name, TAG_VERSION: _anchorless_version(), **(tags or {})}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        log.info("MLflow: run %s (%s) in experiment %r at %s", run_name, run.info.run_id, cfg.tracking.experiment, uri)
        return cls(client, run.info.run_id, uri, experiment_id=experiment_id)

    @classmethod
    def attach(cls, cfg: "ExperimentConfig", run_id: str, tracking_uri: str | None = None) -> "Tracker":
        """Open the driver's run from rank 0 of a Ray Train worker; creates nothing.

        Pass the driver's ``tracker.tracking_uri``: a worker's environment and
        working directory may differ from the driver's.
        """
        from mlflow import MlflowClient

        uri = tracking_uri or resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.workspace)
        _limit_http_retries()
        return cls(MlflowClient(tracking_uri=uri, registry_uri=uri), run_id, uri)

    # -- the retry wrapper --

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)`` with retries on transient errors; a warning and None if it still fails.

        After a dropped call the store is taken to be down: for ``quiet_seconds``
        each call gets one attempt only, so an outage costs training one
        timeout per call rather than a full round of backoff.
        """
        retries = 0 if time.monotonic() < self._down_until else self.retries
        attempt = 0
        while True:
            try:
                result = fn(*args, **kwargs)
                self._down_until = 0.0
                return result
            except Exception as exc:  # the store's failures must never reach the training loop
                if attempt >= retries or not is_transient(exc):
                    self.dropped_calls += 1
                    if is_transient(exc):
                        self._down_until = time.monotonic() + self.quiet_seconds
                    log.warning("MLflow %s dropped after %d attempt(s): %s", what, attempt + 1, _short_reason(exc))
                    return None
                delay = self.backoff_seconds * (2**attempt)
                log.info("MLflow %s failed (%s); retrying in %.1fs", what, _short_reason(exc), delay)
                time.sleep(delay)
                attempt += 1

    # -- logging --

    def log_params_and_config(
        self, cfg: "ExperimentConfig", deepspeed_config: Mapping[str, Any] | None, manifest: Mapping[str, Any]
    ) -> None:
        """Config as flattened params, provenance as tags, config files as artifacts.

        On a resumed run, params already logged are kept (MLflow params are
        immutable); changed values are reported in a warning and the new config
        YAML replaces the artifact.
        """
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        wanted = {key[:MAX_ENTITY_KEY_LENGTH]: param_value(value) for key, value in cfg.flat().items()}
        existing = self._call("get_run", self.client.get_run, self.run_id)
        logged = dict(existing.data.params) if existing is not None else {}
        changed = sorted(key for key, value in wanted.items() if key in logged and logged[key] != value)
        if changed:
            log.warning(
                "MLflow: resumed run %s keeps its original params; changed on resume: %s",
                self.run_id,
                ", ".join(changed),
            )
        params = [Param(key, value) for key, value in wanted.items() if key not in logged]
        for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            self._call("log_batch(params)", self.client.log_batch, self.run_id, params=list(chunk))

        tags = {
            TAG_MANIFEST_SHA256: manifest_checksum(manifest),
            TAG_VERSION: _anchorless_version(),
            TAG_CONFIG_NAME: cfg.name,
        }
        source_sha = source_checksum(manifest)
        if source_sha:
            tags[TAG_SOURCE_SHA256] = source_sha
        state = git_state()
        if state is not None:
            tags[TAG_GIT_COMMIT] = state[0]
            tags[TAG_GIT_DIRTY] = str(state[1]).lower()
        run_tags = [RunTag(key, value) for key, value in tags.items()]
        self._call("log_batch(tags)", self.client.log_batch, self.run_id, tags=run_tags)

        self._call("log_text(config)", self.client.log_text, self.run_id, cfg.to_yaml(), CONFIG_ARTIFACT)
        if deepspeed_config is not None:
            deepspeed = dict(deepspeed_config)
            self._call("log_dict(deepspeed)", self.client.log_dict, self.run_id, deepspeed, DEEPSPEED_ARTIFACT)
        self._call("log_dict(manifest)", self.client.log_dict, self.run_id, _jsonable(manifest), MANIFEST_ARTIFACT)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """One ``log_batch`` per call; values that are not numbers are skipped."""
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            number = _as_float(value)
            if number is not None:
                entries.append(Metric(key, number, timestamp, int(step)))
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._call("log_batch(metrics)", self.client.log_batch, self.run_id, metrics=list(chunk))

    def log_evaluation(
        self,
        summary: Mapping[str, Any],
        step: int,
        coco_gt: Mapping[str, Any],
        coco_results: Sequence[Mapping[str, Any]],
        sample_images: Sequence[Mapping[str, Any]] | None = None,
        *,
        score_threshold: float = 0.3,
    ) -> None:
        """Evaluation artifacts under ``evaluation/step_NNNNNNN/``: ``summary.json``, a PR curve per
        class (``pr_curves/<id>_<name>.png``, IoU 0.5) and ``predictions.png``, a grid of images.

        ``sample_images`` items are dicts ``{"image": array (H,W,3) or (3,H,W), "image_id": int,
        "scale": float}``; ``scale`` maps original pixels to the image's (network px / original px,
        1.0 for an original image). Their detections (score >= ``score_threshold``) are drawn in
        class colours, ground truth thin and white. Metrics go through :meth:`log_metrics`.
        """
        from anchorless.platform import plots

        folder = f"evaluation/step_{int(step):07d}"
        self._call("log_dict(summary)", self.client.log_dict, self.run_id, _jsonable(summary), f"{folder}/summary.json")
        try:
            curves = plots.precision_recall_curves(coco_gt, coco_results)
        except Exception as exc:  # a plot must not stop training
            log.warning("PR curves skipped: %s", exc)
            curves = []
        for curve in curves:
            figure = plots.plot_pr_curve(curve)
            artifact = f"{folder}/pr_curves/{curve.category_id}_{_safe_name(curve.name)}.png"
            self._call("log_figure(pr_curve)", self.client.log_figure, self.run_id, figure, artifact)
        if sample_images:
            grid = evaluation_grid(coco_gt, coco_results, sample_images, score_threshold=score_threshold)
            self._call("log_image(grid)", self.client.log_image, self.run_id, grid, f"{folder}/predictions.png")

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.client.log_artifact, self.run_id, str(local_path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        run_tags = [RunTag(key, str(value)) for key, value in tags.items()]
        for chunk in _chunks(run_tags, 100):
            self._call("log_batch(tags)", self.client.log_batch, self.run_id, tags=list(chunk))

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        self._call("set_terminated", self.client.set_terminated, self.run_id, status=status)


def evaluation_grid(
    coco_gt: Mapping[str, Any],
    coco_results: Sequence[Mapping[str, Any]],
    sample_images: Sequence[Mapping[str, Any]],
    *,
    score_threshold: float = 0.3,
    columns: int = 4,
):
    """A grid (H,W,3) uint8 of sample images with their detections and ground truth drawn."""
    from anchorless.platform import plots

    names = {category["id"]: category["name"] for category in coco_gt.get("categories", [])}
    detections_by_image: dict[int, list[Mapping[str, Any]]] = {}
    for result in coco_results:
        detections_by_image.setdefault(int(result["image_id"]), []).append(result)
    truth_by_image: dict[int, list[Mapping[str, Any]]] = {}
    for annotation in coco_gt.get("annotations", []):
        truth_by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
    drawn = []
    for sample in sample_images:
        image_id = int(sample["image_id"])
        drawn.append(
            plots.draw_coco_detections(
                sample["image"],
                detections_by_image.get(image_id, []),
                names,
                scale=float(sample.get("scale", 1.0)),
                score_threshold=score_threshold,
                ground_truth=truth_by_image.get(image_id, []),
            )
        )
    return plots.image_grid(drawn, columns=columns)


def _ensure_experiment(client: "MlflowClient", uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=default_artifact_location(uri, name))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking store {uri}: experiment {name!r} is deleted; restore it (mlflow experiments restore) "
            "or set tracking.experiment to another name"
        )
    return experiment.experiment_id


def _anchorless_version() -> str:
    from anchorless import __version__

    return __version__


def _as_float(value: Any) -> float | None:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"
