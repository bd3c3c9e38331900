"""MLflow tracking: one run per training run, logged from the driver and rank 0.

``Tracker.start`` (driver) resolves the tracking URI, checks the store answers,
creates the experiment and the run, or resumes a run by id so that worker
restarts and resumed runs never duplicate it. ``Tracker.attach`` (rank 0 of a
Ray Train worker) opens a client on that run. Everything logged during training
goes through :meth:`Tracker._call`: a transient failure is retried with backoff,
so a flaky tracking server never kills training.

A store that is still failing after the retries is an outage. With an :class:`Outbox`
(training gives one to the driver and to rank 0, in the run directory) the metrics,
params, tags and text artifacts it did not take are kept on disk, in order, and
delivered when it answers again, ahead of anything newer; nothing is lost to an outage
unless the outbox passes its bound, which is logged as an error. Without one, such a
call is dropped with a warning. Where the store is: :mod:`.store`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from anchorless.files import write_atomic, write_json_atomic
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

# What one attempt at the store came to.
_OK, _DOWN, _REFUSED = "ok", "down", "refused"

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


# --- the outbox ---------------------------------------------------------------------------------

# Calls a training run may keep through an outage: a metric batch per logged step is one
# entry, so this holds days of steps at the usual log_every_steps, in a few tens of MB.
DEFAULT_OUTBOX_ENTRIES = 100_000


class Outbox:
    """Tracking calls the store did not take, kept on disk in order until it answers again.

    One JSON line per call, appended, flushed and fsynced before :meth:`append` returns,
    so a process killed during an outage loses nothing it was asked to log (a line cut
    short by the kill is the only casualty, and is skipped on reading). Delivered calls
    are cut from the head of the file with an atomic rewrite. Replaying is safe twice:
    entries keep their original timestamps, and MLflow stores an identical metric point,
    param or tag once. ``<path>.counts.json`` keeps what was delivered late and what was
    dropped, for the run summary, across processes and restarts.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_entries: int = DEFAULT_OUTBOX_ENTRIES) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self._counts_path = self.path.with_name(self.path.name + ".counts.json")
        self.entries: list[dict[str, Any]] = self._read_entries()
        counts = _read_json(self._counts_path) or {}
        self.late = int(counts.get("late", 0))
        self.dropped = int(counts.get("dropped", 0))

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: dict[str, Any]) -> bool:
        """Keep ``entry``; False (and it is dropped, counted) when the outbox is full."""
        if len(self.entries) >= self.max_entries:
            self.dropped += 1
            self._save_counts()
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry) + "\n"  # NaN and inf stay numbers (Python's JSON reads them back)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.entries.append(entry)
        return True

    def keep_file(self, artifact_file: str, write: Callable[[Path], Any]) -> Path:
        """A folder beside the outbox for an artifact that waits with it; ``write(path)`` fills it."""
        folder = self.path.with_name(self.path.name + ".files") / f"{len(self.entries) + self.late + self.dropped:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / posixpath.basename(artifact_file)  # its own name: writers take the format from it
        write(path)  # not yet in the outbox: a file cut short by a kill is never sent
        return path

    def delivered(self, count: int, *, dropped: int = 0) -> None:
        """The first ``count`` entries reached the store (``dropped`` of them were refused by it)."""
        if count <= 0:
            return
        for entry in self.entries[:count]:
            if entry.get("call") == "log_artifact":
                shutil.rmtree(Path(entry["local_path"]).parent, ignore_errors=True)
        self.entries = self.entries[count:]
        self.late += count - dropped
        self.dropped += dropped
        if self.entries:
            write_atomic(self.path, "".join(json.dumps(entry) + "\n" for entry in self.entries))
        else:
            self.path.unlink(missing_ok=True)
        self._save_counts()

    def counts(self) -> dict[str, int]:
        return {"late": self.late, "dropped": self.dropped, "pending": len(self.entries)}

    def _save_counts(self) -> None:
        write_json_atomic(self._counts_path, {"late": self.late, "dropped": self.dropped})

    def _read_entries(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                log.error("%s:%d: a tracking call cut short when its writer was killed; skipped", self.path, number)
        return entries


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def outbox_counts(*paths: str | os.PathLike[str]) -> dict[str, int]:
    """Late, dropped and still pending tracking calls over the outboxes at ``paths`` (a run's summary)."""
    total = {"late": 0, "dropped": 0, "pending": 0}
    for path in paths:
        for key, value in Outbox(path).counts().items():
            total[key] += value
    return total


# --- the tracker --------------------------------------------------------------------------------


class Tracker:
    """An MLflow run seen through a client; every logging call is retried, then kept in the
    outbox (when there is one) or dropped.

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
        quiet_seconds: float = 15.0,
        outbox: Outbox | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.quiet_seconds = quiet_seconds
        self.outbox = outbox
        self.dropped_calls = 0
        self._down_until = 0.0  # monotonic time until which calls go to the outbox untried
        self._store_down = False  # the last call found the store down: probe once, no backoff
        # Rank 0 logs from the training thread and its logging thread: one call at a time keeps the order.
        self._lock = threading.RLock()

    # -- construction --

    @classmethod
    def start(
        cls,
        cfg: "ExperimentConfig",
        resume_run_id: str | None = None,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        outbox: Outbox | None = None,
    ) -> "Tracker":
        """Create the run named after the config (or resume ``resume_run_id``) on the driver.

        ``parent_run_id`` nests the new run under another (a campaign's trials under
        the campaign); ``tags`` are added to a new run; ``outbox`` keeps what an outage
        stops (a resumed run's outbox may still hold calls from before: they go first).
        """
        from mlflow import MlflowClient

        uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.workspace)
        limit_http_retries()
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = _ensure_experiment(client, uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
        if resume_run_id:
            return cls._reopen(client, uri, resume_run_id, outbox)
        run_name = cfg.tracking.run_name or cfg.name
        run_tags = {TAG_CONFIG_NAME: cfg.name, TAG_VERSION: _anchorless_version(), **(tags or {})}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        log.info("MLflow: run %s (%s) in experiment %r at %s", run_name, run.info.run_id, cfg.tracking.experiment, uri)
        return cls(client, run.info.run_id, uri, experiment_id=experiment_id, outbox=outbox)

    @classmethod
    def _reopen(cls, client: "MlflowClient", uri: str, run_id: str, outbox: Outbox | None = None) -> "Tracker":
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
        return cls(client, run_id, uri, experiment_id=run.info.experiment_id, outbox=outbox)

    @classmethod
    def attach(
        cls, cfg: "ExperimentConfig", run_id: str, tracking_uri: str | None = None, *, outbox: Outbox | None = None
    ) -> "Tracker":
        """Open the driver's run from rank 0 of a Ray Train worker; creates nothing.

        Pass the driver's ``tracker.tracking_uri``: a worker's environment and
        working directory may differ from the driver's.
        """
        from mlflow import MlflowClient

        uri = tracking_uri or resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.workspace)
        limit_http_retries()
        return cls(MlflowClient(tracking_uri=uri, registry_uri=uri), run_id, uri, outbox=outbox)

    # -- the retry wrapper --

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)`` with retries on transient errors; a warning and None if it still fails."""
        with self._lock:
            outcome, answer = self._attempt(functools.partial(fn, *args, **kwargs))
            if outcome == _OK:
                return answer
            self._drop(what, answer)
            return None

    def _attempt(self, call: Callable[[], T], *, retries: int | None = None) -> tuple[str, Any]:
        """``(_OK, answer)``, ``(_DOWN, error)`` when transient failures outlast the retries, or
        ``(_REFUSED, error)`` when the store rejects the request itself (no retry can fix it).

        After ``_DOWN`` the store is taken to be down until a call goes through: each call
        gets one attempt only, and calls with an outbox do not even try for ``quiet_seconds``,
        so an outage costs training one quick probe now and then, not a round of backoff per call.
        """
        if retries is None:  # a store known to be down is probed once, not backed off from again
            retries = 0 if self._store_down else self.retries
        attempt = 0
        while True:
            try:
                answer = call()
                self._down_until, self._store_down = 0.0, False
                return _OK, answer
            except Exception as exc:  # the store's failures must never reach the training loop
                if not is_transient(exc):
                    return _REFUSED, exc
                if attempt >= retries:
                    self._down_until, self._store_down = time.monotonic() + self.quiet_seconds, True
                    return _DOWN, exc
                delay = self.backoff_seconds * (2**attempt)
                log.info("MLflow call failed (%s); retrying in %.1fs", short_reason(exc), delay)
                time.sleep(delay)
                attempt += 1

    def _drop(self, what: str, exc: BaseException) -> None:
        self.dropped_calls += 1
        log.warning("MLflow %s dropped: %s", what, short_reason(exc))

    def _send(self, what: str, entry: dict[str, Any]) -> None:
        """A call in its JSON form: after what the outbox holds, in order; into it while the store is down."""
        with self._lock:
            if self.outbox is not None and len(self.outbox):
                if time.monotonic() < self._down_until or not self._deliver_outbox(self.outbox):
                    self._keep(what, entry, "the store is down")
                    return
            outcome, answer = self._attempt(functools.partial(self._replay, entry))
            if outcome == _DOWN and self.outbox is not None:
                self._keep(what, entry, short_reason(answer))
            elif outcome != _OK:
                self._drop(what, answer)

    def _keep(self, what: str, entry: dict[str, Any], reason: str) -> None:
        """Into the outbox; past its bound, dropped and said loudly."""
        assert self.outbox is not None
        if not self.outbox.append(entry):
            if entry["call"] == "log_artifact":
                shutil.rmtree(Path(entry["local_path"]).parent, ignore_errors=True)
            log.error(
                "MLflow %s LOST: the tracking outbox %s is full (%d calls waiting for the store); "
                "%d call(s) lost so far", what, self.outbox.path, len(self.outbox), self.outbox.dropped,
            )  # fmt: skip
        elif len(self.outbox) == 1 or len(self.outbox) % 100 == 0:
            log.warning(
                "MLflow %s failed (%s); kept in %s (%d call(s) waiting), sent when the store answers again",
                what, reason, self.outbox.path, len(self.outbox),
            )  # fmt: skip

    def flush(self, outbox: Outbox | None = None, *, patience_seconds: float = 0.0) -> dict[str, int]:
        """Deliver what ``outbox`` (default this tracker's) holds, trying the store now and, while
        it does not answer, every few seconds for ``patience_seconds``; its counts after.

        The driver calls it at the end of a run for rank 0's outbox and its own, so calls rank
        0 could not deliver before it ended reach the run too.
        """
        outbox = self.outbox if outbox is None else outbox  # not `or`: an empty Outbox is falsy (len 0)
        if outbox is None:
            return {"late": 0, "dropped": 0, "pending": 0}
        deadline = time.monotonic() + patience_seconds
        with self._lock:
            if len(outbox):
                # A full round of retries first, whatever came before; then a probe every few seconds.
                delivered = self._deliver_outbox(outbox, first_retries=self.retries)
                if not delivered and patience_seconds > 0:
                    log.warning(
                        "MLflow at %s does not answer; waiting up to %.0f s to deliver the %d call(s) in %s",
                        self.tracking_uri, patience_seconds, len(outbox), outbox.path,
                    )  # fmt: skip
                while not delivered and time.monotonic() < deadline:
                    time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                    delivered = self._deliver_outbox(outbox, first_retries=0)
                if not delivered:
                    log.error(
                        "MLflow: %d tracking call(s) still waiting in %s (the store at %s does not answer); "
                        "they are sent when this run is resumed", len(outbox), outbox.path, self.tracking_uri,
                    )  # fmt: skip
            return outbox.counts()

    def _deliver_outbox(self, outbox: Outbox, *, first_retries: int | None = None) -> bool:
        """Send the outbox's calls in order; True when all went (one the store refuses is dropped, counted)."""
        sent = refused = 0
        try:
            for entry in outbox.entries:
                # The first call probes the store; the rest go while it answers, without backoff.
                retries = first_retries if sent == 0 else 0
                outcome, answer = self._attempt(functools.partial(self._replay, entry), retries=retries)
                if outcome == _DOWN:
                    break
                if outcome == _REFUSED:
                    refused += 1
                    log.error("MLflow refused a late %s from %s: %s; dropped", entry.get("call"), outbox.path, short_reason(answer))
                sent += 1
        finally:
            outbox.delivered(sent, dropped=refused)
        if sent and not len(outbox):
            log.warning("MLflow answers again: %d late tracking call(s) delivered from %s", sent - refused, outbox.path)
        return not len(outbox)

    def _replay(self, entry: dict[str, Any]) -> Any:
        """Make the client call an outbox entry describes."""
        from mlflow.entities import Metric, Param, RunTag

        call = entry["call"]
        if call == "log_batch":
            return self.client.log_batch(
                self.run_id,
                metrics=[Metric(key, value, timestamp, step) for key, value, timestamp, step in entry.get("metrics", [])],
                params=[Param(key, value) for key, value in entry.get("params", [])],
                tags=[RunTag(key, value) for key, value in entry.get("tags", [])],
            )
        if call == "log_text":
            return self.client.log_text(self.run_id, entry["text"], entry["artifact_file"])
        if call == "log_dict":
            return self.client.log_dict(self.run_id, entry["dictionary"], entry["artifact_file"])
        if call == "set_terminated":
            return self.client.set_terminated(self.run_id, status=entry["status"])
        if call == "log_artifact":
            folder = posixpath.dirname(entry["artifact_file"]) or None
            return self.client.log_artifact(self.run_id, entry["local_path"], folder)
        raise ValueError(f"unknown outbox call {call!r}")

    # -- logging --

    def log_params_and_config(
        self, cfg: "ExperimentConfig", deepspeed_config: Mapping[str, Any] | None, manifest: Mapping[str, Any]
    ) -> None:
        """Config as flattened params, provenance as tags, config files as artifacts."""
        self._log_params(cfg.flat())
        self._log_provenance(cfg, manifest)
        self._send("log_text(config)", {"call": "log_text", "text": cfg.to_yaml(), "artifact_file": CONFIG_ARTIFACT})
        if deepspeed_config is not None:
            self.log_dict(dict(deepspeed_config), DEEPSPEED_ARTIFACT)
        self.log_dict(manifest, MANIFEST_ARTIFACT)

    def _log_params(self, flat_config: Mapping[str, Any]) -> None:
        """New params only: on a resumed run the logged ones are kept (MLflow params are
        immutable) and changed values are named in a warning."""
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
        params = [[key, value] for key, value in wanted.items() if key not in logged]
        for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            self._send("log_batch(params)", {"call": "log_batch", "params": list(chunk)})

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
        """One ``log_batch`` per call; values that are not numbers are skipped. Each point keeps
        the time it was logged at, also when an outage delivers it late."""
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            number = _as_float(value)
            if number is not None:
                entries.append([key, number, timestamp, int(step)])
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._send("log_batch(metrics)", {"call": "log_batch", "metrics": list(chunk)})

    def log_dict(self, document: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON artifact; values JSON cannot hold (arrays, paths) become lists or text."""
        self._send(f"log_dict({artifact_file})", {"call": "log_dict", "dictionary": _jsonable(document), "artifact_file": artifact_file})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._send_file(
            f"log_figure({artifact_file})", artifact_file,
            lambda: self.client.log_figure(self.run_id, figure, artifact_file), lambda path: figure.savefig(path),
        )  # fmt: skip

    def log_image(self, image: Any, artifact_file: str) -> None:
        from PIL import Image

        def save(path: Path) -> None:
            (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(path)

        self._send_file(
            f"log_image({artifact_file})", artifact_file, lambda: self.client.log_image(self.run_id, image, artifact_file), save
        )  # fmt: skip

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        name = Path(local_path).name
        self._send_file(
            "log_artifact", f"{artifact_path}/{name}" if artifact_path else name,
            lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_path),
            lambda path: shutil.copyfile(local_path, path),
        )  # fmt: skip

    def _send_file(self, what: str, artifact_file: str, call: Callable[[], Any], write: Callable[[Path], Any]) -> None:
        """An artifact: sent now, or written beside the outbox and kept there (in order) while the store is down."""
        with self._lock:
            if self.outbox is None or not len(self.outbox) or (time.monotonic() >= self._down_until and self._deliver_outbox(self.outbox)):
                outcome, answer = self._attempt(call)
                if outcome == _OK:
                    return
                if outcome == _REFUSED or self.outbox is None:
                    self._drop(what, answer)
                    return
            try:
                local = self.outbox.keep_file(artifact_file, write)
            except Exception as exc:  # a picture that cannot be saved must not stop training either
                self._drop(what, exc)
                return
            self._keep(what, {"call": "log_artifact", "local_path": str(local), "artifact_file": artifact_file}, "the store is down")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_tags = [[key, str(value)] for key, value in tags.items()]
        for chunk in _chunks(run_tags, 100):
            self._send("log_batch(tags)", {"call": "log_batch", "tags": list(chunk)})

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED (after whatever the outbox still holds)."""
        self._send("set_terminated", {"call": "set_terminated", "status": status})


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
