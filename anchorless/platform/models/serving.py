"""A registered model served over HTTP, with MLflow's own scoring server.

``anchorless models serve shapes-onenet@champion`` runs ``mlflow models serve`` on the
model's pyfunc flavour (see :mod:`.pyfunc`), in this environment (``--env-manager
local``), on 127.0.0.1 unless told otherwise. The logged model is downloaded first and its
``MLmodel`` checked (:func:`~.pyfunc.check_logged_model`): the server loads the checked copy,
whose code is the installed package's, and a model that would run code from the artifact
store (or one logged by an older anchorless as "models from code") is refused with a
message. With ``--format onnx`` it serves the
version's ONNX graph (added by ``anchorless export``) in onnxruntime instead, through a
pyfunc model written for it in a temporary directory (:mod:`.onnx_pyfunc`), and the
server's process never imports torch. The request is MLflow's JSON:
``{"dataframe_split": {"columns": ["image"], "data": [["<base64 image bytes>"], ...]}}``
(:func:`request_body` builds it); the answer, ``{"predictions": [...]}``, has one record
per detection in the original image's pixels, as ``anchorless predict`` finds them.
A request MLflow or the model cannot use (not an image, no ``image`` column, no body)
is answered with HTTP 400 and a message, and the server goes on serving.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from anchorless.errors import AnchorlessError
from anchorless.platform.models.loading import MLFLOW_SCHEMES

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing a model is a decision, not a default
READY_TIMEOUT_S = 180.0
SERVE_FORMATS = ("torch", "onnx")


class ServeError(AnchorlessError):
    """The model server did not start or stopped (its own last words are in the message)."""


def registry_uri(reference: str) -> str:
    """``NAME@ALIAS`` or ``NAME/VERSION`` as a ``models:/`` URI; MLflow URIs and paths as given."""
    if reference.startswith(MLFLOW_SCHEMES) or Path(reference).exists():
        return reference
    name, at, alias = reference.partition("@")
    if at and name and alias:
        return f"models:/{name}@{alias}"
    name, slash, version = reference.rpartition("/")
    if slash and name and version.isdigit():
        return f"models:/{name}/{version}"
    raise ServeError(
        f"{reference!r}: expected NAME@ALIAS (shapes-onenet@champion), NAME/VERSION (shapes-onenet/3), "
        "an MLflow model URI (models:/..., runs:/...) or the path of a logged model"
    )


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def served_model(reference: str, *, format: str, tracking_uri: str, workdir: str | os.PathLike[str]) -> str:
    """What ``mlflow models serve`` is given, a local directory: (``torch``) the reference's
    logged model, downloaded into ``workdir`` and checked to load only the installed package's
    code, or (``onnx``) a pyfunc model written in ``workdir`` over the reference's ONNX graph."""
    model_uri = registry_uri(reference)
    if format == "torch":
        from mlflow.exceptions import MlflowException

        from anchorless.platform.models.pyfunc import check_logged_model

        try:
            local = Path(model_uri) if Path(model_uri).exists() else _download(model_uri, tracking_uri=tracking_uri, dst=workdir)
        except (MlflowException, OSError) as exc:
            raise ServeError(f"{model_uri}: cannot be fetched ({str(exc).splitlines()[0][:200]})") from None
        check_logged_model(local)  # the server loads this very copy: nothing can change it in between
        return str(local)
    if format != "onnx":
        raise ServeError(f"serve format {format!r}: expected one of {', '.join(SERVE_FORMATS)}")
    from anchorless.platform.models.onnx_pyfunc import save_onnx_pyfunc

    graph = fetch_onnx_graph(model_uri, tracking_uri=tracking_uri, dst=workdir)
    return str(save_onnx_pyfunc(graph, Path(workdir) / "onnx-pyfunc"))


def _download(artifact_uri: str, *, tracking_uri: str, dst: str | os.PathLike[str]) -> Path:
    """An MLflow artifact (a logged model, or a file in one) downloaded into ``dst``."""
    import mlflow.artifacts

    from anchorless.platform.tracking.store import mlflow_store

    with mlflow_store(tracking_uri):  # models:/ URIs resolve through MLflow's process-wide registry URI
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        )


def fetch_onnx_graph(model_uri: str, *, tracking_uri: str, dst: str | os.PathLike[str]) -> Path:
    """The ``model.onnx`` of a model: a file or directory as given, else downloaded from the
    logged model an MLflow URI names (``anchorless export`` puts it there) into ``dst``."""
    from anchorless.platform.models.onnx_runtime import ONNX_FILE

    local = Path(model_uri)
    if local.exists():
        graph = local / ONNX_FILE if local.is_dir() else local
        if not graph.is_file():
            raise ServeError(f"{model_uri}: no {ONNX_FILE} here; write one with `anchorless export --format onnx`")
        return graph
    from mlflow.exceptions import MlflowException

    try:
        return _download(f"{model_uri.rstrip('/')}/{ONNX_FILE}", tracking_uri=tracking_uri, dst=dst)
    except (MlflowException, OSError) as exc:
        raise ServeError(
            f"{model_uri} has no ONNX graph to serve ({str(exc).splitlines()[0][:200]}); add one with "
            f"`anchorless export --model {model_uri} --format onnx --out DIR`"
        ) from None


def _server_env(tracking_uri: str) -> dict[str, str]:
    """MLflow's store for ``models:/`` URIs; this interpreter's scripts first on PATH, since
    MLflow starts its web server (uvicorn) by name and the environment may not be activated."""
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def serve_command(model_uri: str, *, host: str = DEFAULT_HOST, port: int = 5000, workers: int = 1) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", "local",  # this environment has anchorless; a fresh one would not
        "-h", host, "-p", str(port), "-w", str(workers),
    ]  # fmt: skip


def end_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, to the server's whole process group (started in a session of its
    own): ``mlflow models serve`` runs uvicorn as a child, which outlives a signal to it alone."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a supervisor, `kill`) ends the server as Ctrl-C does


@dataclass
class Server:
    """A running model server; ``stop()`` ends it (also on leaving a ``with`` block)."""

    process: subprocess.Popen
    url: str
    log_path: Path
    workdir: Path | None = None  # what the server serves from (the ONNX pyfunc), removed on stop

    def stop(self, timeout: float = 15.0) -> None:
        end_process_group(self.process, timeout)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(
    reference: str,
    *,
    tracking_uri: str,
    format: str = "torch",
    host: str = DEFAULT_HOST,
    port: int | None = None,
    workers: int = 1,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = READY_TIMEOUT_S,
) -> Server:
    """Start serving ``reference`` (see :func:`registry_uri`) and wait until it answers ``/ping``.

    ``models:/`` URIs resolve against ``tracking_uri``. ``format``: ``torch`` (the pyfunc
    model) or ``onnx`` (the version's ONNX graph in onnxruntime, see :func:`served_model`).
    The server's output goes to ``log_path`` (default: a new file in the temp directory).
    """
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="anchorless-serve-"))
    try:
        model_uri = served_model(reference, format=format, tracking_uri=tracking_uri, workdir=workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    port = port or free_port(host)
    env = _server_env(tracking_uri)
    if log_path is None:
        handle, log_path = tempfile.mkstemp(prefix="anchorless-serve-", suffix=".log")
        os.close(handle)  # reopened below; the descriptor mkstemp returns would leak
    log_path = Path(log_path)
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            serve_command(model_uri, host=host, port=port, workers=workers),
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    server = Server(process, f"http://{host}:{port}", log_path, workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise ServeError(f"{reference}: the model server exited ({process.returncode}): {_last_words(log_path)}")
        try:
            with urllib.request.urlopen(f"{server.url}/ping", timeout=2) as response:
                if response.status == 200:
                    log.info("serving %s (%s) at %s/invocations", reference, format, server.url)
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise ServeError(f"{reference}: the model server did not answer within {timeout:.0f} s: {_last_words(log_path)}")


def _last_words(log_path: Path, lines: int = 5) -> str:
    try:
        text = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no output)"
    return " | ".join(text[-lines:]) or "(no output)"


def request_body(images: Sequence[bytes | str | os.PathLike[str]], *, score_threshold: float | None = None) -> bytes:
    """The JSON request for encoded images (bytes) or image files (paths)."""
    encoded = []
    for image in images:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        encoded.append([base64.b64encode(data).decode("ascii")])
    body: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": encoded}}
    if score_threshold is not None:
        body["params"] = {"score_threshold": float(score_threshold)}
    return json.dumps(body).encode()


def post(url: str, body: bytes, *, timeout: float = 60.0) -> tuple[int, Any]:
    """POST ``body`` to ``url``/invocations; (HTTP status, decoded JSON answer)."""
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, {"message": text}


def serve(
    reference: str,
    *,
    tracking_uri: str,
    format: str = "torch",
    host: str = DEFAULT_HOST,
    port: int = 5000,
    workers: int = 1,
) -> int:
    """Serve in the foreground until interrupted; the server's output goes to the console."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="anchorless-serve-") as workdir:
        model_uri = served_model(reference, format=format, tracking_uri=tracking_uri, workdir=workdir)
        env = _server_env(tracking_uri)
        served = registry_uri(reference) + (" (its ONNX graph, in onnxruntime)" if format == "onnx" else "")
        print(f"serving {served} at http://{host}:{port}/invocations (Ctrl-C stops)", flush=True)
        # Its own session, so stopping it reaches uvicorn too; SIGTERM here stops it like Ctrl-C,
        # instead of leaving the server running without us.
        process = subprocess.Popen(serve_command(model_uri, host=host, port=port, workers=workers), env=env, start_new_session=True)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            end_process_group(process)
            signal.signal(signal.SIGTERM, previous)
