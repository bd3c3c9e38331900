"""`anchorless models serve`: a registered model answering HTTP like `anchorless predict`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anchorless.platform.models.predict import predict_images
from anchorless.platform.models.serving import ServeError, post, registry_uri, request_body, start_server


def test_references_become_registry_uris_and_a_malformed_one_is_named():
    assert registry_uri("shapes@champion") == "models:/shapes@champion"
    assert registry_uri("shapes/3") == "models:/shapes/3"
    assert registry_uri("runs:/abc/model") == "runs:/abc/model"
    with pytest.raises(ServeError, match="'shapes': expected NAME@ALIAS"):
        registry_uri("shapes")


@pytest.mark.slow
def test_served_model_answers_like_predict_and_refuses_bad_requests_with_400(registered, tmp_path):
    rng = np.random.default_rng(1)
    photos = []
    for name, (height, width) in {"wide.jpg": (48, 80), "tall.jpg": (90, 40)}.items():  # two sizes
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)).save(path, quality=95)
        photos.append(path)
    uri = registry_uri("shapes@champion")
    from mlflow import MlflowClient

    MlflowClient(registered.tracker.tracking_uri).set_registered_model_alias("shapes", "champion", "1")
    expected = json.loads(
        predict_images(uri, photos, tmp_path / "predicted", score_threshold=0.0, tracking_uri=registered.tracker.tracking_uri,
                       progress=False).read_text()
    )  # fmt: skip

    with start_server("shapes@champion", tracking_uri=registered.tracker.tracking_uri, log_path=tmp_path / "serve.log") as server:
        status, answer = post(server.url, request_body(photos, score_threshold=0.0))
        assert status == 200, answer
        rows = answer["predictions"]
        for index, image in enumerate(expected["images"]):
            served = sorted((r for r in rows if r["image_index"] == index), key=lambda r: -r["score"])
            truth = [a for a in expected["annotations"] if a["image_id"] == image["id"]]
            assert len(served) == len(truth) > 0
            for got, want in zip(served, truth):
                assert got["category_id"] == want["category_id"]
                assert got["score"] == pytest.approx(want["score"], abs=1e-4)  # predict rounds to 5 places
                assert [got["x"], got["y"], got["width"], got["height"]] == pytest.approx(want["bbox"], abs=0.01)

        bad_requests = {
            "not an image": request_body([b"plain text, not pixels"]),
            "no body": b"",
            "wrong column": json.dumps({"dataframe_split": {"columns": ["picture"], "data": [["aGk="]]}}).encode(),
        }
        for what, body in bad_requests.items():
            status, answer = post(server.url, body)
            assert 400 <= status < 500, (what, status, answer)
            assert answer.get("message"), what
        status, _ = post(server.url, request_body(photos[:1]))
        assert status == 200  # still serving after the bad requests
