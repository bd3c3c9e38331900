"""The local cluster: a Ray head with token auth and an MLflow server, brought up and down."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from anchorless.cluster import local
from anchorless.cluster.local import (
    ClusterError,
    cluster_down,
    cluster_status,
    cluster_up,
    read_state,
    state_path,
    write_state,
)

# Small enough for a shared 2-core machine; Ray's floor for the object store is 75 MiB. The
# slow tests' cluster runs with the local S3 server too (`cluster up --local --object-store`).
SMALL = {"num_cpus": 1, "object_store_memory": 80 * 1024**2, "object_store": True}


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fake_state(state_dir: Path) -> dict:
    port = _closed_port()
    return {
        "version": local.STATE_VERSION,
        "cluster_id": "0" * 32,
        "state_dir": str(state_dir),
        "token_file": str(state_dir / local.TOKEN_FILE),
        "ray_address": f"127.0.0.1:{port}",
        "dashboard_url": f"http://127.0.0.1:{port}",
        "mlflow_tracking_uri": f"http://127.0.0.1:{port}",
        "pids": {"ray": _dead_pid(), "mlflow": _dead_pid()},
        "ray": {"temp_dir": str(state_dir / "no-such-temp-dir")},
    }


# --------------------------------------------------------------------------- quick


def test_state_file_round_trips_and_a_failed_write_leaves_the_old_one_intact(tmp_path, monkeypatch):
    write_state(tmp_path, {"version": local.STATE_VERSION, "pids": {"ray": 1}})
    assert read_state(tmp_path) == {"version": local.STATE_VERSION, "pids": {"ray": 1}}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(local.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_state(tmp_path, {"version": local.STATE_VERSION, "pids": {"ray": 2}})
    assert read_state(tmp_path)["pids"] == {"ray": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [local.STATE_FILE]


def test_corrupt_state_file_is_a_clear_error_naming_the_file(tmp_path):
    state_path(tmp_path).write_text("{not json")
    with pytest.raises(ClusterError, match=rf"{state_path(tmp_path)}: not valid JSON .*remove it"):
        read_state(tmp_path)


def test_status_and_down_without_a_state_file_report_nothing_running(tmp_path):
    status = cluster_status(tmp_path)
    assert status["running"] is False
    assert {name: s["up"] for name, s in status["services"].items()} == {"ray": False, "jobs": False, "mlflow": False}
    assert cluster_down(tmp_path) == {"was_running": False, "stopped": []}


def test_stale_state_with_dead_processes_reads_as_down_and_down_removes_it(tmp_path):
    write_state(tmp_path, _fake_state(tmp_path))
    status = cluster_status(tmp_path)
    assert status["running"] is False
    assert not any(s["up"] for s in status["services"].values())
    assert cluster_down(tmp_path) == {"was_running": False, "stopped": []}
    assert not state_path(tmp_path).exists()


def test_a_requested_port_in_use_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClusterError, match=rf"port {port} is already in use"):
            cluster_up(tmp_path, dashboard_port=port)
    assert not state_path(tmp_path).exists()
    assert not (tmp_path / "ray.log").exists()


def test_reserved_ports_are_distinct_and_free():
    ports = local._reserve_ports({name: None for name in (*local._RAY_PORT_FLAGS, "mlflow")})
    assert len(set(ports.values())) == len(ports) == len(local._RAY_PORT_FLAGS) + 1
    for port in ports.values():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("local-cluster")
    state = cluster_up(state_dir, **SMALL)
    yield state
    cluster_down(state_dir)


def _listen_addresses(port: int) -> set[str]:
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    return {c.laddr.ip for c in listening if c.laddr.port == port}


def _get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket bound to loopback
    return (mapped or address).is_loopback


def _listening_sockets(cluster_id: str) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of the cluster's processes."""
    found = []
    for proc in local._cluster_processes(cluster_id):
        try:
            name = proc.name()
            connections = proc.net_connections("inet")
        except psutil.Error:  # a worker that exited meanwhile
            continue
        found += [(proc.pid, name, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    return found


def _mlflow_call(uri: str, method: str, path: str, body: dict | None, credentials: tuple[str, str] | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{uri}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(credentials).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def as_user(cluster, monkeypatch):
    """This process talks to the cluster's MLflow as its user account, as jobs and the CLI do."""
    username, password = local.read_credentials(cluster["mlflow"]["credentials"]["user"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return username, password


@pytest.mark.slow
def test_up_starts_ray_the_job_server_and_mlflow_all_answering(cluster):
    assert cluster["already_running"] is False
    status = cluster_status(cluster["state_dir"])
    assert status["running"] is True, status
    assert {name: s["up"] for name, s in status["services"].items()} == {"ray": True, "jobs": True, "mlflow": True, "s3": True}
    assert json.loads(state_path(cluster["state_dir"]).read_text())["pids"] == cluster["pids"]
    assert cluster["object_store"] == {"endpoint": f"http://127.0.0.1:{cluster['ports']['s3']}", "bucket": "anchorless"}
    assert cluster["env"] == {
        "RAY_ADDRESS": cluster["ray_address"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": cluster["token_file"],
        "MLFLOW_TRACKING_URI": cluster["mlflow_tracking_uri"],
        "AWS_ENDPOINT_URL": cluster["object_store"]["endpoint"],
        "AWS_ACCESS_KEY_ID": "anchorless-local",
        "AWS_SECRET_ACCESS_KEY": "anchorless-local",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.mark.slow
def test_every_port_of_the_cluster_listens_on_loopback_only(cluster):
    """Ray's single-machine mode: the GCS, the raylet, the dashboard and its agents, the
    runtime-env agent and every worker bind 127.0.0.1 (no documented exception), as do MLflow
    and the object store."""
    assert cluster["ray_address"] == f"127.0.0.1:{cluster['ports']['port']}"
    sockets = _listening_sockets(cluster["cluster_id"])
    names = {name for _, name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    ports = {port for _, _, _, port in sockets}
    for service in ("port", "dashboard-port", "mlflow", "s3"):
        assert cluster["ports"][service] in ports, (service, sockets)
    exposed = [entry for entry in sockets if not _is_loopback(entry[2])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert _listen_addresses(cluster["ports"]["dashboard-port"]) == {"127.0.0.1"}
    assert _listen_addresses(cluster["ports"]["mlflow"]) == {"127.0.0.1"}
    assert _listen_addresses(cluster["ports"]["s3"]) == {"127.0.0.1"}


@pytest.mark.slow
def test_mlflow_refuses_anonymous_requests_and_only_the_admin_moves_an_alias(cluster, as_user, tmp_path, monkeypatch):
    """The fault as an attacker tries it: an anonymous client, then one with the user account
    that jobs hold, try to point `champion` at a version directly; both are refused, and
    promotion (the admin account, the cluster's signing key) still moves it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from anchorless.platform.data.shards import FORMAT, FORMAT_VERSION
    from anchorless.platform.registry.promotion import promote

    state_dir = Path(cluster["state_dir"])
    files = cluster["mlflow"]["credentials"]
    for path in (files["user"], files["admin"], cluster["registry_signing_key_file"], cluster["mlflow"]["auth_config"]):
        assert Path(path).parent == state_dir and Path(path).stat().st_mode & 0o777 == 0o600, path
    admin = local.read_credentials(files["admin"])
    uri = cluster["mlflow_tracking_uri"]

    # The user account registers a version, as a training job does.
    user = MlflowClient(uri, registry_uri=uri)
    run = user.create_run(user.create_experiment("registry-auth"))
    (tmp_path / "weights.txt").write_text("not a model")
    user.log_artifact(run.info.run_id, str(tmp_path / "weights.txt"))
    user.create_registered_model("guarded")
    version = user.create_model_version("guarded", f"{run.info.artifact_uri}/weights.txt", run_id=run.info.run_id).version
    user.set_model_version_tag("guarded", version, "note", "users may tag versions")

    alias = {"name": "guarded", "alias": "champion", "version": version}
    assert _mlflow_call(uri, "POST", "/api/2.0/mlflow/registered-models/alias", alias) == 401
    assert _mlflow_call(uri, "POST", "/api/2.0/mlflow/experiments/create", {"name": "anonymous"}) == 401
    assert _mlflow_call(uri, "POST", "/api/2.0/mlflow/registered-models/alias", alias, as_user) == 403
    assert _mlflow_call(uri, "POST", "/ajax-api/2.0/mlflow/registered-models/alias", alias, as_user) == 403
    with pytest.raises(MlflowException, match="only by `anchorless models promote`"):
        user.set_registered_model_alias("guarded", "champion", version)
    assert user.get_registered_model("guarded").aliases == {}

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(
        json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "num_images": 1, "shards": []})
    )
    scores = {"AP": 0.3, "AP50": 0.5, "duplicate_rate": 0.0, "latency_ms": 5.0}
    key = Path(cluster["registry_signing_key_file"]).read_text().strip().encode()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])  # the account `models promote` uses
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    decision = promote(
        MlflowClient(uri, registry_uri=uri), "guarded", version, str(tmp_path / "shards"),
        evaluate_fn=lambda model_uri, shards: dict(scores), signing_key=key,
    )  # fmt: skip
    assert decision.promoted
    assert user.get_registered_model("guarded").aliases == {"champion": version}


@pytest.mark.slow
def test_a_job_reads_shards_from_the_object_store_and_mlflow_keeps_artifacts_there(cluster, tmp_path, monkeypatch):
    """Nothing on a shared disk: shards written to the cluster's bucket from this shell (with the
    variables `cluster up` prints) are read by a job; MLflow's artifacts land in the bucket."""
    import boto3
    from mlflow import MlflowClient

    from anchorless.jobs.submit import connect, wait_for_job
    from anchorless.platform.data.shards import write_shards
    from anchorless.platform.data.synth import generate_synthetic_coco

    for name, value in cluster["env"].items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    files = generate_synthetic_coco(tmp_path / "synth", num_images=6, size=32, progress=False)
    manifest = write_shards(files["train"], tmp_path / "synth" / "images", "s3://anchorless/tiny/train", workers=1, progress=False)

    client, _ = connect(state_dir=cluster["state_dir"])
    reader = (
        "from anchorless.platform.data.shards import coco_ground_truth, read_manifest; "
        "m = read_manifest('s3://anchorless/tiny/train', verify=True); "
        "print('job read', m['num_images'], 'images', len(coco_ground_truth('s3://anchorless/tiny/train')['annotations']), 'boxes')"
    )
    job_id = client.submit_job(entrypoint=f'python -c "{reader}"')
    status = wait_for_job(job_id, state_dir=cluster["state_dir"], timeout=120)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"job read {manifest['num_images']} images {manifest['num_boxes']} boxes" in logs

    username, password = local.read_credentials(cluster["mlflow"]["credentials"]["user"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    tracking = MlflowClient(cluster["mlflow_tracking_uri"])
    run = tracking.create_run(tracking.create_experiment("object-store"))
    (tmp_path / "note.txt").write_text("kept in the bucket")
    tracking.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))  # through the server's artifact proxy
    keys = [item["Key"] for item in boto3.client("s3").list_objects_v2(Bucket="anchorless", Prefix="mlflow/")["Contents"]]
    assert any(key.endswith(f"{run.info.run_id}/artifacts/note.txt") for key in keys), keys


@pytest.mark.slow
def test_job_server_requires_the_token_written_to_a_private_file(cluster):
    token_file = Path(cluster["token_file"])
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64
    jobs_url = f"{cluster['dashboard_url']}/api/jobs/"
    assert _get(jobs_url) == 401
    assert _get(jobs_url, token="not-the-token") == 403
    assert _get(jobs_url, token=token) == 200


@pytest.mark.slow
def test_second_up_reports_the_running_cluster_and_changes_nothing(cluster):
    before = state_path(cluster["state_dir"]).read_bytes()
    again = cluster_up(cluster["state_dir"], **SMALL)
    assert again["already_running"] is True
    assert again["pids"] == cluster["pids"] and again["ports"] == cluster["ports"]
    assert state_path(cluster["state_dir"]).read_bytes() == before


@pytest.mark.slow
def test_a_cluster_with_a_dead_service_is_cleaned_and_brought_up_fresh(cluster):
    state_dir = cluster["state_dir"]
    old = read_state(state_dir)
    os.killpg(old["pids"]["mlflow"], signal.SIGKILL)  # a process group this module's cluster started
    psutil.wait_procs([psutil.Process(old["pids"]["mlflow"])], timeout=10)
    status = cluster_status(state_dir)
    assert status["services"]["mlflow"]["up"] is False and status["running"] is False

    fresh = cluster_up(state_dir, **SMALL)
    assert fresh["already_running"] is False
    assert fresh["cluster_id"] != old["cluster_id"]
    assert set(fresh["pids"].values()).isdisjoint(old["pids"].values())
    assert local._cluster_processes(old["cluster_id"]) == []
    assert cluster_status(state_dir)["running"] is True
    assert Path(fresh["token_file"]).read_text() == Path(old["token_file"]).read_text()  # clients keep working
    for account in ("user", "admin"):  # the same accounts, still signing in, after a restart
        credentials = local.read_credentials(fresh["mlflow"]["credentials"][account])
        assert credentials == local.read_credentials(old["mlflow"]["credentials"][account])
        path = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        assert _mlflow_call(fresh["mlflow_tracking_uri"], "GET", path, None, credentials) == 200
    cluster.update(fresh)


@pytest.mark.slow
def test_down_leaves_no_process_and_no_state_file_and_is_idempotent(cluster):
    state_dir = cluster["state_dir"]
    state = read_state(state_dir)
    assert len(local._cluster_processes(state["cluster_id"])) >= 4  # ray start, GCS, raylet, dashboard, mlflow...

    result = cluster_down(state_dir)
    assert result == {"was_running": True, "stopped": ["ray", "mlflow", "s3"]}
    assert local._cluster_processes(state["cluster_id"]) == []
    assert not any(psutil.pid_exists(pid) for pid in state["pids"].values())
    assert not state_path(state_dir).exists()
    assert not Path(state["ray"]["temp_dir"]).exists()
    assert _listen_addresses(state["ports"]["dashboard-port"]) == set()
    assert _listen_addresses(state["ports"]["s3"]) == set()
    assert cluster_status(state_dir)["running"] is False
    assert cluster_down(state_dir) == {"was_running": False, "stopped": []}
