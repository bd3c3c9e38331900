"""`training.time_budget_minutes`: a run stops mid-schedule once its training time is spent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchorless.platform.config import build_config
from anchorless.platform.training.driver import train
from anchorless.platform.training.worker import STATE_FILE

pytestmark = pytest.mark.slow

BUDGET_MINUTES = 0.05  # 3 s of training: a handful of steps at 64 px


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_budgeted_run_stops_early_evaluates_and_checkpoints_what_it_has(tmp_path, synthetic_shards, tiny_config):
    raw = tiny_config(
        tmp_path / "workspace",
        synthetic_shards(num_images=40, seed=3),
        "budgeted",
        tracking={"experiment": "budget-tests"},
        epochs=500,
        time_budget_minutes=BUDGET_MINUTES,
        schedule={"kind": "constant", "warmup_steps": 0},
        checkpoint={"every_epochs": 1000},
    )
    cfg = build_config({**raw, "evaluation": {"every_epochs": 1000}})
    summary = train(cfg, progress=False)

    budget_s = BUDGET_MINUTES * 60
    with open(Path(summary["checkpoint"]) / STATE_FILE) as f:
        state = json.load(f)
    # It stops at the first step past the budget (the first step alone can pass it on a
    # loaded machine: it includes the data pipeline's start): far short of 500 epochs.
    assert state["train_seconds"] >= budget_s
    assert 1 <= summary["epoch"] <= 20 and summary["step"] >= 1
    assert state["epoch"] == summary["epoch"] and state["step"] == summary["step"]
    # The partial epoch was still scored and exported: the summary carries COCO metrics.
    assert 0.0 <= summary["AP50"] <= 1.0 and "duplicate_rate" in summary
    assert Path(summary["export"]).is_file()
