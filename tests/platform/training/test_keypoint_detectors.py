"""CornerNet-Lite through the platform: two epochs with two Ray Train workers on the synthetic
shapes (CornerNet-Saccade on the pipeline's object crops), a registered model, and ``anchorless
evaluate`` scoring it (Saccade through its two steps)."""

from __future__ import annotations

import json

import pytest

from anchorless.jobs.cli import main
from anchorless.platform.config import build_config
from anchorless.platform.training.driver import train
from tests.conftest import tiny_keypoint_detector

pytestmark = pytest.mark.slow

# CornerNet and the triplets go through the platform in the slow tests that train anyway:
# CornerNet on two nodes losing one (tests/cluster/test_multinode.py), the triplets from S3
# shards to promotion (tests/platform/test_s3.py). The Lite pair runs here.
LITE = ["cornernet_squeeze", "cornernet_saccade"]


@pytest.mark.parametrize("name", LITE)
def test_trains_two_epochs_on_two_workers_registers_and_is_scored_by_evaluate(
    name, ray_local, synthetic_shards, tiny_config, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shards = synthetic_shards(num_images=20)  # 64 px shapes: 16 train images (2 steps an epoch), 4 val
    raw = tiny_config(tmp_path / "workspace", shards, f"{name}-shapes", tracking={"registered_model": f"shapes-{name}"})
    raw["detector"] = tiny_keypoint_detector(name)
    if name == "cornernet_saccade":  # the paper's training: crops around objects, from the pipeline
        raw["data"]["augment"] = {"object_crop": {"enabled": True}}
    raw["evaluation"] = {"every_epochs": 2}  # validated once, at the end: the only checkpoint
    raw["training"]["checkpoint"] = {"every_epochs": 2}  # (a checkpoint is always scored)
    summary = train(build_config(raw), progress=False)
    assert summary["epoch"] == 2 and summary["model_uri"] == f"models:/shapes-{name}/1"
    assert isinstance(summary["AP"], float)  # the run's own validation, through the same inference

    monkeypatch.setenv("MLFLOW_TRACKING_URI", summary["tracking_uri"])
    capsys.readouterr()
    # In this process: the predictor and decoding of the Ray path (tests/platform/evaluation
    # compares the two), without starting actors beside this module's Ray.
    evaluate = ["evaluate", "--model", summary["model_uri"], "--data", str(shards["val"]), "--executor", "process"]
    assert main([*evaluate, "--out", str(tmp_path / "eval")]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["images"] == 4 and 0.0 <= scored["AP50"] <= 1.0
    assert (tmp_path / "eval").is_dir()
