"""PBT campaigns: Tune sees a checkpoint per epoch, and an exploit continues from the donor's weights.

The fast tests cover the pieces (the pointer a trial reports as its Tune checkpoint,
loading a donor checkpoint under new hyperparameters, PBT's mutations staying inside
the searched ranges); the slow one runs a real two-trial PBT campaign.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.platform.conftest import tiny_model


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# --- the pointer checkpoint ------------------------------------------------------------------------


def test_a_pointer_round_trips_through_a_tune_checkpoint(tmp_path):
    from ray import tune

    from anchorless.platform.tuning.runner import POINTER_FILE, read_pointer, write_pointer

    write_pointer(tmp_path / "out", checkpoint="/runs/a/checkpoint_epoch0002_step0000008", run_name="c-a", trial_id="a", epoch=2, step=8)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [POINTER_FILE]  # no temporary file left behind
    checkpoint = tune.Checkpoint.from_directory(tmp_path / "out")
    with checkpoint.as_directory() as directory:
        assert read_pointer(directory) == {
            "checkpoint": "/runs/a/checkpoint_epoch0002_step0000008",
            "run_name": "c-a",
            "trial_id": "a",
            "epoch": 2,
            "step": 8,
        }


def test_a_directory_without_a_pointer_is_named_in_the_error(tmp_path):
    from anchorless.platform.tuning.runner import POINTER_FILE, TuningError, read_pointer

    with pytest.raises(TuningError, match="not a trial checkpoint"):
        read_pointer(tmp_path)
    (tmp_path / POINTER_FILE).write_text(json.dumps({"checkpoint": "/x", "run_name": "r"}))
    with pytest.raises(TuningError, match="without epoch, step, trial_id"):
        read_pointer(tmp_path)


# --- PBT's explore step -------------------------------------------------------------------------


def test_pbt_mutates_lists_by_neighbour_and_keeps_ranges_inside_their_bounds():
    from ray.tune.search.sample import Domain

    from anchorless.platform.tuning.campaign import KeepInRange, to_pbt_mutations

    space = {
        "training.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
        "detector.assigner.cost_giou": {"grid": [1.0, 3.0]},
        "detector.assigner.cost_cls": {"choice": [1.0, 2.0]},
        "training.grad_accum": {"randint": [1, 4]},
        "detector.assigner.cost_l1": {"quniform": [1.0, 5.0, 0.5]},
    }
    mutations = to_pbt_mutations(space)
    assert mutations["detector.assigner.cost_giou"] == [1.0, 3.0]
    assert mutations["detector.assigner.cost_cls"] == [1.0, 2.0]
    assert isinstance(mutations["training.optimizer.lr"], Domain)
    explored = KeepInRange(space)(
        {
            "training.optimizer.lr": 1.2e-2,  # 1e-2 * 1.2
            "detector.assigner.cost_giou": 3.0,
            "detector.assigner.cost_cls": 2.0,
            "training.grad_accum": 5,  # randint's upper bound is exclusive
            "detector.assigner.cost_l1": 0.8 * 1.3,
        }
    )
    assert explored == {
        "training.optimizer.lr": 1e-2,
        "detector.assigner.cost_giou": 3.0,
        "detector.assigner.cost_cls": 2.0,
        "training.grad_accum": 3,
        "detector.assigner.cost_l1": 1.0,
    }
    assert KeepInRange(space)({"detector.assigner.cost_l1": 2.6})["detector.assigner.cost_l1"] == pytest.approx(2.5)


def test_pbt_lets_a_trial_finish_at_its_last_epoch_instead_of_cloning_into_it(monkeypatch):
    from types import SimpleNamespace

    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    from anchorless.platform.tuning.schedulers import PopulationBasedTrainingToTheEnd

    asked = []
    monkeypatch.setattr(PopulationBasedTraining, "on_trial_result", lambda self, ctl, trial, result: asked.append(result["epoch"]) or "PBT")
    pbt = PopulationBasedTrainingToTheEnd(
        last_epoch=4, time_attr="epoch", metric="loss", mode="min", perturbation_interval=1, hyperparam_mutations={"x": [1, 2]}
    )
    trial = SimpleNamespace(config={"x": 1})
    assert [pbt.on_trial_result(None, trial, {"epoch": epoch}) for epoch in (1, 3, 4)] == ["PBT", "PBT", TrialScheduler.CONTINUE]
    assert asked == [1, 3]
    # A trial whose config sets its own epoch count ends there.
    searched = SimpleNamespace(config={"x": 1, "training.epochs": 2})
    assert pbt.on_trial_result(None, searched, {"epoch": 2}) == TrialScheduler.CONTINUE and asked == [1, 3]


# --- loading a donor's checkpoint ----------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_donor_checkpoint_brings_weights_and_step_but_the_new_lr_and_weight_decay_rule(
    process_group, tmp_path, monkeypatch, zero_stage
):
    from anchorless.platform.config import TrainingConfig
    from anchorless.platform.training.engine import WarmupSchedule, build_engine, deepspeed_config, save_engine
    from anchorless.platform.training.worker import load_keeping_hyperparameters

    for key, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # what Ray Train sets on a worker
    schedule = {"kind": "cosine", "warmup_steps": 3, "warmup_factor": 0.1}
    donor_cfg = TrainingConfig(zero_stage=zero_stage, optimizer={"lr": 1e-2, "weight_decay": 0.05}, schedule=schedule)
    donor, donor_scheduler = build_engine(
        tiny_model(), deepspeed_config(donor_cfg, batch_size=2, world_size=1), donor_cfg.schedule, total_steps=20
    )
    inputs = torch.randn(2, 4)
    for _ in range(5):
        donor.backward(donor(inputs).pow(2).mean())
        donor.step()
    save_engine(donor, tmp_path, {"epoch": 2})
    assert donor_scheduler.get_last_lr()[0] == pytest.approx(1e-2 * WarmupSchedule.from_config(donor_cfg.schedule, 20)(5))

    # The exploiting trial: a new learning rate and weight decay (and a different warmup).
    new_cfg = TrainingConfig(
        zero_stage=zero_stage, optimizer={"lr": 3e-4, "weight_decay": 0.0}, schedule={**schedule, "warmup_steps": 10}
    )
    engine, scheduler = build_engine(
        tiny_model(), deepspeed_config(new_cfg, batch_size=2, world_size=1), new_cfg.schedule, total_steps=20
    )
    saved = load_keeping_hyperparameters(engine, scheduler, tmp_path)
    assert saved["epoch"] == 2 and engine.global_steps == 5 and scheduler.last_epoch == 5
    for name, tensor in engine.module.state_dict().items():
        torch.testing.assert_close(tensor, donor.module.state_dict()[name])
    factor = WarmupSchedule.from_config(new_cfg.schedule, 20)
    expected = 3e-4 * factor(5)  # the new schedule, at the donor's step
    assert scheduler.get_last_lr() == pytest.approx([expected])
    group = scheduler.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(expected) and group["weight_decay"] == 0.0 and group["initial_lr"] == 3e-4
    assert engine.get_lr() == pytest.approx([expected])
    # The Adam moments came along: they are the donor's, not zeros.
    moments = [s["exp_avg"] for s in scheduler.optimizer.state.values() if "exp_avg" in s]
    assert moments and any(m.abs().sum() > 0 for m in moments)
    # Training on follows the new schedule step by step.
    engine.backward(engine(inputs).pow(2).mean())
    engine.step()
    assert scheduler.get_last_lr() == pytest.approx([3e-4 * factor(6)])
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4 * factor(6))


# --- a real campaign ------------------------------------------------------------------------------

EPOCHS = 2  # the exploit at epoch 1, then one epoch on from it (none at the last epoch)
# The good LR must lead after one epoch whatever the row order. Its epoch-mean loss, over 12
# row orders in a plain PyTorch loop on this data: 3.92-4.07 at 1e-3 with 4 warmup steps,
# against 4.42-4.47 for the bad one. At 3e-3 an early spike (one step at 21) sometimes put the
# good trial's mean above the bad one's, and PBT cloned the wrong trial.
BAD_LR, GOOD_LR = 1.0e-7, 1.0e-3
SCHEDULE = {"warmup_steps": 4, "min_lr_ratio": 0.5}  # cosine to half the LR: every step's LR tells which LR it is


@pytest.fixture(scope="module")
def pbt_campaign(tmp_path_factory) -> Path:
    from anchorless.platform.data.shards import write_shards
    from anchorless.platform.data.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("pbt")
    # Enough steps in epoch 1 (16) for the good learning rate to pull clearly ahead there.
    files = generate_synthetic_coco(root / "synth", num_images=160, size=64, seed=1, progress=False)
    for split, annotations in files.items():
        write_shards(annotations, root / "synth" / "images", root / "shards" / split, progress=False)
    base = {
        "name": "pbt-base",
        "workspace": str(root / "workspace"),
        "data": {
            "train": str(root / "shards" / "train"),
            "val": str(root / "shards" / "val"),
            "image_size": 64,
            "batch_size": 8,
            "augment": {"enabled": False},
        },
        "detector": {"name": "onenet", "num_classes": 3, "neck": {"channels": [32, 32, 32]}},
        "training": {
            "epochs": EPOCHS,
            "num_workers": 1,
            "optimizer": {"lr": GOOD_LR},
            "schedule": SCHEDULE,
            "checkpoint": {"metric": "loss", "mode": "min"},
        },
        "tracking": {"experiment": "pbt-tests", "registered_model": "pbt-shapes"},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    campaign = {
        "name": "pbt-lr",
        "base": "base.yaml",
        # One trial that cannot learn, one that can: the first must clone the second.
        "search_space": {"training.optimizer.lr": {"grid": [BAD_LR, GOOD_LR]}},
        "search": {"algorithm": "random", "seed": 0},
        # Synchronous: the trial that runs ahead waits, so the two always meet at epoch 1
        # (asynchronous PBT compares with whatever the other last reported: a race).
        "scheduler": {"kind": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "synch": True},
        "num_samples": 1,
        "max_concurrent_trials": 2,
        "metric": "loss",
        "mode": "min",
    }
    path = root / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign))
    return path


def _policy(tuner_dir: Path, trial_id: str) -> list[dict]:
    """Tune's own PBT log of one trial: a JSON list per exploit (tags, iterations, donor's and new config)."""
    path = tuner_dir / f"pbt_policy_{trial_id}.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    keys = ("target", "donor", "target_iteration", "donor_iteration", "donor_config", "new_config")
    return [dict(zip(keys, json.loads(line))) for line in lines]


def _results(tuner_dir: Path, trial_id: str) -> list[dict]:
    """Every result Tune received from one trial, in order, with its numbers as numbers
    (from ``progress.csv``: Tune may not have flushed the last line of ``result.json``)."""
    trial_dir = next(p for p in tuner_dir.iterdir() if p.is_dir() and f"_{trial_id}_" in p.name)
    with (trial_dir / "progress.csv").open() as rows:
        return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(rows)]


def _number(text: str) -> object:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


@pytest.mark.slow
def test_pbt_exploit_continues_from_the_donors_weights_and_epoch_with_its_own_new_lr(pbt_campaign):
    from mlflow import MlflowClient

    from anchorless.platform.config import ScheduleConfig
    from anchorless.platform.training.engine import WarmupSchedule
    from anchorless.platform.tuning.runner import TAG_EXPLOIT, TAG_TRIAL, tune_campaign

    summary = tune_campaign(pbt_campaign)
    assert summary["trials"] == 2 and summary["completed"] == 2
    root = pbt_campaign.parent / "workspace" / "campaigns" / "pbt-lr"
    tuner_dir = root / "tuner"
    client = MlflowClient(summary["tracking_uri"])
    children = {
        run.data.tags[TAG_TRIAL]: run
        for run in client.search_runs(
            [client.get_run(summary["parent_run_id"]).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'",
        )
    }
    assert len(children) == 2  # one MLflow run per trial, however often it was cloned
    assert all(run.info.status == "FINISHED" for run in children.values())
    bad = next(t for t, run in children.items() if float(run.data.params["training.optimizer.lr"]) == BAD_LR)
    good = next(t for t in children if t != bad)

    # Tune's PBT cloned the trial with the hopeless learning rate from the good one, once:
    # at epoch 1, not again at the last epoch (nothing is left to train there).
    policy = _policy(tuner_dir, bad)
    assert len(policy) == 1, policy
    assert policy[0]["donor_config"]["training.optimizer.lr"] == GOOD_LR
    assert _policy(tuner_dir, good) == []
    new_lr = policy[0]["new_config"]["training.optimizer.lr"]
    assert new_lr in (BAD_LR, GOOD_LR)  # explore moved along the grid, or stayed
    # ... and the clone is recorded in the trial's own MLflow run, naming its donor.
    exploits = sorted((k, json.loads(v)) for k, v in children[bad].data.tags.items() if k.startswith(f"{TAG_EXPLOIT}."))
    assert [k for k, _ in exploits] == [f"{TAG_EXPLOIT}.epoch0001"]
    assert exploits[0][1]["donor_trial"] == good
    assert exploits[0][1]["params"]["training.optimizer.lr"] == new_lr

    # Numbers, from what Tune received: after the clone the trial restarts (iterations
    # since restore back to 1) at epoch 2 from the donor's epoch-1 weights, not its own.
    results = [r for r in _results(tuner_dir, bad) if r["epoch"] != ""]
    donor = {r["epoch"]: r for r in _results(tuner_dir, good) if r["epoch"] != ""}
    assert sorted(donor) == list(range(1, EPOCHS + 1))  # the donor ran straight through
    assert [(r["epoch"], r["iterations_since_restore"]) for r in results] == [(1, 1), (2, 1)]
    stuck, resumed = results
    assert donor[1]["loss"] < 0.95 * stuck["loss"], (donor[1]["loss"], stuck["loss"])  # the good LR led at epoch 1
    assert resumed["step"] == 2 * donor[1]["step"]  # one epoch on from the donor's step
    # It trained on from the donor's weights: below where it was stuck, near the donor's epoch 2.
    assert resumed["loss"] < 0.5 * (stuck["loss"] + donor[1]["loss"]), (resumed["loss"], stuck["loss"], donor[1]["loss"])
    # Its learning rate: the new config's, on the schedule at the step it reached, not the donor's.
    schedule = WarmupSchedule.from_config(ScheduleConfig(**SCHEDULE), donor[1]["step"] * EPOCHS)
    assert resumed["lr"] == pytest.approx(new_lr * schedule(resumed["step"]), rel=1e-6)

    # Each trial logged into its own MLflow run.
    bad_epochs = {m.value for m in client.get_metric_history(children[bad].info.run_id, "epoch")}
    good_epochs = {m.value for m in client.get_metric_history(children[good].info.run_id, "epoch")}
    assert bad_epochs == {1.0, 2.0}  # before and after the clone
    assert good_epochs == {float(e) for e in range(1, EPOCHS + 1)}

    # The best is a trained trial's, well below where the stuck one sat.
    assert summary["best_loss"] < 0.85 * stuck["loss"]
    rows = json.loads((root / "trials.json").read_text())
    assert summary["best_loss"] == pytest.approx(min(row["loss"] for row in rows))
