"""A Ray head with token authentication and an MLflow server on this machine.

``cluster_up`` starts two process groups, each a subprocess of this Python's
own environment (the venv's ``ray`` and ``mlflow`` executables):

* ``ray start --head --block`` with ``RAY_AUTH_MODE=token`` and the token in a
  file under the state directory (``RAY_AUTH_TOKEN_PATH``), every port chosen free
  (other Ray clusters may run on this machine), and its own ``--temp-dir`` so that a
  plain ``ray.init()`` elsewhere on the machine never discovers and joins it. It runs
  in Ray's single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's default on
  macOS and Windows) with node address 127.0.0.1: the GCS, the raylet, the dashboard and
  job server, the agents and every worker listen on loopback only, and no other node
  can join;
* ``mlflow server --app-name basic-auth`` on 127.0.0.1 with a SQLite store and an
  artifact directory under the state directory. Anonymous requests are refused. Two
  accounts, their credentials generated into private files (0600) like the token: the
  user account (``mlflow_user.json``: read and edit on every experiment and model; the Ray
  head's environment carries it, so every job and trial logs with it, and the command
  line reads it for this server) and the admin account (``mlflow_admin.json``), the only
  one that may move a model's aliases (see ``anchorless.cluster.registry_auth``), used by
  ``models promote`` and ``models rollback``. Beside them the key the registry signs
  cached scores and the champion history with (``registry_signing_key``);
* with ``object_store=True`` (``cluster up --local --object-store``), an S3-compatible
  server (moto's ``moto_server``, from ``pip install 'anchorless[objectstore]'``) on
  127.0.0.1 with a bucket ``anchorless``: MLflow keeps its artifacts in
  ``s3://anchorless/mlflow`` and jobs can read shards from and write checkpoints to
  ``s3://anchorless/...``, so nothing depends on a shared disk. It holds its objects in
  memory: they go with ``cluster down``. Every process of the cluster (the Ray head and so
  every job and worker, MLflow) gets the standard ``AWS_ENDPOINT_URL`` and credentials
  variables, which boto3, MLflow and pyarrow's S3 filesystem all read; a shell gets them
  from the ``export`` lines ``cluster up`` prints.

Their addresses, pids, the token file and the credential files land in ``cluster.json`` (written
atomically) which ``cluster_status``, ``cluster_down`` and the job submission
client read. ``ray stop`` is not used to stop the head: it stops every Ray
process of the machine, other people's included. Instead every process of the
cluster carries a cluster id in its environment, and ``cluster_down`` stops the
process groups it started and then anything still carrying that id.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import psutil

from anchorless.errors import AnchorlessError
from anchorless.files import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
TOKEN_FILE = "ray_auth_token"
MLFLOW_USER_FILE = "mlflow_user.json"
MLFLOW_ADMIN_FILE = "mlflow_admin.json"
MLFLOW_AUTH_CONFIG_FILE = "mlflow_auth.ini"
SIGNING_KEY_FILE = "registry_signing_key"
MLFLOW_USER = "anchorless"
MLFLOW_ADMIN = "anchorless-admin"
# Checked in the tracking server: basic auth, alias moves reserved to admins.
MLFLOW_AUTHORIZATION_FUNCTION = "anchorless.cluster.registry_auth:authenticate_reserving_aliases"
CLUSTER_ID_ENV = "ANCHORLESS_CLUSTER_ID"
STATE_DIR_ENV = "ANCHORLESS_CLUSTER_DIR"
STATE_VERSION = 1

# `ray start` ports that default to fixed numbers (6379, 8265, 10001, 52365) or
# that we pin so that two heads on one machine never race for the same one.
_RAY_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


# Ray's switch for single-machine clusters (the platform's local Ray sets the same one, see
# anchorless.platform.ray_session): off, node address 127.0.0.1 and every server bound to it.
_SINGLE_MACHINE_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK = "127.0.0.1"

SERVICES = ("ray", "mlflow", "s3")  # the processes a cluster may start, in the order they are reported
OBJECT_STORE_BUCKET = "anchorless"
# The local S3 server checks no signature: these only have to be present, as every S3 client wants some.
_LOCAL_S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "anchorless-local",
    "AWS_SECRET_ACCESS_KEY": "anchorless-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Services this process started, kept referenced (and reaped once stopped) so that
# their Popen objects are not collected while the services run on.
_CHILDREN: dict[int, subprocess.Popen] = {}


class ClusterError(AnchorlessError):
    """The local cluster cannot be started, read or stopped; the message says why."""


# --------------------------------------------------------------------------- state


def default_state_dir() -> Path:
    """``$ANCHORLESS_CLUSTER_DIR``, else ``workspace/cluster`` under the current directory."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path("workspace") / "cluster").resolve()


def names_this_cluster(state: dict[str, Any], address: str) -> bool:
    """Whether ``address`` is this local cluster's Ray address or its dashboard URL (a
    trailing slash or a missing ``http://`` tolerated)."""
    given = address.strip().rstrip("/")
    dashboard = state["dashboard_url"].rstrip("/")
    return given in (state["ray_address"], dashboard) or f"http://{given}" == dashboard


def state_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE_FILE


def write_state(state_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write the state file atomically (private, 0600: it names the cluster's token file)."""
    return write_json_atomic(state_path(state_dir), state, sort_keys=True)


def read_state(state_dir: str | Path) -> dict[str, Any] | None:
    """The state written by ``cluster_up``, or None when there is none."""
    path = state_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClusterError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); remove it and run `cluster up` again"
        ) from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ClusterError(
            f"{path}: not a cluster state file of version {STATE_VERSION}; remove it and run `cluster up` again"
        )
    return state


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise up/down on one state directory (two terminals, or a test and a CLI)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- helpers


def _executable(name: str) -> str:
    """The executable from this interpreter's environment, so the cluster runs the same venv."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"cannot find the `{name}` executable next to {sys.executable} or on PATH")
    return found


def _reserve_ports(requested: dict[str, int | None]) -> dict[str, int]:
    """Free ports for every name; requested ones are checked, the rest picked by the OS.

    All sockets stay bound until every port is chosen, so the picks are distinct.
    """
    sockets: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        for name, port in requested.items():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            try:
                sock.bind(("127.0.0.1", port or 0))
            except OSError:
                raise ClusterError(f"{name}: port {port} is already in use; choose another or leave it unset") from None
            ports[name] = sock.getsockname()[1]
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _ensure_token(state_dir: Path) -> Path:
    """The cluster's token file (mode 0600), created once and reused across restarts."""
    path = state_dir / TOKEN_FILE
    if path.exists() and path.read_text().strip():
        return path
    # Same format as Ray's own generator, which only writes to ~/.ray/auth_token.
    token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    return write_atomic(path, token, mode=0o600)


def _ensure_signing_key(state_dir: Path) -> Path:
    """The registry's signing key (mode 0600), created once and reused: scores signed before a
    restart stay trusted after it."""
    path = state_dir / SIGNING_KEY_FILE
    if path.exists() and path.read_text().strip():
        return path
    return write_atomic(path, secrets.token_hex(32), mode=0o600)


def _ensure_credentials(path: Path, username: str) -> tuple[Path, bool]:
    """An account's credential file (mode 0600), created once; (path, created now)."""
    if path.exists():
        read_credentials(path)  # a damaged file is an error here, not a refused login later
        return path, False
    document = {"username": username, "password": secrets.token_urlsafe(32)}
    return write_atomic(path, json.dumps(document, indent=2) + "\n", mode=0o600), True


def read_credentials(path: str | Path) -> tuple[str, str]:
    """(username, password) from a credential file written by ``cluster up``."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
        username, password = document["username"], document["password"]
    except FileNotFoundError:
        raise ClusterError(f"{path}: no such credential file; run `anchorless cluster up --local`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterError(
            f"{path}: not a credential file ({type(exc).__name__}); remove it and run `cluster up` again"
        ) from None
    if not (isinstance(username, str) and isinstance(password, str) and username and password):
        raise ClusterError(f"{path}: username and password must be non-empty strings")
    return username, password


def _write_mlflow_auth_config(state_dir: Path, mlflow_dir: Path, admin_file: Path) -> Path:
    """The basic-auth app's config (0600: it holds the admin password MLflow creates the admin with)."""
    admin, password = read_credentials(admin_file)
    text = (
        "[mlflow]\n"
        # Every account but the admin: read and edit experiments, runs and models. Moving an
        # alias is refused to them all the same (MLFLOW_AUTHORIZATION_FUNCTION).
        "default_permission = EDIT\n"
        f"database_uri = sqlite:///{mlflow_dir / 'basic_auth.db'}\n"
        f"admin_username = {admin}\n"
        f"admin_password = {password}\n"
        f"authorization_function = {MLFLOW_AUTHORIZATION_FUNCTION}\n"
        # A checked password is remembered for a while: otherwise every metric a run logs pays
        # for a deliberately slow password hash. One server worker, passwords never change.
        "auth_cache_ttl_seconds = 300\n"
    )
    return write_atomic(state_dir / MLFLOW_AUTH_CONFIG_FILE, text, mode=0o600)


def _mlflow_request(uri: str, method: str, path: str, body: dict[str, Any], credentials: tuple[str, str]) -> tuple[int, str]:
    """(status, body) of one JSON request to the tracking server with basic auth."""
    request = urllib.request.Request(
        f"{uri}{path}", data=json.dumps(body).encode(), method=method, headers={"Content-Type": "application/json"}
    )
    token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000).decode(errors="replace")


def _ensure_mlflow_user(uri: str, admin_file: Path, user_file: Path) -> None:
    """The user account on the tracking server, with the password of its credential file."""
    admin = read_credentials(admin_file)
    username, password = read_credentials(user_file)
    body = {"username": username, "password": password}
    status, text = _mlflow_request(uri, "POST", "/api/2.0/mlflow/users/create", body, admin)
    if status == 200:
        return
    if "RESOURCE_ALREADY_EXISTS" in text:  # kept from an earlier start: same password as the file
        status, text = _mlflow_request(uri, "PATCH", "/api/2.0/mlflow/users/update-password", body, admin)
        if status == 200:
            return
    raise ClusterError(f"the tracking server at {uri} did not create the user account {username!r}: HTTP {status} {text[:200]}")


def _ray_temp_dir(state_dir: Path) -> Path:
    # Ray puts Unix sockets under its temp dir and socket paths are limited to
    # 107 bytes, so this lives in the system temp dir under a short unique name.
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"anchorless-ray-{digest}"


# A dead service refuses at once; a live one on a busy machine can take seconds to answer.
def _http_get(url: str, *, token: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 with the reason when nothing answered."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000).decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, str(reason)


def _tcp_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- processes


def _carries_cluster_id(proc: psutil.Process, cluster_id: str) -> bool:
    try:
        return proc.environ().get(CLUSTER_ID_ENV) == cluster_id
    except (psutil.Error, OSError):
        return False


def _cluster_processes(cluster_id: str) -> list[psutil.Process]:
    """Every live process that inherited this cluster's id (Ray workers and job drivers included)."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid != me and _carries_cluster_id(proc, cluster_id):
            found.append(proc)
    return found


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def _owned_group(pgid: int | None, cluster_id: str) -> list[psutil.Process]:
    """Members of a process group we started, or [] when the group is gone (or was reused)."""
    if not pgid:
        return []
    members = _group_members(pgid)
    if any(_carries_cluster_id(proc, cluster_id) for proc in members):
        return members
    return []


def _terminate(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    for proc in procs:
        child = _CHILDREN.pop(proc.pid, None)
        if child is not None:
            child.poll()


def _stop_processes(state: dict[str, Any]) -> list[str]:
    """Stop the services of ``state`` (Ray head, MLflow, the object store); returns what was stopped."""
    cluster_id = state["cluster_id"]
    pids = {name: pid for name, pid in state["pids"].items() if pid}
    groups = {name: _owned_group(pid, cluster_id) for name, pid in pids.items()}
    # All at once: the `ray start --block` leader stops its node on SIGTERM (draining is off,
    # see cluster_up), MLflow's and moto's servers shut down on SIGTERM.
    ray_group = groups.get("ray", [])
    first = [proc for proc in ray_group if proc.pid == pids.get("ray")] or ray_group
    _terminate(first + [proc for name, group in groups.items() if name != "ray" for proc in group], grace=40.0)
    leftovers = {proc.pid: proc for pid in pids.values() for proc in _owned_group(pid, cluster_id)}
    leftovers.update((proc.pid, proc) for proc in _cluster_processes(cluster_id))
    if leftovers:
        logger.info("stopping %d leftover process(es) of cluster %s", len(leftovers), cluster_id)
        _terminate(list(leftovers.values()), grace=5.0)
    for pid in pids.values():
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.poll()
    temp_dir = state.get("ray", {}).get("temp_dir")
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return [name for name in SERVICES if groups.get(name)]


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopped by id, survives our exit
        )
    _CHILDREN[child.pid] = child
    return child


# --------------------------------------------------------------------------- public API


def cluster_status(state_dir: str | Path | None = None) -> dict[str, Any]:
    """Each service's health, checked by a real request.

    Returns ``{"state_file", "running", "services": {"ray", "jobs", "mlflow"}}``
    where each service is ``{"up": bool, "address"|"url": str, "detail": str}``:
    ``ray`` = GCS port open and the dashboard's GCS health check passes,
    ``jobs`` = the job server lists jobs with the cluster's token,
    ``mlflow`` = the tracking server's ``/health`` answers, and with an object store
    ``s3`` = its bucket lists. ``running`` is true when all are up. With no state file
    every service is down.
    """
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
    state = read_state(state_dir)
    result: dict[str, Any] = {"state_file": str(state_path(state_dir)), "running": False, "services": {}}
    if state is None:
        for name in ("ray", "jobs", "mlflow"):
            result["services"][name] = {"up": False, "detail": "no cluster state (not started)"}
        return result

    token = None
    with contextlib.suppress(OSError):
        token = Path(state["token_file"]).read_text().strip()
    dashboard = state["dashboard_url"]
    services = result["services"]

    gcs_host, _, gcs_port = state["ray_address"].rpartition(":")
    gcs_open = _tcp_open(gcs_host, int(gcs_port))
    code, body = _http_get(f"{dashboard}/api/gcs_healthz")
    ray_up = gcs_open and code == 200
    detail = "ok" if ray_up else ("GCS port closed; " if not gcs_open else "") + f"gcs_healthz: {code or body}"
    services["ray"] = {"up": ray_up, "address": state["ray_address"], "detail": detail}

    code, body = _http_get(f"{dashboard}/api/jobs/", token=token)
    services["jobs"] = {
        "up": code == 200,
        "url": dashboard,
        "detail": "ok" if code == 200 else f"{code or ''} {body.strip()[:200]}".strip(),
    }

    mlflow_uri = state["mlflow_tracking_uri"]
    code, body = _http_get(f"{mlflow_uri}/health")
    services["mlflow"] = {
        "up": code == 200,
        "url": mlflow_uri,
        "detail": "ok" if code == 200 else f"{code or ''} {body.strip()[:200]}".strip(),
    }
    store = state.get("object_store")
    if store:
        # The bucket listing: the server answers and the bucket is there.
        code, body = _http_get(f"{store['endpoint']}/{store['bucket']}?max-keys=1")
        services["s3"] = {
            "up": code == 200,
            "url": store["endpoint"],
            "detail": "ok" if code == 200 else f"{code or ''} {body.strip()[:200]}".strip(),
        }
    result["running"] = all(service["up"] for service in services.values())
    result["pids"] = state["pids"]
    result["token_file"] = state["token_file"]
    return result


def cluster_up(
    state_dir: str | Path | None = None,
    *,
    ray_port: int | None = None,
    dashboard_port: int | None = None,
    mlflow_port: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    object_store: bool = False,
    s3_port: int | None = None,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """Start a local Ray head (token auth on) and an MLflow server, and an S3 server if asked; idempotent.

    Args:
        state_dir: where the state file, token file, logs, MLflow store and
            artifacts live; default ``default_state_dir()``.
        ray_port: GCS port; free port when None (never assumes 6379 is free).
        dashboard_port: dashboard and job-server port; free port when None.
        mlflow_port: tracking-server port; free port when None.
        num_cpus: logical CPUs of the head; None = this machine's cores + 1, so
            that Ray Data's decode tasks (1 CPU each) fit beside training workers
            that take every core (as the embedded default does, see ``connect_ray``).
        num_gpus, object_store_memory: passed to ``ray start``; None lets Ray
            detect them (``object_store_memory`` is Ray's shared memory, not S3).
        object_store: also start a local S3 server with the bucket ``anchorless``,
            MLflow's artifacts in ``s3://anchorless/mlflow`` (see the module docstring).
        s3_port: the S3 server's port; free port when None.
        timeout: seconds to wait for all services to answer.

    Returns:
        The state (``ray_address``, ``dashboard_url``, ``mlflow_tracking_uri``,
        ``token_file``, ``pids``, ``ports``, ``logs``, ``env``: the variables a
        shell should export to use this cluster) plus ``already_running``: True
        when a healthy cluster was found and nothing changed. A state whose
        services are not all up is stopped and replaced by a fresh cluster.
    """
    state_dir = (Path(state_dir) if state_dir is not None else default_state_dir()).resolve()
    with _locked(state_dir):
        previous = read_state(state_dir)
        if previous is not None:
            status = cluster_status(state_dir)
            if status["running"] and not _is_protected(previous):
                logger.warning("the cluster in %s runs without registry authentication; restarting it", state_dir)
                status["running"] = False
                status["services"]["mlflow"] = {"up": False, "detail": "no authentication"}
            if status["running"]:
                if object_store and not previous.get("object_store"):
                    raise ClusterError(
                        f"the cluster in {state_dir} runs without an object store; "
                        "`anchorless cluster down` first, then `cluster up --local --object-store`"
                    )
                return {**previous, "already_running": True}
            down = [name for name, service in status["services"].items() if not service["up"]]
            logger.warning(
                "cluster state in %s is stale (%s down); cleaning up and starting fresh", state_dir, ", ".join(down)
            )
            _stop_processes(previous)
            state_path(state_dir).unlink(missing_ok=True)
        state = _start(
            state_dir, ray_port, dashboard_port, mlflow_port, num_cpus, num_gpus, object_store_memory,
            s3_port if object_store else False, timeout,
        )  # fmt: skip
        return {**state, "already_running": False}


def _is_protected(state: dict[str, Any]) -> bool:
    """Whether a cluster was started with the protections this version gives one."""
    return state.get("mlflow", {}).get("auth") == "basic-auth" and state.get("node_ip_address") == LOOPBACK


def _start(
    state_dir: Path,
    ray_port: int | None,
    dashboard_port: int | None,
    mlflow_port: int | None,
    num_cpus: int | None,
    num_gpus: int | None,
    object_store_memory: int | None,
    s3_port: int | None | bool,  # False: no object store
    timeout: float,
) -> dict[str, Any]:
    requested: dict[str, int | None] = {flag: None for flag in _RAY_PORT_FLAGS}
    requested["port"] = ray_port
    requested["dashboard-port"] = dashboard_port
    requested["mlflow"] = mlflow_port
    if s3_port is not False:
        requested["s3"] = s3_port
    ports = _reserve_ports(requested)

    cluster_id = uuid.uuid4().hex
    token_file = _ensure_token(state_dir)
    signing_key_file = _ensure_signing_key(state_dir)
    temp_dir = _ray_temp_dir(state_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    mlflow_dir = state_dir / "mlflow"
    (mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    admin_file, new_admin = _ensure_credentials(state_dir / MLFLOW_ADMIN_FILE, MLFLOW_ADMIN)
    user_file, _ = _ensure_credentials(state_dir / MLFLOW_USER_FILE, MLFLOW_USER)
    if new_admin:
        # MLflow creates its admin once, with the password of the first start: a new admin
        # password needs a new account store (it holds only these two accounts).
        (mlflow_dir / "basic_auth.db").unlink(missing_ok=True)
    auth_config = _write_mlflow_auth_config(state_dir, mlflow_dir, admin_file)
    mlflow_user, mlflow_password = read_credentials(user_file)
    logs = {"ray": str(state_dir / "ray.log"), "mlflow": str(state_dir / "mlflow.log")}
    dashboard_url = f"http://127.0.0.1:{ports['dashboard-port']}"
    mlflow_uri = f"http://127.0.0.1:{ports['mlflow']}"
    store = None
    if "s3" in ports:
        store = {"endpoint": f"http://127.0.0.1:{ports['s3']}", "bucket": OBJECT_STORE_BUCKET}
        logs["s3"] = str(state_dir / "s3.log")
    s3_env = {"AWS_ENDPOINT_URL": store["endpoint"], **_LOCAL_S3_CREDENTIALS} if store else {}

    env = dict(os.environ)
    for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_TOKEN"):
        env.pop(name, None)  # the token file is the one source of the token
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            **_SINGLE_MACHINE_RAY,
            CLUSTER_ID_ENV: cluster_id,
            # `python` in job entrypoints resolves to this venv's interpreter.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            # Jobs and Ray Train workers log to this cluster's tracking server by default,
            # as its user account (MLflow reads these; there is no file variable for them).
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "MLFLOW_TRACKING_USERNAME": mlflow_user,
            "MLFLOW_TRACKING_PASSWORD": mlflow_password,
            # ... and reach its object store as they would reach any S3.
            **s3_env,
        }
    )

    ray_cmd = [
        _executable("ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
        "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
        # 0/0: workers bind random free ports instead of the fixed 10002-19999 range.
        "--min-worker-port=0", "--max-worker-port=0",
    ]  # fmt: skip
    ray_cmd += [f"--{flag}={ports[flag]}" for flag in _RAY_PORT_FLAGS]
    if num_cpus is None:
        num_cpus = (os.cpu_count() or 1) + 1
    ray_cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        ray_cmd.append(f"--num-gpus={num_gpus}")
    if object_store_memory is not None:
        ray_cmd.append(f"--object-store-memory={object_store_memory}")

    artifacts = f"s3://{store['bucket']}/mlflow" if store else str(mlflow_dir / "artifacts")
    mlflow_cmd = [
        _executable("mlflow"), "server", "--app-name", "basic-auth",
        "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination", artifacts,
        "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1",
    ]  # fmt: skip

    # MLflow's server-side job runner (GenAI jobs) is unused here; off, it saves a process and startup time.
    mlflow_env = {
        **env,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
        # Signs the web UI's CSRF tokens; one per start (a restart only ends browser sessions).
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        mlflow_env.pop(name, None)  # they would win over the config file's admin
    s3_cmd = [_object_store_executable(), "-H", "127.0.0.1", "-p", str(ports["s3"])] if store else None
    # `cluster down` stops the head with SIGTERM, on which Ray drains the node (up to 30 s) until
    # it is idle; after any job that trained it never was (measured: 33.6 s to stop, 3.6 s with
    # draining off). Nothing here needs draining (no Serve proxies): the processes still get
    # SIGTERM and a grace period.
    ray_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    procs = {"ray": _spawn(ray_cmd, ray_env, Path(logs["ray"])), "mlflow": _spawn(mlflow_cmd, mlflow_env, Path(logs["mlflow"]))}
    if s3_cmd:
        procs["s3"] = _spawn(s3_cmd, env, Path(logs["s3"]))
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "cluster_id": cluster_id,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "state_dir": str(state_dir),
        "auth_mode": "token",
        "token_file": str(token_file),
        "registry_signing_key_file": str(signing_key_file),
        "node_ip_address": LOOPBACK,
        "ray_address": f"127.0.0.1:{ports['port']}",
        "dashboard_url": dashboard_url,
        "mlflow_tracking_uri": mlflow_uri,
        "pids": {name: proc.pid for name, proc in procs.items()},
        "ports": ports,
        "logs": logs,
        "ray": {"temp_dir": str(temp_dir)},
        "mlflow": {
            "backend_store_uri": f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "artifacts": artifacts,
            "auth": "basic-auth",
            "auth_config": str(auth_config),
            "credentials": {"user": str(user_file), "admin": str(admin_file)},
        },
        "object_store": store,
        # What a shell exports to use this cluster: `ray.init()` joins the GCS address
        # with the token, and `anchorless submit` maps that address to the job server.
        "env": {
            "RAY_ADDRESS": f"127.0.0.1:{ports['port']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "MLFLOW_TRACKING_URI": mlflow_uri,
            **s3_env,
        },
    }
    # Written before waiting, so that `cluster down` can clean up a start that hangs.
    write_state(state_dir, state)

    try:
        if store:
            _create_bucket(state, procs["s3"], timeout)
        _wait_until_up(state_dir, state, procs, timeout)
        _ensure_mlflow_user(mlflow_uri, admin_file, user_file)
    except BaseException:
        _stop_processes(state)
        state_path(state_dir).unlink(missing_ok=True)
        raise
    # Ray records the GCS address it actually advertises (the node's IP) in its temp dir.
    advertised = temp_dir / "ray_current_cluster"
    if advertised.exists() and advertised.read_text().strip():
        state["ray_address"] = state["env"]["RAY_ADDRESS"] = advertised.read_text().strip()
        write_state(state_dir, state)
    return state


def _object_store_executable() -> str:
    try:
        return _executable("moto_server")
    except ClusterError:
        raise ClusterError(
            "--object-store needs moto's S3 server (`moto_server`): pip install 'anchorless[objectstore]'"
        ) from None


def _create_bucket(state: dict[str, Any], proc: subprocess.Popen, timeout: float) -> None:
    """The cluster's bucket, once the S3 server answers (a plain PUT: the local server checks no signature)."""
    store = state["object_store"]
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ClusterError(
                f"s3 exited with code {proc.returncode} while starting; last lines of {state['logs']['s3']}:\n"
                + _tail(state["logs"]["s3"])
            )
        request = urllib.request.Request(f"{store['endpoint']}/{store['bucket']}", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise ClusterError(f"the S3 server at {store['endpoint']} did not answer in {timeout:.0f}s ({exc})") from None
        time.sleep(0.3)


def _wait_until_up(state_dir: Path, state: dict[str, Any], procs: dict[str, subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise ClusterError(
                    f"{name} exited with code {proc.returncode} while starting; last lines of {state['logs'][name]}:\n"
                    + _tail(state["logs"][name])
                )
        status = cluster_status(state_dir)
        if status["running"]:
            return
        if time.monotonic() > deadline:
            down = {name: service["detail"] for name, service in status["services"].items() if not service["up"]}
            raise ClusterError(f"services not up after {timeout:.0f}s: {down}; see the logs in {state_dir}")
        time.sleep(0.5)


def cluster_down(state_dir: str | Path | None = None) -> dict[str, Any]:
    """Stop the Ray head, the MLflow server and the object store, and remove the state file; idempotent.

    Returns ``{"was_running": bool, "stopped": [service names]}``; with no state
    file nothing is touched and ``was_running`` is False. The token file, the
    MLflow store and the logs stay in ``state_dir`` for the next ``cluster_up``
    (the object store's contents do not: it keeps them in memory).
    """
    state_dir = (Path(state_dir) if state_dir is not None else default_state_dir()).resolve()
    with _locked(state_dir):
        state = read_state(state_dir)
        if state is None:
            return {"was_running": False, "stopped": []}
        stopped = _stop_processes(state)
        state_path(state_dir).unlink(missing_ok=True)
        return {"was_running": bool(stopped), "stopped": stopped}


def format_cluster(state: dict[str, Any]) -> str:
    """What ``cluster up`` prints: the addresses, the token file, and the lines to export."""
    headline = "cluster already running (nothing changed)" if state.get("already_running") else "cluster started"
    lines = [
        f"{headline}: {state['state_dir']}",
        f"ray     {state['ray_address']}",
        f"jobs    {state['dashboard_url']}   (dashboard and job server, token auth)",
        f"mlflow  {state['mlflow_tracking_uri']}   (artifacts {state.get('mlflow', {}).get('artifacts')})",
    ]
    store = state.get("object_store")
    if store:
        lines.append(f"s3      {store['endpoint']}   (bucket s3://{store['bucket']}; objects live in memory until `cluster down`)")
    lines.append(f"token   {state['token_file']}")
    credentials = state.get("mlflow", {}).get("credentials")
    if credentials:
        lines += [
            f"mlflow  user {credentials['user']}   (jobs and the CLI use it; scripts: MLFLOW_TRACKING_USERNAME/PASSWORD)",
            f"mlflow  admin {credentials['admin']}   (`models promote`/`rollback` only: the one account that moves aliases)",
        ]
    lines.append("to use it from another shell:")
    lines += [f"  export {name}={value}" for name, value in state["env"].items()]
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    """A few lines for a terminal: one per service, then the state file."""
    lines = []
    for name, service in status["services"].items():
        where = service.get("address") or service.get("url") or ""
        state = "up" if service["up"] else "DOWN"
        detail = "" if service["up"] else service["detail"]
        lines.append(f"{name:<7} {state:<5} {where:<28} {detail}".rstrip())
    lines.append(f"state   {status['state_file']}")
    return "\n".join(lines)

