"""A real campaign: Ray Tune over DeepSpeed training runs, nested MLflow runs, best model registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def campaign_file(tmp_path_factory) -> Path:
    from anchorless.platform.shards import write_shards
    from anchorless.platform.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("tune")
    files = generate_synthetic_coco(root / "synth", num_images=40, size=64, seed=1, progress=False)
    for split, annotations in files.items():
        write_shards(annotations, root / "synth" / "images", root / "shards" / split, progress=False)
    base = {
        "name": "tune-base",
        "workspace": str(root / "workspace"),
        "data": {
            "train": str(root / "shards" / "train"),
            "val": str(root / "shards" / "val"),
            "image_size": 64,
            "batch_size": 8,
            "augment": {"enabled": False},
        },
        "detector": {"name": "onenet", "num_classes": 3, "neck": {"channels": [32, 32, 32]}},
        "training": {"epochs": 3, "num_workers": 1, "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 2}},
        "tracking": {"experiment": "tune-tests", "registered_model": "tune-shapes"},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    campaign = {
        "name": "assigner-search",
        "base": "base.yaml",
        "search_space": {
            "detector.assigner.cost_giou": {"grid": [1.0, 3.0]},
            "training.optimizer.lr": {"choice": [2.0e-3]},
        },
        "search": {"algorithm": "grid"},
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "num_samples": 1,
        "metric": "AP50",
        "mode": "max",
    }
    path = root / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign))
    return path


def test_campaign_runs_trials_as_nested_runs_and_registers_the_best(campaign_file):
    from mlflow import MlflowClient

    from anchorless.platform.tune import tune_campaign

    summary = tune_campaign(campaign_file)
    assert summary["trials"] == 2
    client = MlflowClient(summary["tracking_uri"], registry_uri=summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    assert sorted(float(c.data.params["detector.assigner.cost_giou"]) for c in children) == [1.0, 3.0]
    assert all(c.info.status == "FINISHED" for c in children)
    best_value = max(c.data.metrics["AP50"] for c in children)
    assert summary["best_AP50"] == pytest.approx(best_value, abs=1e-6)
    best_child = next(c for c in children if c.info.run_id == summary["best_run_id"])
    assert best_child.data.metrics["AP50"] == pytest.approx(best_value, abs=1e-6)
    # The campaign summary is on the parent run.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "best_config.yaml", "metric_vs_params.png"} <= artifacts
    assert parent.data.metrics["best_AP50"] == pytest.approx(summary["best_AP50"], abs=1e-6)
    # Only the best trial's model is registered, tagged with its metrics.
    assert summary["model_uri"] == "models:/tune-shapes/1"
    versions = client.search_model_versions("name='tune-shapes'")
    assert len(versions) == 1 and versions[0].run_id == best_child.info.run_id
    assert float(versions[0].tags["AP50"]) == pytest.approx(summary["best_AP50"], abs=1e-5)

    # Re-running a finished campaign restores it: no new trials, the same best.
    again = tune_campaign(campaign_file)
    assert again["best_run_id"] == summary["best_run_id"] and again["trials"] == 2
    runs_after = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(runs_after) == 2
