"""`anchorless models serve`: a registered model answering HTTP like `anchorless predict`,
from its pyfunc (torch) or from its ONNX graph in onnxruntime (no torch in the server)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from anchorless.platform.models.onnx_pyfunc import TORCH_REPORT
from anchorless.platform.models.onnx_runtime import BOX_RTOL, SCORE_ATOL, unmatched_detections
from anchorless.platform.models.predict import predict_images
from anchorless.platform.models.serving import ServeError, post, registry_uri, request_body, start_server
from tests.platform.data.test_decode_bound import jpeg_claiming

PREDICT_ROUNDING = 0.01  # predict writes boxes to 2 decimals (scores to 5)


def test_references_become_registry_uris_and_a_malformed_one_is_named():
    assert registry_uri("shapes@champion") == "models:/shapes@champion"
    assert registry_uri("shapes/3") == "models:/shapes/3"
    assert registry_uri("runs:/abc/model") == "runs:/abc/model"
    with pytest.raises(ServeError, match="'shapes': expected NAME@ALIAS"):
        registry_uri("shapes")


def test_the_onnx_model_server_code_imports_no_torch():
    code = (
        "import sys\n"
        "import mlflow.pyfunc.scoring_server\n"
        "import anchorless.platform.models.onnx_pyfunc\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') or m.startswith('anchorless.detectors'))\n"
        "assert not heavy, heavy\n"
    )  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def _as_arrays(records: list[dict], xywh_of) -> dict[str, np.ndarray]:
    """Detections of one image (served rows or predict's annotations) as xyxy arrays, best first."""
    records = sorted(records, key=lambda r: -r["score"])
    xywh = np.array([xywh_of(r) for r in records], dtype=np.float64).reshape(-1, 4)
    return {
        "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
        "scores": np.array([r["score"] for r in records]),
        "labels": np.array([r["category_id"] for r in records]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("format", ["torch", "onnx"])
def test_served_model_answers_like_predict_and_refuses_bad_requests_with_400(format, registered, exported, tmp_path):
    from mlflow import MlflowClient

    store = registered.tracker.tracking_uri
    MlflowClient(store).set_registered_model_alias("shapes", "champion", "1")
    photos = exported.photos  # two JPEGs of different sizes
    expected = json.loads(
        predict_images(registry_uri("shapes@champion"), photos, tmp_path / "predicted", score_threshold=0.0,
                       tracking_uri=store, progress=False).read_text()
    )  # fmt: skip

    log_path = tmp_path / "serve.log"
    with start_server("shapes@champion", tracking_uri=store, format=format, log_path=log_path) as server:
        status, answer = post(server.url, request_body(photos, score_threshold=0.0))
        assert status == 200, answer
        rows = answer["predictions"]
        for index, image in enumerate(expected["images"]):
            served = sorted((r for r in rows if r["image_index"] == index), key=lambda r: -r["score"])
            truth = [a for a in expected["annotations"] if a["image_id"] == image["id"]]
            assert len(truth) > 0
            if format == "torch":  # the same code as predict: the same detections
                assert len(served) == len(truth)
                for got, want in zip(served, truth):
                    assert got["category_id"] == want["category_id"]
                    assert got["score"] == pytest.approx(want["score"], abs=1e-4)  # predict rounds to 5 places
                    assert [got["x"], got["y"], got["width"], got["height"]] == pytest.approx(want["bbox"], abs=0.01)
            else:  # another runtime: the same detections within the export's tolerances, as sets
                got = _as_arrays(served, lambda r: (r["x"], r["y"], r["width"], r["height"]))
                want = _as_arrays(truth, lambda a: a["bbox"])
                tail = int((want["scores"] <= want["scores"][-1] + SCORE_ATOL).sum())  # may be cut by either runtime
                assert abs(len(served) - len(truth)) <= tail
                # Boxes within 1e-3 of the image's long side (the letterbox side in original pixels), plus predict's rounding.
                side = max(image["width"], image["height"]) + PREDICT_ROUNDING / BOX_RTOL
                assert unmatched_detections(got, want, image_side=side) == 0
                assert unmatched_detections(want, got, image_side=side) == 0

        bad_requests = {
            "not an image": request_body([b"plain text, not pixels"]),
            "no body": b"",
            "wrong column": json.dumps({"dataframe_split": {"columns": ["picture"], "data": [["aGk="]]}}).encode(),
            "too many pixels": request_body([photos[0], jpeg_claiming(20_000, 12_000)]),  # 720 MB if decoded
        }
        for what, body in bad_requests.items():
            status, answer = post(server.url, body)
            assert 400 <= status < 500, (what, status, answer)
            assert answer.get("message"), what
        assert "input row 1: image is 20000x12000 = 240,000,000 pixels, above the limit" in answer["message"]
        status, _ = post(server.url, request_body(photos[:1]))
        assert status == 200  # still serving after the bad requests

    if format == "onnx":  # the server's process states whether torch was imported: it must not have been
        reports = [line for line in log_path.read_text().splitlines() if TORCH_REPORT in line]
        assert len(reports) == 2 and all(line.endswith("torch imported: no") for line in reports), reports


@pytest.mark.slow
def test_serving_onnx_without_a_graph_says_how_to_add_one(registered, tmp_path):
    from anchorless.platform.models.serving import served_model

    store = registered.tracker.tracking_uri
    with pytest.raises(ServeError, match=r"has no ONNX graph to serve .*anchorless export --model runs:/.* --format onnx"):
        served_model(registered.run_uri, format="onnx", tracking_uri=store, workdir=tmp_path)  # logged, never exported
    with pytest.raises(ServeError, match="serve format 'tensorrt': expected one of torch, onnx"):
        served_model("shapes/1", format="tensorrt", tracking_uri=store, workdir=tmp_path)


@pytest.mark.slow
def test_sigterm_to_models_serve_stops_the_whole_server_and_removes_its_copy(registered, tmp_path):
    """A supervisor's SIGTERM ends `anchorless models serve` as Ctrl-C does: MLflow's server and
    its uvicorn child go too (they outlived it before), and the downloaded model copy is removed."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    import psutil

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "anchorless.jobs.cli", "models", "serve", "shapes/1", "--port", str(port),
               "--tracking-uri", registered.tracker.tracking_uri]  # fmt: skip
    cli = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline and cli.poll() is None, "the server never answered"
                time.sleep(0.5)
        server = [child.pid for child in psutil.Process(cli.pid).children(recursive=True)]
        assert server  # mlflow models serve, and uvicorn under it
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
        time.sleep(1)
        assert not [pid for pid in server if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not list(tmp_path.glob("anchorless-serve-*"))
    finally:
        if cli.poll() is None:
            cli.kill()
