"""MLflow tracking: one run per training run, logged from the driver and rank 0.

``Tracker.start`` (driver) resolves the tracking URI, checks the store answers,
creates the experiment and the run, or resumes a run by id so that worker
restarts and resumed runs never duplicate it. ``Tracker.attach`` (rank 0 of a
Ray Train worker) opens a client on that run. Everything logged during training
goes through :meth:`Tracker._call`: a transient failure is retried with backoff
and, if the store is still failing, logged as a warning and dropped, so a flaky
tracking server never kills training. Where the store is: :mod:`.store`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from anchorless.platform.data.shards import manifest_checksum
from anchorless.platform.tracking.store import (
    CONFIG_ARTIFACT,
    DEEPSPEED_ARTIFACT,
    MANIFEST_ARTIFACT,
    TAG_CONFIG_NAME,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_MANIFEST_SHA256,
    TAG_SOURCE_SHA256,
    TAG_VERSION,
    TrackingError,
    check_reachable,
    default_artifact_location,
    is_transient,
    limit_http_retries,
    resolve_tracking_uri,
    short_reason,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from anchorless.platform.config import ExperimentConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

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

        uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.workspace)
        limit_http_retries()
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = _ensure_experiment(client, uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
        if resume_run_id:
            return cls._reopen(client, uri, resume_run_id)
        run_name = cfg.tracking.run_name or cfg.name
        run_tags = {TAG_CONFIG_NAME: cfg.name, TAG_VERSION: _anchorless_version(), **(tags or {})}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        log.info("MLflow: run %s (%s) in experiment %r at %s", run_name, run.info.run_id, cfg.tracking.experiment, uri)
        return cls(client, run.info.run_id, uri, experiment_id=experiment_id)

    @classmethod
    def _reopen(cls, client: "MlflowClient", uri: str, run_id: str) -> "Tracker":
        """A run by id, marked RUNNING again: worker restarts and resumed runs never duplicate it."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise TrackingError(f"tracking store {uri}: no run {run_id} to resume") from None
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"tracking store {uri}: run {run_id} is deleted; restore it or start afresh")
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: resumed run %s (%s) at %s", run.info.run_name, run_id, uri)
        return cls(client, run_id, uri, experiment_id=run.info.experiment_id)

    @classmethod
    def attach(cls, cfg: "ExperimentConfig", run_id: str, tracking_uri: str | None = None) -> "Tracker":
        """Open the driver's run from rank 0 of a Ray Train worker; creates nothing.

        Pass the driver's ``tracker.tracking_uri``: a worker's environment and
        working directory may differ from the driver's.
        """
        from mlflow import MlflowClient

        uri = tracking_uri or resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.workspace)
        limit_http_retries()
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
                    log.warning("MLflow %s dropped after %d attempt(s): %s", what, attempt + 1, short_reason(exc))
                    return None
                delay = self.backoff_seconds * (2**attempt)
                log.info("MLflow %s failed (%s); retrying in %.1fs", what, short_reason(exc), delay)
                time.sleep(delay)
                attempt += 1

    # -- logging --

    def log_params_and_config(
        self, cfg: "ExperimentConfig", deepspeed_config: Mapping[str, Any] | None, manifest: Mapping[str, Any]
    ) -> None:
        """Config as flattened params, provenance as tags, config files as artifacts."""
        self._log_params(cfg.flat())
        self._log_provenance(cfg, manifest)
        self._call("log_text(config)", self.client.log_text, self.run_id, cfg.to_yaml(), CONFIG_ARTIFACT)
        if deepspeed_config is not None:
            self.log_dict(dict(deepspeed_config), DEEPSPEED_ARTIFACT)
        self.log_dict(manifest, MANIFEST_ARTIFACT)

    def _log_params(self, flat_config: Mapping[str, Any]) -> None:
        """New params only: on a resumed run the logged ones are kept (MLflow params are
        immutable) and changed values are named in a warning."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        wanted = {key[:MAX_ENTITY_KEY_LENGTH]: param_value(value) for key, value in flat_config.items()}
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

    def _log_provenance(self, cfg: "ExperimentConfig", manifest: Mapping[str, Any]) -> None:
        """Tags tying the run to its data (manifest and source checksums) and code (version, git commit)."""
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
        self.set_tags(tags)

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

    def log_dict(self, document: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact; values JSON cannot hold (arrays, paths) become lists or text."""
        self._call(f"log_dict({artifact_file})", self.client.log_dict, self.run_id, _jsonable(document), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._call(f"log_figure({artifact_file})", self.client.log_figure, self.run_id, figure, artifact_file)

    def log_image(self, image: Any, artifact_file: str) -> None:
        self._call(f"log_image({artifact_file})", self.client.log_image, self.run_id, image, artifact_file)

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


def _ensure_experiment(client: "MlflowClient", uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created (its artifacts at ``artifact_location`` when given) if it is new."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            location = artifact_location.rstrip("/") + "/" + name if artifact_location else default_artifact_location(uri, name)
            return client.create_experiment(name, artifact_location=location)
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
