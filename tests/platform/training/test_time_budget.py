"""`training.time_budget_minutes`: a run stops once its training time is spent, its LR schedule
run over the budget; the training tricks (EMA, multi-scale, mixup, label smoothing) ride along."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchorless.platform.config import build_config
from anchorless.platform.models.export import read_export
from anchorless.platform.training.driver import train
from anchorless.platform.training.engine import CHECKPOINT_SUBDIR, CHECKPOINT_TAG, EMA_WEIGHTS_KEY, load_checkpoint_file
from anchorless.platform.training.worker import STATE_FILE

pytestmark = pytest.mark.slow

BUDGET_MINUTES = 0.05  # 3 s of training: a handful of steps at 64 px


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_budgeted_run_stops_early_at_its_final_lr_and_exports_the_ema(tmp_path, synthetic_shards, tiny_config):
    raw = tiny_config(
        tmp_path / "workspace",
        synthetic_shards(num_images=40, seed=3),
        "budgeted",
        tracking={"experiment": "budget-tests"},
        epochs=500,
        time_budget_minutes=BUDGET_MINUTES,
        schedule={"kind": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.1},
        checkpoint={"every_epochs": 1000},
        ema={"enabled": True, "decay": 0.9, "tau": 2.0},
        label_smoothing=0.1,
    )
    # Each step's batch resized to a size drawn from (seed, step), every image mixed with another.
    raw["data"].update(multiscale={"enabled": True, "sizes": [32, 64]}, mixup={"enabled": True, "prob": 1.0})
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
    # The cosine ran over the budget's seconds, not over 500 epochs: it ended at its floor.
    assert state["metrics"]["lr"] == pytest.approx(2e-3 * 0.1)
    # The EMA was checkpointed, and it is the model exported.
    saved = load_checkpoint_file(Path(summary["checkpoint"]) / CHECKPOINT_SUBDIR / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    exported = read_export(summary["export"])["state_dict"]
    for name, tensor in saved[EMA_WEIGHTS_KEY].items():
        assert exported[name].equal(tensor.float()), name
