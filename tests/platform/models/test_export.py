"""The single-file export, loading models from files and MLflow URIs, the pyfunc model, registration."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from anchorless.detectors.layers import count_batchnorms
from anchorless.platform.models.export import ModelError, export_checkpoint
from anchorless.platform.models.loading import load_model
from anchorless.platform.models.pyfunc import images_frame
from anchorless.platform.data.images import read_image
from anchorless.platform.models.predict import detect
from anchorless.platform.data.shards import manifest_checksum
from anchorless.platform.tracking.store import TAG_MANIFEST_SHA256, mlflow_store
from tests.platform.models.conftest import MANIFEST

def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_export_is_a_weights_only_file_that_rebuilds_an_identical_model(trained, tmp_path):
    model, cfg, image_path, _ = trained

    class _Engine:  # a DeepSpeed engine or DDP holds the model as .module
        module = model

    path = export_checkpoint(_Engine(), cfg, MANIFEST, tmp_path / "exports" / "best.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["config"] == cfg.to_dict()
    assert payload["categories"] == MANIFEST["categories"]
    assert payload["manifest_sha256"] == manifest_checksum(MANIFEST)
    assert set(payload["state_dict"]) == set(model.state_dict())

    image = read_image(image_path)
    expected = detect(model, [image], image_size=64)
    for source in (path, path.parent, str(path)):
        loaded, meta = load_model(source, fold_batchnorm=False)
        assert meta["image_size"] == 64
        assert [c["name"] for c in meta["categories"]] == ["rectangle", "ellipse", "triangle"]
        _same(detect(loaded, [image], image_size=64), expected)
    assert len(expected[0]["boxes"]) > 0

    # For inference (the default) BatchNorm is folded into the convolutions: same detections
    # up to float rounding, and no BatchNorm left to run.
    folded, _ = load_model(path)
    assert count_batchnorms(folded) == 0 < count_batchnorms(model)
    got = detect(folded, [image], image_size=64)[0]
    assert len(got["boxes"]) == len(expected[0]["boxes"])
    torch.testing.assert_close(got["scores"], expected[0]["scores"], rtol=0, atol=1e-3)
    torch.testing.assert_close(got["boxes"], expected[0]["boxes"], rtol=0, atol=0.05)


def test_export_refuses_a_detector_whose_class_count_disagrees_with_the_manifest(trained, tmp_path):
    model, cfg, _, _ = trained
    two_classes = {**MANIFEST, "categories": MANIFEST["categories"][:2]}
    with pytest.raises(ModelError, match="detector.num_classes is 3 but the data manifest has 2 categories"):
        export_checkpoint(model, cfg, two_classes, tmp_path / "model.pt")


def test_load_model_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(ModelError, match="nowhere.pt: no such model file"):
        load_model(tmp_path / "nowhere.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ModelError, match="foreign.pt: not an anchorless-model export"):
        load_model(foreign)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no .pt model export in this directory"):
        load_model(tmp_path / "empty")


@pytest.mark.slow
def test_logged_model_loads_back_as_pyfunc_registers_a_version_with_metric_tags_and_resolves_by_alias(
    trained, registered, monkeypatch
):
    model, _, image_path, root = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker, first, unregistered = registered.tracker, registered.uri, registered.run_uri
    assert first == "models:/shapes/1"
    assert unregistered == f"runs:/{tracker.run_id}/model"

    client = MlflowClient(tracker.tracking_uri)
    version = client.get_model_version("shapes", "1")
    assert version.run_id == tracker.run_id
    assert version.tags["AP"] == "0.600000" and version.tags["AP50"] == "0.750000"
    assert version.tags["duplicate_rate"] == "0.010000" and version.tags["per_class_AP.rectangle"] == "0.400000"
    assert version.tags[TAG_MANIFEST_SHA256] == manifest_checksum(MANIFEST)
    # Both logged models sit in the run's experiment, their files under the workspace.
    logged = client.search_logged_models([tracker.experiment_id])
    assert len(logged) == 2 and {m.source_run_id for m in logged} == {tracker.run_id}
    assert all(m.artifact_location.startswith((root / "workspace" / "mlartifacts").as_uri()) for m in logged)

    # The pyfunc flavour: encoded images in, detections in original pixels out.
    image = read_image(image_path)
    expected = detect(model, [image], image_size=64, score_threshold=0.0)[0]
    with mlflow_store(tracker.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(first)
    rows = pyfunc.predict(images_frame([image_path]), params={"score_threshold": 0.0})
    pair = pyfunc.predict(images_frame([image_path, image_path]), params={"score_threshold": 0.0})
    default_threshold = pyfunc.predict(images_frame([image_path]))
    assert list(rows.columns) == ["image_index", "category_id", "category_name", "score", "x", "y", "width", "height"]
    assert len(rows) == len(expected["boxes"]) > 0 and set(rows["image_index"]) == {0}
    # The served model has its BatchNorm folded: equal up to float rounding.
    np.testing.assert_allclose(rows["score"].to_numpy(), expected["scores"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(rows["x"].to_numpy(), expected["boxes"][:, 0].numpy(), rtol=1e-5, atol=1e-4)
    widths = (expected["boxes"][:, 2] - expected["boxes"][:, 0]).numpy()
    np.testing.assert_allclose(rows["width"].to_numpy(), widths, rtol=1e-5, atol=1e-4)
    assert pair["image_index"].value_counts().to_dict() == {0: len(rows), 1: len(rows)}
    assert len(default_threshold) == int((expected["scores"] >= 0.3).sum())  # the signature's default, 0.3
    assert (rows["x"] + rows["width"] <= 80 + 1e-3).all() and (rows["y"] + rows["height"] <= 48 + 1e-3).all()
    assert set(rows["category_id"]) <= {1, 2, 3}

    # load_model resolves registry URIs (version, alias) and run URIs to the same weights.
    client.set_registered_model_alias("shapes", "champion", "1")
    reference = detect(model, [image], image_size=64)
    for uri in ("models:/shapes/1", "models:/shapes@champion", unregistered):
        loaded, meta = load_model(uri, tracking_uri=tracker.tracking_uri, fold_batchnorm=False)
        assert meta["source"] == uri
        _same(detect(loaded, [image], image_size=64), reference)
    with pytest.raises(ModelError, match="models:/shapes/9: cannot be resolved"):
        load_model("models:/shapes/9", tracking_uri=tracker.tracking_uri)
    # MLflow's process-wide URIs and the environment are as they were.
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert not Path("mlflow.db").exists()
