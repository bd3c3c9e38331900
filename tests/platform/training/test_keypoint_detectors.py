"""The corner-keypoint detectors through the platform: two epochs with two Ray Train workers
on the synthetic shapes (CornerNet-Saccade on the pipeline's object crops), a registered model,
and ``anchorless evaluate`` scoring it (Saccade through its two steps)."""

from __future__ import annotations

import json

import pytest

from anchorless.jobs.cli import main
from anchorless.platform.config import build_config
from anchorless.platform.training.driver import train

pytestmark = pytest.mark.slow

# The ResNet-18 variant with narrow upsampler and branches, pairing the top 20 corners: the
# detectors' own heads, losses and decoding (Soft-NMS included) at the platform tests' cost.
TINY_KEYPOINT = {
    "backbone": {"depth": 18, "upsample_channels": [32, 32, 32]},
    "head": {"channels": 32, "pool_channels": 32},
    "postprocess": {"corner_topk": 20},
}
TINY = {
    "cornernet": TINY_KEYPOINT,
    "centernet_triplets": TINY_KEYPOINT,
    # CornerNet-Lite: the papers' structures a few channels wide; Saccade's views and crops
    # scaled to the 64-px shapes (views of 64 and 48 px, 64-px crops, at most two an image).
    "cornernet_squeeze": {
        "backbone": {"channels": [16, 16, 24, 24, 32], "out_channels": 16, "stem_channels": 16},
        "head": {"channels": 16, "pool_channels": 16},
    },
    "cornernet_saccade": {
        "backbone": {"channels": [16, 16, 24, 32], "out_channels": 16, "stem_channels": 16},
        "head": {"channels": 16, "pool_channels": 16, "attention_channels": 16},
        "postprocess": {"init_sizes": [64, 48], "crop_size": 64, "k_max": 2},
    },
}


@pytest.mark.parametrize("name", list(TINY))
def test_trains_two_epochs_on_two_workers_registers_and_is_scored_by_evaluate(
    name, ray_local, synthetic_shards, tiny_config, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shards = synthetic_shards(num_images=20)  # 64 px shapes: 16 train images (2 steps an epoch), 4 val
    raw = tiny_config(tmp_path / "workspace", shards, f"{name}-shapes", tracking={"registered_model": f"shapes-{name}"})
    raw["detector"] = {"name": name, "num_classes": 3, **TINY[name]}
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
