"""A tiny trained-looking detector, exported, registered and exported for deployment once for the models tests."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anchorless.platform.config import build_config

MANIFEST = {
    "format": "anchorless-shards",
    "source": {"annotations": "instances_train.json", "sha256": "cd" * 32},
    "categories": [
        {"label": 0, "coco_id": 1, "name": "rectangle"},
        {"label": 1, "coco_id": 2, "name": "ellipse"},
        {"label": 2, "coco_id": 3, "name": "triangle"},
    ],
}
TINY_DETECTOR = {"name": "onenet", "num_classes": 3, "backbone": {"depth": 18}, "neck": {"channels": [32, 32, 32]}}


def model_config(workspace: Path, **tracking):
    return build_config(
        {
            "name": "export-test",
            "workspace": str(workspace),
            "data": {"image_size": 64},
            "detector": TINY_DETECTOR,
            "tracking": {"experiment": "export-tests", **tracking},
        }
    )


@pytest.fixture(scope="package")
def trained(tmp_path_factory):
    """A tiny detector with non-default weights, its config, and an image file."""
    from anchorless.detectors import build_detector

    root = tmp_path_factory.mktemp("export")
    cfg = model_config(root / "workspace")
    torch.manual_seed(0)
    model = build_detector(cfg.detector)
    with torch.no_grad():  # move the weights off their initial values, biases included
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
    model.eval()
    rng = np.random.default_rng(0)
    image_path = root / "photo.png"
    Image.fromarray(rng.integers(0, 255, size=(48, 80, 3), dtype=np.uint8)).save(image_path)
    return model, cfg, image_path, root


@dataclass
class Registered:
    tracker: object  # the Tracker of the run the model was logged to
    uri: str  # models:/shapes/1
    run_uri: str  # runs:/RUN/model, the same export logged without registering
    export: Path


@pytest.fixture(scope="package")
def registered(trained) -> Registered:
    """The trained detector exported, logged and registered as ``shapes`` v1 (its own SQLite store)."""
    import os

    from anchorless.platform.models.export import export_checkpoint
    from anchorless.platform.models.pyfunc import log_and_register
    from anchorless.platform.tracking.tracker import Tracker

    model, _, _, root = trained
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cfg = model_config(root / "workspace", registered_model="shapes")
        tracker = Tracker.start(cfg)
        export = export_checkpoint(model, cfg, MANIFEST, root / "model.pt")
        metrics = {"AP": 0.6, "AP50": 0.75, "duplicate_rate": 0.01, "per_class_AP": {"rectangle": 0.4}, "images": 40}
        uri = log_and_register(tracker, export, cfg, metrics)
        run_uri = log_and_register(tracker.run_id, export, model_config(root / "workspace"), metrics)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return Registered(tracker, uri, run_uri, export)


@dataclass
class Exported:
    out: Path  # the export folder: model.onnx, model.xml, model.bin
    summary: dict  # export's JSON line
    photos: list  # two JPEG files of different sizes, for the served models


@pytest.fixture(scope="package")
def exported(registered, trained, tmp_path_factory) -> Exported:
    """``anchorless export --format openvino`` of ``models:/shapes/1`` (so also its ONNX graph),
    run once through the command line; the version gets both beside its pyfunc."""
    from anchorless.jobs.cli import main

    _, _, image_path, root = trained
    out = tmp_path_factory.mktemp("exported")
    rng = np.random.default_rng(1)
    photos = []
    for name, (height, width) in {"wide.jpg": (48, 80), "tall.jpg": (90, 40)}.items():
        photos.append(out / name)
        Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)).save(photos[-1], quality=95)
    args = ["export", "--model", registered.uri, "--format", "openvino", "--out", str(out / "deploy"),
            "--check-images", str(image_path), *map(str, photos), "--tracking-uri", registered.tracker.tracking_uri]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return Exported(out / "deploy", json.loads(printed.getvalue().strip().splitlines()[-1]), photos)
