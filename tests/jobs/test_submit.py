"""Ray job submission: address and token resolution, and jobs run on a token-auth cluster."""

from __future__ import annotations

import io
import os
import shlex
import zipfile
from pathlib import Path

import pytest

from anchorless.cluster import local
from anchorless.cluster.local import cluster_down, cluster_up, write_state
from anchorless.jobs import submit as jobs
from anchorless.jobs.submit import AuthError, JobError

HELLO = "hello from anchorless"
AUTH_AND_ADDRESS_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in (*AUTH_AND_ADDRESS_VARIABLES, "MLFLOW_TRACKING_URI", "ANCHORLESS_CLUSTER_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.ray/auth_token unless a test writes one


def _state(state_dir: Path, *, token: str = "local-token") -> dict:
    token_file = state_dir / local.TOKEN_FILE
    token_file.write_text(token)
    state = {
        "version": local.STATE_VERSION,
        "cluster_id": "c" * 32,
        "state_dir": str(state_dir),
        "token_file": str(token_file),
        "ray_address": "10.0.0.5:41000",
        "dashboard_url": "http://127.0.0.1:41001",
        "mlflow_tracking_uri": "http://127.0.0.1:41002",
        "pids": {},
    }
    write_state(state_dir, state)
    return state


# --------------------------------------------------------------------------- quick


def test_address_comes_from_the_argument_then_ray_address_then_the_local_state(tmp_path, monkeypatch):
    _state(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "http://env-head:8265")
    assert jobs.resolve_target("remote-head:8265", state_dir=tmp_path).address == "http://remote-head:8265"
    assert jobs.resolve_target(None, state_dir=tmp_path).address == "http://env-head:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    target = jobs.resolve_target(None, state_dir=tmp_path)
    assert (target.address, target.mlflow_tracking_uri) == ("http://127.0.0.1:41001", "http://127.0.0.1:41002")


def test_the_local_clusters_gcs_address_means_its_job_server(tmp_path):
    _state(tmp_path)
    target = jobs.resolve_target("10.0.0.5:41000", state_dir=tmp_path)
    assert target.address == "http://127.0.0.1:41001"
    assert target.token == "local-token"


def test_no_address_anywhere_is_one_clear_error(tmp_path):
    expected = "no Ray cluster address: pass --address .* set RAY_ADDRESS, or start a local cluster"
    with pytest.raises(JobError, match=expected):
        jobs.resolve_target(None, state_dir=tmp_path)


def test_token_comes_from_env_then_token_path_then_local_file_then_ray_default(tmp_path, monkeypatch):
    _state(tmp_path)
    ray_default = Path.home() / ".ray" / "auth_token"
    ray_default.parent.mkdir()
    ray_default.write_text("default-token\n")
    path_token = tmp_path / "path_token"
    path_token.write_text("path-token")

    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert jobs.resolve_target(None, state_dir=tmp_path).token == "env-token"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert jobs.resolve_target(None, state_dir=tmp_path).token == "path-token"
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert jobs.resolve_target(None, state_dir=tmp_path).token == "local-token"
    # Another cluster's address: the local token file is not offered to it.
    other = jobs.resolve_target("http://elsewhere:8265", state_dir=tmp_path)
    assert (other.token, other.mlflow_tracking_uri) == ("default-token", None)
    ray_default.unlink()
    assert jobs.resolve_target("http://elsewhere:8265", state_dir=tmp_path).token is None


def test_entrypoint_runs_the_cli_module_with_shell_quoted_arguments():
    entry = jobs.build_entrypoint("tune", ["configs/tune onenet.yaml", "training.lr=1e-3"])
    assert entry == "python -m anchorless.jobs.cli tune 'configs/tune onenet.yaml' training.lr=1e-3"
    assert shlex.split(entry)[4] == "configs/tune onenet.yaml"
    with pytest.raises(JobError, match="unknown job kind 'deploy'; expected one of train, tune, evaluate"):
        jobs.build_entrypoint("deploy", [])


def test_runtime_env_ships_the_project_without_venv_workspace_git_or_caches(tmp_path, monkeypatch):
    # Only this environment: earlier tests' processes may have set MLflow's HTTP retry variables.
    for name in [n for n in os.environ if n.startswith(jobs.PASSTHROUGH_PREFIXES)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///local.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "detectors")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    monkeypatch.setenv("ANCHORLESS_BCCD", "/data/bccd")
    # Secrets stay out of the job's runtime env, which the dashboard shows: the cluster's nodes
    # carry their own tracking credentials, the signing key stays with `models promote`.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "anchorless-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret")
    monkeypatch.setenv("ANCHORLESS_REGISTRY_KEY", "secret")
    env = jobs.build_runtime_env(jobs.project_root())
    root = jobs.project_root()
    assert env["working_dir"] == str(root)
    assert (root / "pyproject.toml").exists() and (root / "anchorless" / "jobs" / "submit.py").exists()
    for pattern in (".venv/", "/workspace/", ".git/", "__pycache__/"):
        assert pattern in env["excludes"]
    assert env["env_vars"] == {
        "MLFLOW_TRACKING_URI": "sqlite:///local.db",
        "MLFLOW_EXPERIMENT_NAME": "detectors",
        "ANCHORLESS_BCCD": "/data/bccd",
    }


def test_excluded_paths_are_left_out_of_the_package_ray_uploads(tmp_path):
    from ray._private.runtime_env.packaging import create_package  # what submit_job uses to pack working_dir

    project = tmp_path / "project"
    for name in ("train.py", "configs/a.yaml", "pkg/m.py", "sub/workspace/kept.txt", "workspace/runs/ckpt.pt",
                 ".venv/bin/python", "pkg/__pycache__/m.pyc", "anchorless.egg-info/PKG-INFO", ".git/HEAD"):  # fmt: skip
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    package = tmp_path / "package.zip"
    create_package(str(project), package, True, excludes=list(jobs.DEFAULT_EXCLUDES))
    with zipfile.ZipFile(package) as archive:
        files = sorted(name for name in archive.namelist() if not name.endswith("/"))
    assert files == ["configs/a.yaml", "pkg/m.py", "sub/workspace/kept.txt", "train.py"]


def test_runtime_env_points_jobs_at_the_local_clusters_mlflow(tmp_path, monkeypatch):
    _state(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///local.db")
    target = jobs.resolve_target(None, state_dir=tmp_path)
    env = jobs.build_runtime_env(tmp_path, target=target)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:41002"
    env = jobs.build_runtime_env(tmp_path, target=target, env_vars={"MLFLOW_TRACKING_URI": "http://mine:5000"})
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mine:5000"


def test_an_unreachable_job_server_is_one_clear_error(tmp_path):
    expected = r"cannot reach the Ray job server at http://127.0.0.1:9 \(from --address\).*cluster status"
    with pytest.raises(JobError, match=expected):
        jobs.list_jobs(address="127.0.0.1:9", state_dir=tmp_path)


# --------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("jobs-cluster")
    state = cluster_up(state_dir, num_cpus=1, object_store_memory=80 * 1024**2)
    yield state
    cluster_down(state_dir)


@pytest.mark.slow
def test_a_trivial_job_succeeds_and_its_logs_hold_its_output(cluster):
    state_dir = cluster["state_dir"]
    command = f"python -c \"import os; print('{HELLO}'); print('tracking', os.environ['MLFLOW_TRACKING_URI'])\""
    job_id = jobs.submit("train", entrypoint=command, state_dir=state_dir, wait=True, timeout=120)

    status = jobs.job_status(job_id, state_dir=state_dir)
    assert (status["status"], status["kind"]) == ("SUCCEEDED", "train")
    logs = jobs.job_logs(job_id, state_dir=state_dir)
    assert HELLO in logs.splitlines()
    assert f"tracking {cluster['mlflow_tracking_uri']}" in logs.splitlines()
    followed = io.StringIO()
    assert HELLO in jobs.job_logs(job_id, follow=True, state_dir=state_dir, out=followed).splitlines()
    assert HELLO in followed.getvalue()
    assert job_id in [job["job_id"] for job in jobs.list_jobs(state_dir=state_dir)]


@pytest.mark.slow
def test_a_running_job_can_be_stopped(cluster):
    state_dir = cluster["state_dir"]
    job_id = jobs.submit("evaluate", entrypoint="sleep 300", state_dir=state_dir)
    assert jobs.stop_job(job_id, state_dir=state_dir) is True
    assert jobs.wait_for_job(job_id, state_dir=state_dir, timeout=60, poll_seconds=0.5) == "STOPPED"
    with pytest.raises(JobError, match="no job 'raysubmit_nope' on the Ray cluster"):
        jobs.job_status("raysubmit_nope", state_dir=state_dir)


@pytest.mark.slow
def test_a_wrong_token_is_refused_with_a_clear_error(cluster, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(AuthError) as error:
        jobs.submit("train", ["configs/x.yaml"], state_dir=cluster["state_dir"])
    message = str(error.value)
    assert message.startswith(f"the Ray cluster at {cluster['dashboard_url']} refused the token from $RAY_AUTH_TOKEN")
    assert "set RAY_AUTH_TOKEN" in message and cluster["token_file"] in message


@pytest.mark.slow
def test_a_missing_token_is_refused_with_a_clear_error(cluster, tmp_path, monkeypatch):
    # Another test in this process may have run ray.init(), which switches the
    # process to token mode and lets Ray attach a token of its own; turn that off.
    monkeypatch.setattr("ray.dashboard.modules.dashboard_sdk.get_auth_headers_if_auth_enabled", lambda headers: {})
    no_state = tmp_path / "elsewhere"
    with pytest.raises(AuthError) as error:
        jobs.list_jobs(address=cluster["dashboard_url"], state_dir=no_state)
    assert str(error.value) == (
        f"the Ray cluster at {cluster['dashboard_url']} requires a token and none was sent: "
        "set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it"
    )
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", cluster["token_file"])
    assert isinstance(jobs.list_jobs(address=cluster["dashboard_url"], state_dir=no_state), list)
