"""MLflow tracking against a temporary SQLite store: what lands in the run, resume, retries."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from anchorless.platform.evaluation import plots
from anchorless.platform.config import build_config
from anchorless.platform.tracking.store import CONFIG_ARTIFACT, DEEPSPEED_ARTIFACT, TAG_GIT_COMMIT, TAG_MANIFEST_SHA256, TAG_SOURCE_SHA256, TAG_VERSION, TrackingError
from anchorless.platform.tracking.tracker import Outbox, Tracker, git_state, manifest_checksum, outbox_counts, param_value

MANIFEST = {"source": {"sha256": "ab" * 32}, "categories": [{"label": 0, "coco_id": 1, "name": "a"}], "num_images": 4}
DEEPSPEED = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """One SQLite store for the module: creating its tables takes seconds."""
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(autouse=True)
def _no_env_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cfg(workspace: Path, run_name: str, **overrides) -> object:
    raw = {"name": run_name, "workspace": str(workspace), "tracking": {"experiment": "tracking-tests"}}
    raw.update(overrides)
    return build_config(raw)


class _SpyClient:
    """Forwards to a real client and records each log_batch's sizes."""

    def __init__(self, client):
        self._client = client
        self.batches: list[tuple[int, int, int]] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        self.batches.append((len(metrics), len(params), len(tags)))
        return self._client.log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_start_uses_the_workspace_sqlite_store_and_logs_params_tags_and_config_artifacts(workspace):
    # A very long name exercises MLflow's param length limit; run_name keeps the run readable.
    cfg = _cfg(workspace, "x" * 7000, tracking={"experiment": "tracking-tests", "run_name": "params-run"})
    tracker = Tracker.start(cfg)
    assert tracker.tracking_uri == f"sqlite:///{(workspace / 'mlflow.db').resolve().as_posix()}"
    spy = _SpyClient(tracker.client)
    tracker.client = spy
    tracker.log_params_and_config(cfg, DEEPSPEED, MANIFEST)
    tracker.finish()

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "params-run"
    assert run.info.status == "FINISHED"
    flat = cfg.flat()
    assert len(flat) > 0 and run.data.params == {key: param_value(value) for key, value in flat.items()}
    assert run.data.params["data.image_size"] == "512"
    assert run.data.params["training.optimizer.betas"] == "[0.9, 0.999]"
    assert len(run.data.params["name"]) == 6000 and run.data.params["name"].endswith("...")
    assert all(params <= 100 for _, params, _ in spy.batches)
    assert sum(params for _, params, _ in spy.batches) == len(flat)

    assert run.data.tags[TAG_MANIFEST_SHA256] == manifest_checksum(MANIFEST)
    assert run.data.tags[TAG_SOURCE_SHA256] == "ab" * 32
    assert run.data.tags[TAG_VERSION] == "0.1.0"
    state = git_state()
    if state is None:
        assert TAG_GIT_COMMIT not in run.data.tags
    else:
        assert run.data.tags[TAG_GIT_COMMIT] == state[0] and len(state[0]) == 40

    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (workspace.resolve() / "mlartifacts" / "tracking-tests").as_uri()
    local = Path(client.download_artifacts(tracker.run_id, "config", str(workspace / "download")))
    assert yaml.safe_load((local / Path(CONFIG_ARTIFACT).name).read_text()) == cfg.to_dict()
    assert json.loads((local / Path(DEEPSPEED_ARTIFACT).name).read_text()) == DEEPSPEED


def test_resume_continues_the_same_run_and_keeps_its_params(workspace, caplog):
    cfg = _cfg(workspace, "resume-run")
    first = Tracker.start(cfg)
    first.log_params_and_config(cfg, DEEPSPEED, MANIFEST)
    first.log_metrics({"loss": 2.0, "lr": 1e-3}, step=1)
    # The driver dies here without finishing the run; the re-run resumes it with a changed epoch count.
    changed = _cfg(workspace, "resume-run", training={"epochs": 20})
    with caplog.at_level(logging.WARNING, logger="anchorless.platform.tracking.tracker"):
        second = Tracker.start(changed, resume_run_id=first.run_id)
        second.log_params_and_config(changed, DEEPSPEED, MANIFEST)
    second.log_metrics({"loss": 1.0}, step=2)
    second.finish()

    assert second.run_id == first.run_id
    assert "training.epochs" in caplog.text
    client = MlflowClient(second.tracking_uri)
    runs = client.search_runs([second.experiment_id], filter_string="attributes.run_name = 'resume-run'")
    assert [run.info.run_id for run in runs] == [first.run_id]
    run = runs[0]
    assert run.data.params["training.epochs"] == "12"  # params are immutable: the original stays
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.0), (2, 1.0)]


def test_resume_of_an_unknown_run_is_a_clear_error(workspace):
    with pytest.raises(TrackingError, match="no run 0123456789abcdef to resume"):
        Tracker.start(_cfg(workspace, "missing"), resume_run_id="0123456789abcdef")


def test_attach_logs_to_the_drivers_run_without_creating_one(workspace):
    cfg = _cfg(workspace, "attach-run")
    driver = Tracker.start(cfg)
    worker = Tracker.attach(cfg, driver.run_id, tracking_uri=driver.tracking_uri)
    worker.log_metrics({"images_per_second": 12.5, "not_a_number": "n/a"}, step=3)
    client = MlflowClient(driver.tracking_uri)
    runs = client.search_runs([driver.experiment_id], filter_string="attributes.run_name = 'attach-run'")
    assert len(runs) == 1
    assert runs[0].data.metrics == {"images_per_second": 12.5}


class _FlakyClient:
    """Raises a transient error on the first ``failures`` calls of log_batch."""

    def __init__(self, failures: int, error: Exception):
        self.failures = failures
        self.error = error
        self.calls = 0
        self.logged: list = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        self.logged.extend(metrics)


def test_transient_failures_are_retried_until_the_metrics_land():
    client = _FlakyClient(2, MlflowException("store busy", error_code=TEMPORARILY_UNAVAILABLE))
    tracker = Tracker(client, "run", "test://", retries=3, backoff_seconds=0.0)
    tracker.log_metrics({"loss": 0.5}, step=7)
    assert client.calls == 3
    assert [(m.key, m.value, m.step) for m in client.logged] == [("loss", 0.5, 7)]
    assert tracker.dropped_calls == 0


def test_without_an_outbox_a_store_that_keeps_failing_drops_the_metrics_with_a_warning_instead_of_raising(caplog):
    client = _FlakyClient(10**6, ConnectionError("Connection refused"))
    tracker = Tracker(client, "run", "test://", retries=3, backoff_seconds=0.001)
    with caplog.at_level(logging.WARNING, logger="anchorless.platform.tracking.tracker"):
        tracker.log_metrics({"loss": 0.5}, step=7)
    assert client.calls == 4  # the first try and three retries
    assert tracker.dropped_calls == 1
    assert "log_batch(metrics) dropped: connection refused" in caplog.text
    # While the store is down, each call gets a single attempt: training is not held up.
    tracker.log_metrics({"loss": 0.4}, step=8)
    assert client.calls == 5 and tracker.dropped_calls == 2
    # Once it answers again, calls go through and a later hiccup is retried again.
    client.failures = client.calls
    tracker.log_metrics({"loss": 0.3}, step=9)
    client.failures = client.calls + 1
    tracker.log_metrics({"loss": 0.2}, step=10)
    assert [m.step for m in client.logged] == [9, 10] and client.calls == 8


def test_an_invalid_request_is_not_retried():
    client = _FlakyClient(10**6, MlflowException.invalid_parameter_value("bad key"))
    tracker = Tracker(client, "run", "test://", retries=3, backoff_seconds=10.0)
    tracker.log_metrics({"bad key!": 1.0}, step=0)
    assert client.calls == 1 and tracker.dropped_calls == 1


class _OutageClient:
    """A store that is up or down (``down``): while down every call fails as a refused connection."""

    def __init__(self):
        self.down = False
        self.calls: list[tuple] = []  # what reached the store, in order

    def _answer(self, *call):
        if self.down:
            raise ConnectionError("Connection refused")
        self.calls.append(call)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._answer("batch", [(m.key, m.value, m.timestamp, m.step) for m in metrics], [(p.key, p.value) for p in params], [(t.key, t.value) for t in tags])

    def log_text(self, run_id, text, artifact_file):
        self._answer("text", artifact_file, text)

    def log_dict(self, run_id, dictionary, artifact_file):
        self._answer("dict", artifact_file, dictionary)

    def set_terminated(self, run_id, status=None):
        self._answer("terminated", status)

    def log_image(self, run_id, image, artifact_file):
        self._answer("image", artifact_file)

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self._answer("artifact", artifact_path, Path(local_path).name, Path(local_path).read_bytes()[:4])

    def steps(self) -> list[int]:
        """The step of each metric batch that reached the store."""
        return [call[1][0][3] for call in self.calls if call[0] == "batch" and call[1]]


def _outage_tracker(client, path: Path, **options) -> Tracker:
    return Tracker(client, "run", "test://", retries=1, backoff_seconds=0.0, quiet_seconds=0.0, outbox=Outbox(path, **options))


def test_an_outage_keeps_every_call_on_disk_and_delivers_them_in_order_when_the_store_answers(tmp_path, caplog):
    client = _OutageClient()
    outbox_path = tmp_path / "run" / "tracking_outbox.rank0.jsonl"
    tracker = _outage_tracker(client, outbox_path)
    tracker.log_metrics({"loss": 1.0}, step=1)
    client.down = True
    with caplog.at_level(logging.WARNING, logger="anchorless.platform.tracking.tracker"):
        for step in range(2, 7):
            tracker.log_metrics({"loss": 1.0 / step, "lr": float("nan")}, step=step)
        tracker.set_tags({"phase": "outage"})
        tracker.log_dict({"AP": 0.5}, "eval/summary.json")
    assert client.calls and client.steps() == [1]
    lines = outbox_path.read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["metrics"][0][3] == 2  # on disk, one JSON line per call
    assert "kept in" in caplog.text and "dropped" not in caplog.text

    client.down = False
    tracker.log_metrics({"loss": 0.1}, step=7)  # the store answers: the backlog goes first, then this
    assert client.steps() == [1, 2, 3, 4, 5, 6, 7]
    assert [call[0] for call in client.calls] == ["batch"] * 6 + ["batch", "dict", "batch"]
    assert client.calls[6][3] == [("phase", "outage")] and client.calls[7][1:] == ("eval/summary.json", {"AP": 0.5})
    late_nan = client.calls[1][1][1]
    assert late_nan[0] == "lr" and math.isnan(late_nan[1])
    # Each late point keeps the time it was logged at, not the time it was delivered.
    assert client.calls[1][1][0][2] <= client.calls[-1][1][0][2]
    assert not outbox_path.exists()
    assert tracker.flush() == {"late": 7, "dropped": 0, "pending": 0} and tracker.dropped_calls == 0


def test_what_a_killed_process_left_in_its_outbox_is_delivered_by_the_next_one(tmp_path, caplog):
    client = _OutageClient()
    path = tmp_path / "outbox.jsonl"
    client.down = True
    first = _outage_tracker(client, path)
    for step in (1, 2, 3):
        first.log_metrics({"loss": 1.0}, step=step)
    with open(path, "a") as handle:  # the kill cut the last line short
        handle.write('{"call": "log_batch", "metr')
    client.down = False
    with caplog.at_level(logging.ERROR, logger="anchorless.platform.tracking.tracker"):
        restarted = _outage_tracker(client, path)
    assert "cut short" in caplog.text
    assert restarted.flush() == {"late": 3, "dropped": 0, "pending": 0}
    assert client.steps() == [1, 2, 3]
    assert outbox_counts(path) == {"late": 3, "dropped": 0, "pending": 0}  # what the run summary reads


def test_the_driver_reports_rank_zeros_late_calls_even_once_rank_zero_delivered_them_all(tmp_path):
    """The end of a run: rank 0 already sent its backlog, leaving an empty outbox with counts;
    the driver's flush of that outbox returns its counts, not the driver's own outbox's."""
    client = _OutageClient()
    rank0_path = tmp_path / "tracking_outbox.rank0.jsonl"
    rank0 = _outage_tracker(client, rank0_path)
    client.down = True
    for step in (1, 2):
        rank0.log_metrics({"loss": 1.0}, step=step)
    client.down = False
    assert rank0.flush() == {"late": 2, "dropped": 0, "pending": 0} and not rank0_path.exists()
    driver = _outage_tracker(client, tmp_path / "tracking_outbox.driver.jsonl")
    assert driver.flush(Outbox(rank0_path)) == {"late": 2, "dropped": 0, "pending": 0}
    assert driver.flush() == {"late": 0, "dropped": 0, "pending": 0}


def test_only_an_outbox_past_its_bound_drops_and_says_so_loudly(tmp_path, caplog):
    client = _OutageClient()
    client.down = True
    tracker = _outage_tracker(client, tmp_path / "outbox.jsonl", max_entries=3)
    with caplog.at_level(logging.ERROR, logger="anchorless.platform.tracking.tracker"):
        for step in range(1, 6):
            tracker.log_metrics({"loss": 1.0}, step=step)
    assert caplog.text.count("LOST") == 2 and "outbox.jsonl is full" in caplog.text
    client.down = False
    assert tracker.flush() == {"late": 3, "dropped": 2, "pending": 0}
    assert client.steps() == [1, 2, 3]


def test_a_store_still_down_at_the_end_leaves_the_calls_pending_on_disk(tmp_path, caplog):
    client = _OutageClient()
    client.down = True
    tracker = _outage_tracker(client, tmp_path / "outbox.jsonl")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish("FINISHED")
    with caplog.at_level(logging.ERROR, logger="anchorless.platform.tracking.tracker"):
        assert tracker.flush() == {"late": 0, "dropped": 0, "pending": 2}
    assert "2 tracking call(s) still waiting" in caplog.text
    client.down = False
    assert _outage_tracker(client, tmp_path / "outbox.jsonl").flush()["late"] == 2
    assert client.calls[-1] == ("terminated", "FINISHED")


def test_the_end_of_a_run_waits_out_an_outage_before_giving_up(tmp_path):
    client = _OutageClient()
    client.down = True
    tracker = _outage_tracker(client, tmp_path / "outbox.jsonl")
    tracker.log_metrics({"loss": 1.0}, step=1)
    threading.Timer(0.5, lambda: setattr(client, "down", False)).start()  # the store is back half a second later
    started = time.monotonic()
    assert tracker.flush(patience_seconds=30) == {"late": 1, "dropped": 0, "pending": 0}
    assert 0.5 <= time.monotonic() - started < 10 and client.steps() == [1]


def test_pictures_logged_during_an_outage_wait_on_disk_beside_the_outbox_and_arrive_after(tmp_path):
    client = _OutageClient()
    tracker = _outage_tracker(client, tmp_path / "outbox.jsonl")
    client.down = True
    tracker.log_image(np.zeros((4, 6, 3), dtype=np.uint8), "eval/step_9/predictions.png")
    tracker.log_metrics({"AP": 0.25}, step=9)
    assert [p.name for p in (tmp_path / "outbox.jsonl.files").rglob("*.png")] == ["predictions.png"]
    client.down = False
    tracker.log_image(np.zeros((4, 6, 3), dtype=np.uint8), "eval/step_10/predictions.png")
    assert [call[:3] for call in client.calls] == [
        ("artifact", "eval/step_9", "predictions.png"), ("batch", [("AP", 0.25, client.calls[1][1][0][2], 9)], []),
        ("image", "eval/step_10/predictions.png"),
    ]  # fmt: skip
    assert client.calls[0][3] == b"\x89PNG"
    assert not any((tmp_path / "outbox.jsonl.files").iterdir())  # delivered files are removed


def test_an_unreachable_tracking_server_is_a_quick_error_naming_the_uri(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    cfg = build_config({"workspace": str(tmp_path), "tracking": {"tracking_uri": uri}})
    started = time.monotonic()
    with pytest.raises(TrackingError) as error:
        Tracker.start(cfg)
    assert time.monotonic() - started < 10
    assert str(error.value) == f"tracking store {uri} is not reachable: connection refused"


# --- evaluation artifacts --------------------------------------------------------------------------

def test_log_evaluation_stores_summary_a_pr_curve_per_class_and_an_image_grid(workspace):
    from tests.platform.evaluation.test_plots import COCO_GT

    tracker = Tracker.start(_cfg(workspace, "evaluation-run"))
    results = [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 18, 18], "score": 0.9}]
    network_image = np.zeros((3, 128, 128), dtype=np.uint8)  # a letterboxed copy at scale 2
    samples = [
        {"image": network_image, "image_id": 1, "scale": 2.0},
        {"image": np.zeros((48, 64, 3), np.uint8), "image_id": 2},
    ]
    summary = {"AP": 0.25, "per_class_AP": {"box": 0.5, "tall box": 0.0}}
    plots.log_evaluation(tracker, summary, 40, COCO_GT, results, samples)

    client = MlflowClient(tracker.tracking_uri)
    files = {item.path for item in client.list_artifacts(tracker.run_id, "evaluation/step_0000040")}
    curves = {item.path for item in client.list_artifacts(tracker.run_id, "evaluation/step_0000040/pr_curves")}
    assert files == {
        "evaluation/step_0000040/summary.json",
        "evaluation/step_0000040/predictions.png",
        "evaluation/step_0000040/pr_curves",
    }
    assert curves == {"evaluation/step_0000040/pr_curves/1_box.png", "evaluation/step_0000040/pr_curves/2_tall_box.png"}
    local = Path(client.download_artifacts(tracker.run_id, "evaluation/step_0000040", str(workspace / "eval-download")))
    assert json.loads((local / "summary.json").read_text()) == summary
