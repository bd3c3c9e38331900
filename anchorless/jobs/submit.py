"""Submit anchorless work to a Ray cluster through Ray's Job Submission API.

Every function takes ``address`` and ``state_dir`` and finds its cluster in this
order: the ``address`` argument (``--address``), ``$RAY_ADDRESS``, the local
cluster's state file (``anchorless cluster up``). An address is the job
server's URL (the dashboard, e.g. ``http://head:8265``); ``host:port`` means
``http://host:port``, and the local cluster's GCS address maps to its dashboard.

Token authentication: when the cluster runs with ``RAY_AUTH_MODE=token`` every
request carries ``Authorization: Bearer <token>``, the token taken from, in
order, ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, the local
cluster's token file (when the address is the local cluster's), and Ray's
default ``~/.ray/auth_token``. A missing or refused token is one ``AuthError``
that says what to set.

The runtime environment ships the project directory (code and ``configs/``) as
the job's ``working_dir``, without ``.venv``, ``workspace``, ``.git`` and
caches. No ``pip``/``py_modules``: the cluster is expected to run the same
environment (the local cluster runs this venv; cluster images install the
project), and the uploaded copy of ``anchorless`` shadows the installed one
because the job runs from the working directory.

Paths: on the local cluster (this machine) a job works in the directory it was
submitted from (``$ANCHORLESS_JOB_CWD``, which the job's ``anchorless`` command
changes to), so relative paths in configs and arguments (``workspace/...``) mean
what they mean in the shell. On other clusters paths must be visible there
(``s3://...``, a shared file system, or files inside the uploaded project).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from anchorless.cluster.local import default_state_dir, names_this_cluster, read_state
from anchorless.errors import AnchorlessError

JOB_KINDS = ("train", "tune", "evaluate")
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# gitignore syntax, relative to the working directory.
DEFAULT_EXCLUDES = (
    ".venv/",
    "/workspace/",
    ".git/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    ".hypothesis/",
    "/build/",
)
# Client-side variables a job needs to behave as it would locally; never RAY_AUTH_* nor a
# secret (runtime-env variables are visible in the dashboard; the cluster has its own token,
# and its nodes their own tracking credentials: the local cluster's head environment, a
# Secret in the templates). The registry's signing key stays where `models promote` runs.
PASSTHROUGH_PREFIXES = ("ANCHORLESS_", "MLFLOW_")
_HIDDEN_FROM_JOBS = (
    "ANCHORLESS_CLUSTER_ID",
    "ANCHORLESS_CLUSTER_DIR",
    "ANCHORLESS_REGISTRY_KEY",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
)
# Set for jobs on the local cluster: the directory `anchorless` changes to in the job.
JOB_CWD_ENV = "ANCHORLESS_JOB_CWD"


class JobError(AnchorlessError):
    """A job request that failed: unreachable cluster, unknown job, failed submission."""


class AuthError(JobError):
    """The cluster requires a token that was not sent, or refused the one sent."""


@dataclass
class ClusterTarget:
    """Where requests go and with which token; ``source`` says how each was found."""

    address: str
    address_source: str
    token: str | None = None
    token_source: str | None = None
    mlflow_tracking_uri: str | None = None
    local_token_file: str | None = None
    state: dict[str, Any] | None = field(default=None, repr=False)


def project_root() -> Path:
    """The directory holding ``pyproject.toml`` and ``configs/`` (the default working_dir)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise JobError(f"{root}: not a project checkout (no pyproject.toml); pass working_dir explicitly")
    return root


def _normalise_address(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def resolve_target(address: str | None = None, *, state_dir: str | Path | None = None) -> ClusterTarget:
    """The job server URL and token to use (see the module docstring for the order)."""
    state = read_state(state_dir if state_dir is not None else default_state_dir())
    if address:
        url, source = address, "--address"
    elif os.environ.get("RAY_ADDRESS"):
        url, source = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    elif state is not None:
        url, source = state["dashboard_url"], f"cluster state {state['state_dir']}"
    else:
        raise JobError(
            "no Ray cluster address: pass --address http://HEAD:8265, set RAY_ADDRESS, "
            "or start a local cluster with `anchorless cluster up --local`"
        )
    is_local = state is not None and names_this_cluster(state, url)
    url = state["dashboard_url"] if is_local else _normalise_address(url)

    target = ClusterTarget(address=url, address_source=source, state=state if is_local else None)
    if is_local:
        target.mlflow_tracking_uri = state["mlflow_tracking_uri"]
        target.local_token_file = state["token_file"]
    target.token, target.token_source = _find_token(target.local_token_file)
    return target


def _find_token(local_token_file: str | None) -> tuple[str | None, str | None]:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    candidates = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append((Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser(), "$RAY_AUTH_TOKEN_PATH"))
    if local_token_file:
        candidates.append((Path(local_token_file), "the local cluster's token file"))
    candidates.append((Path.home() / ".ray" / "auth_token", "~/.ray/auth_token"))
    for path, source in candidates:
        try:
            token = path.read_text().strip()
        except OSError:
            continue
        if token:
            return token, f"{source} ({path})"
    return None, None


def _auth_error(target: ClusterTarget, status: int | None, detail: str) -> AuthError:
    hint = "set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it"
    if target.local_token_file:
        hint += f" (this local cluster's token file is {target.local_token_file})"
    if target.token is None or status == 401:
        return AuthError(f"the Ray cluster at {target.address} requires a token and none was sent: {hint}")
    return AuthError(f"the Ray cluster at {target.address} refused the token from {target.token_source}: {hint}")


@contextlib.contextmanager
def _translated_errors(target: ClusterTarget, job_id: str | None = None) -> Iterator[None]:
    """Ray's exceptions for auth, connection and unknown jobs, as one-line JobErrors."""
    import aiohttp
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        status = 401 if "Authentication required" in str(exc) else 403
        raise _auth_error(target, status, str(exc)) from None
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status in (401, 403):
            raise _auth_error(target, exc.status, exc.message) from None
        raise JobError(f"{target.address}: log stream refused ({exc.status} {exc.message})") from None
    except OSError as exc:  # ConnectionError and requests' connection errors
        raise JobError(
            f"cannot reach the Ray job server at {target.address} (from {target.address_source}): {exc}; "
            "is the cluster up? (`anchorless cluster status`)"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise JobError(f"no job {job_id!r} on the Ray cluster at {target.address}") from None
        raise JobError(f"{target.address}: {text.strip()}") from None


@contextlib.contextmanager
def _without_ray_address_env() -> Iterator[None]:
    # JobSubmissionClient lets $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS override its
    # `address` argument; our resolution order puts --address first.
    saved = {name: os.environ.pop(name) for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None, *, state_dir: str | Path | None = None):
    """A ``JobSubmissionClient`` for the resolved cluster, and its ``ClusterTarget``."""
    from ray.job_submission import JobSubmissionClient

    target = resolve_target(address, state_dir=state_dir)
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else None
    with _translated_errors(target), _without_ray_address_env():
        client = JobSubmissionClient(target.address, headers=headers)
    return client, target


def build_entrypoint(kind: str, args: Sequence[str]) -> str:
    """``python -m anchorless.jobs.cli KIND ARGS...``, shell-quoted."""
    if kind not in JOB_KINDS:
        raise JobError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
    return shlex.join(["python", "-m", "anchorless.jobs.cli", kind, *args])


def build_runtime_env(
    working_dir: str | Path,
    *,
    target: ClusterTarget | None = None,
    env_vars: dict[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """The job's runtime environment: the project as working_dir, and its environment variables.

    ``MLFLOW_TRACKING_URI`` is, in order: ``env_vars``, the local cluster's
    tracking server, this shell's ``$MLFLOW_TRACKING_URI``. For the local cluster
    ``$ANCHORLESS_JOB_CWD`` is this process's working directory (see the module docstring).
    """
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise JobError(f"{working_dir}: working_dir is not a directory")
    variables = {
        name: value
        for name, value in os.environ.items()
        if name.startswith(PASSTHROUGH_PREFIXES) and name not in _HIDDEN_FROM_JOBS
    }
    if target is not None and target.mlflow_tracking_uri:
        variables["MLFLOW_TRACKING_URI"] = target.mlflow_tracking_uri
    if target is not None and target.state is not None:  # the local cluster: same machine, same files
        variables[JOB_CWD_ENV] = os.getcwd()
    variables.update(env_vars or {})
    return {"working_dir": str(working_dir), "excludes": list(excludes), "env_vars": variables}


def submit(
    kind: str,
    args: Sequence[str] = (),
    *,
    address: str | None = None,
    working_dir: str | Path | None = None,
    wait: bool = False,
    entrypoint: str | None = None,
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    state_dir: str | Path | None = None,
    timeout: float | None = None,
) -> str:
    """Submit ``anchorless <kind> <args>`` as a Ray job and return its id.

    Args:
        kind: ``train``, ``tune`` or ``evaluate``; runs ``python -m anchorless.jobs.cli kind args``.
        args: the command's arguments (config path, ``key.path=value`` overrides, flags).
        address, state_dir: which cluster (see ``resolve_target``).
        working_dir: uploaded as the job's working directory; default the project root.
        wait: block until the job ends (SUCCEEDED, FAILED or STOPPED).
        entrypoint: run this shell command instead of the anchorless one (ad-hoc jobs, tests).
        env_vars: extra environment variables for the job; they win over passed-through ones.
        submission_id: a job id of your choosing; default Ray's ``raysubmit_...``.
        timeout: with ``wait``, give up (the job keeps running) after this many seconds.
    """
    command = build_entrypoint(kind, args) if entrypoint is None else entrypoint
    if kind not in JOB_KINDS:
        raise JobError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
    client, target = connect(address, state_dir=state_dir)
    runtime_env = build_runtime_env(working_dir or project_root(), target=target, env_vars=env_vars)
    with _translated_errors(target):
        job_id = client.submit_job(
            entrypoint=command,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata={"anchorless_kind": kind},
        )
    if wait:
        wait_for_job(job_id, address=target.address, state_dir=state_dir, timeout=timeout, _client=(client, target))
    return job_id


def _job_record(details: Any) -> dict[str, Any]:
    def seconds(ms: int | None) -> float | None:
        return ms / 1000.0 if ms else None

    return {
        "job_id": details.submission_id or details.job_id,
        "status": str(details.status.value if hasattr(details.status, "value") else details.status),
        "entrypoint": details.entrypoint,
        "message": details.message or "",
        "start_time": seconds(details.start_time),
        "end_time": seconds(details.end_time),
        "kind": (details.metadata or {}).get("anchorless_kind"),
    }


def list_jobs(*, address: str | None = None, state_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Submitted jobs, oldest first: dicts with job_id, status, kind, entrypoint, message, start/end time (epoch s)."""
    client, target = connect(address, state_dir=state_dir)
    with _translated_errors(target):
        jobs = [_job_record(details) for details in client.list_jobs() if details.submission_id]
    return sorted(jobs, key=lambda job: job["start_time"] or 0.0)


def job_status(job_id: str, *, address: str | None = None, state_dir: str | Path | None = None) -> dict[str, Any]:
    """One job's record (as in ``list_jobs``); ``status`` is PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    client, target = connect(address, state_dir=state_dir)
    with _translated_errors(target, job_id):
        return _job_record(client.get_job_info(job_id))


def wait_for_job(
    job_id: str,
    *,
    address: str | None = None,
    state_dir: str | Path | None = None,
    timeout: float | None = None,
    poll_seconds: float = 1.0,
    _client: tuple[Any, ClusterTarget] | None = None,
) -> str:
    """Block until the job is SUCCEEDED, FAILED or STOPPED and return that status."""
    client, target = _client or connect(address, state_dir=state_dir)
    deadline = None if timeout is None else time.monotonic() + timeout
    with _translated_errors(target, job_id):
        while True:
            status = str(client.get_job_status(job_id).value)
            if status in TERMINAL_STATUSES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {job_id} still {status} after {timeout:.0f}s (it keeps running)")
            time.sleep(poll_seconds)


def job_logs(
    job_id: str,
    *,
    follow: bool = False,
    address: str | None = None,
    state_dir: str | Path | None = None,
    out: TextIO | None = None,
) -> str:
    """The job's driver log. With ``follow``, stream it to ``out`` (default stdout) until the job ends.

    Returns the whole text either way.
    """
    client, target = connect(address, state_dir=state_dir)
    if not follow:
        with _translated_errors(target, job_id):
            return client.get_job_logs(job_id)

    out = out if out is not None else sys.stdout

    async def stream() -> str:
        chunks = []
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            chunks.append(chunk)
        return "".join(chunks)

    with _translated_errors(target, job_id):
        client.get_job_info(job_id)  # an unknown id fails here with a clear message, not in the websocket
        return asyncio.run(stream())


def stop_job(job_id: str, *, address: str | None = None, state_dir: str | Path | None = None) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    client, target = connect(address, state_dir=state_dir)
    with _translated_errors(target, job_id):
        return bool(client.stop_job(job_id))


def format_jobs(jobs: Sequence[dict[str, Any]]) -> str:
    """A table for ``anchorless jobs list``."""
    if not jobs:
        return "no jobs"
    rows = [("JOB ID", "STATUS", "KIND", "STARTED", "ENTRYPOINT")]
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["start_time"])) if job["start_time"] else "-"
        entry = job["entrypoint"] if len(job["entrypoint"]) <= 60 else job["entrypoint"][:57] + "..."
        rows.append((job["job_id"], job["status"], job["kind"] or "-", started, entry))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    return "\n".join(lines)
