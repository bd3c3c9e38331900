"""What the driver checks and decides before any Ray worker starts: one clear error per problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anchorless.platform.config import ConfigError, build_config
from anchorless.errors import DataError
from anchorless.platform.training.driver import train
from anchorless.platform.training.plan import DRIVER_OUTBOX, RANK0_OUTBOX, RUN_FILE, SUMMARY_FILE, adopt_start_checkpoint, plan_run

TINY_DETECTOR = {"name": "onenet", "num_classes": 3, "neck": {"channels": [32, 32, 32]}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Synthetic shapes, 20 images of 64 px, sharded into train (16) and val (4)."""
    from anchorless.platform.data.shards import write_shards
    from anchorless.platform.data.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("plan")
    files = generate_synthetic_coco(root / "synth", num_images=20, size=64, seed=0, progress=False)
    for split, annotations in files.items():
        write_shards(annotations, root / "synth" / "images", root / "shards" / split, progress=False)
    return {split: root / "shards" / split for split in files}


def _cfg(tmp_path: Path, shards: dict[str, Path], **sections):
    raw = {
        "name": "plan-test",
        "workspace": str(tmp_path / "workspace"),
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "image_size": 64, "batch_size": 2},
        "detector": TINY_DETECTOR,
        "training": {"num_workers": 2, "epochs": 3},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return build_config(raw)


def test_plan_counts_equal_steps_per_rank_and_builds_the_deepspeed_config(tmp_path, shards):
    plan = plan_run(_cfg(tmp_path, shards, training={"num_workers": 2, "epochs": 3, "grad_accum": 2}))
    assert plan.micro_steps_per_epoch == 16 // 2 // 2  # images // workers // batch
    assert plan.steps_per_epoch == 2  # two micro-steps per optimizer step
    assert plan.total_steps == 6
    assert plan.deepspeed_config["train_batch_size"] == 2 * 2 * 2
    assert plan.run_dir == (tmp_path / "workspace" / "runs" / "plan-test").resolve()
    assert plan.resume_run_id is None


def test_no_train_shards_configured_is_a_config_error(tmp_path, shards):
    with pytest.raises(ConfigError, match=r"data\.train: no shard directory given"):
        plan_run(_cfg(tmp_path, shards, data={"train": None}))


def test_a_missing_shard_directory_is_named(tmp_path, shards):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{missing}: no such shard directory \(data\.val\)"):
        plan_run(_cfg(tmp_path, shards, data={"val": str(missing)}))


def test_a_directory_without_a_manifest_is_named(tmp_path, shards):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/manifest.json: no manifest"):
        plan_run(_cfg(tmp_path, shards, data={"train": str(tmp_path / "empty")}))


def test_a_shard_that_no_longer_matches_its_manifest_checksum_is_named(tmp_path, shards):
    copy = tmp_path / "train"
    shutil.copytree(shards["train"], copy)
    shard = sorted(copy.glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {shard.name} has sha256 .* the manifest says"):
        plan_run(_cfg(tmp_path, shards, data={"train": str(copy)}))


def test_a_detector_class_count_that_disagrees_with_the_manifest_is_a_config_error(tmp_path, shards):
    with pytest.raises(ConfigError, match=r"detector.num_classes is 80 .* 3 categories \(rectangle, ellipse, triangle\); set detector.num_classes=3"):
        plan_run(_cfg(tmp_path, shards, detector={**TINY_DETECTOR, "num_classes": 80}))


def test_label_smoothing_on_a_detector_without_a_focal_loss_is_refused_before_any_worker_starts(tmp_path, shards):
    centernet = {"name": "centernet", "num_classes": 3, "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}}
    with pytest.raises(ConfigError, match=r"training\.label_smoothing=0\.1: CenterNet has no sigmoid focal"):
        plan_run(_cfg(tmp_path, shards, detector=centernet, training={"label_smoothing": 0.1}))
    assert plan_run(_cfg(tmp_path, shards, training={"label_smoothing": 0.1})).total_steps > 0  # OneNet has one


def test_too_few_images_for_workers_times_batch_is_a_config_error(tmp_path, shards):
    with pytest.raises(ConfigError, match=r"16 images: too few for 4 workers x data.batch_size=8"):
        plan_run(_cfg(tmp_path, shards, data={"batch_size": 8}, training={"num_workers": 4}))


def test_a_run_name_that_is_not_a_plain_directory_name_is_refused(tmp_path, shards):
    with pytest.raises(ConfigError, match=r"run name '../x'"):
        plan_run(_cfg(tmp_path, shards, tracking={"run_name": "../x"}))


def test_config_and_data_errors_surface_before_ray_starts(tmp_path, shards):
    import ray

    assert not ray.is_initialized()
    with pytest.raises(DataError):
        train(_cfg(tmp_path, shards, data={"train": str(tmp_path / "nowhere")}))
    assert not ray.is_initialized()


def _record_run(plan_dir: Path, cfg, run_id: str = "abc123") -> None:
    plan_dir.mkdir(parents=True, exist_ok=True)
    (plan_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "config": cfg.to_dict()}))


def test_a_second_run_with_the_same_name_resumes_the_recorded_mlflow_run(tmp_path, shards):
    cfg = _cfg(tmp_path, shards)
    _record_run(plan_run(cfg).run_dir, cfg)
    plan = plan_run(cfg)
    assert plan.resume_run_id == "abc123"
    assert plan.finished_summary is None


def test_resuming_with_a_different_detector_is_refused_with_the_way_out(tmp_path, shards):
    cfg = _cfg(tmp_path, shards)
    _record_run(plan_run(cfg).run_dir, cfg)
    other = _cfg(tmp_path, shards, detector={**TINY_DETECTOR, "loss": {"giou": 3.0}})
    with pytest.raises(ConfigError, match=r"run 'plan-test' exists .* different the detector section.*--restart"):
        plan_run(other)


def test_restart_deletes_the_previous_run_and_starts_afresh(tmp_path, shards):
    cfg = _cfg(tmp_path, shards)
    run_dir = plan_run(cfg).run_dir
    _record_run(run_dir, cfg)
    (run_dir / "checkpoint_epoch0001").mkdir()
    plan = plan_run(cfg, restart=True)
    assert plan.resume_run_id is None
    assert not run_dir.exists()
    assert not list(run_dir.parent.glob(".plan-test*"))  # nothing left half-deleted


def test_a_finished_run_returns_its_summary_unless_more_epochs_are_asked_for(tmp_path, shards):
    cfg = _cfg(tmp_path, shards)
    run_dir = plan_run(cfg).run_dir
    _record_run(run_dir, cfg)
    (run_dir / SUMMARY_FILE).write_text(json.dumps({"run_id": "abc123", "epoch": 3, "AP50": 0.9}))
    assert train(cfg) == {"run_id": "abc123", "epoch": 3, "AP50": 0.9}  # no Ray, no training
    longer = _cfg(tmp_path, shards, training={"num_workers": 2, "epochs": 5})
    plan = plan_run(longer)
    assert plan.finished_summary is None and plan.resume_run_id == "abc123"


def test_an_unreachable_tracking_store_is_a_clear_error_before_ray_starts(tmp_path, shards, monkeypatch):
    import ray

    from anchorless.platform.tracking.store import TrackingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = _cfg(tmp_path, shards, tracking={"tracking_uri": "http://127.0.0.1:9"})  # nothing listens on port 9
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 is not reachable"):
        train(cfg)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("overrides", "val_dir", "expected"),
    [
        ([], "val", 1),  # evaluated every epoch
        (["evaluation.every_epochs=5", "training.checkpoint.every_epochs=10"], "val", 5),
        (["evaluation.every_epochs=5", "training.checkpoint.every_epochs=2"], "val", 2),  # a checkpoint is scored too
        (["evaluation.every_epochs=5", "training.checkpoint.every_epochs=10"], None, 10),  # nothing to score
        (["evaluation.every_epochs=50", "training.checkpoint.every_epochs=50"], "val", 12),  # the run's epochs
        (["evaluation.every_epochs=50", "training.checkpoint.every_epochs=50", "evaluation.every_steps=30"], "val", 3),
    ],
)
def test_the_training_stream_spans_no_more_epochs_than_lie_between_evaluations(overrides, val_dir, expected):
    from types import SimpleNamespace

    from anchorless.platform.config import apply_overrides
    from anchorless.platform.training.driver import _epochs_between_evaluations

    cfg = build_config(apply_overrides({"training": {"epochs": 12}}, overrides), source="test")
    plan = SimpleNamespace(val_dir=val_dir, micro_steps_per_epoch=10)
    assert _epochs_between_evaluations(cfg, plan) == expected


def test_starting_from_another_runs_checkpoint_discards_own_checkpoints_but_keeps_tracking_calls_waiting(tmp_path):
    donor = tmp_path / "runs" / "donor" / "checkpoint_epoch0002_step0000010"
    (donor / "deepspeed").mkdir(parents=True)
    run_dir = tmp_path / "runs" / "trial"
    (run_dir / "checkpoint_epoch0001_step0000005").mkdir(parents=True)
    (run_dir / RUN_FILE).write_text('{"run_id": "abc"}')
    (run_dir / RANK0_OUTBOX).write_text('{"call": "log_batch", "metrics": [["loss", 1.0, 0, 5]]}\n')
    (run_dir / f"{RANK0_OUTBOX}.files" / "000000").mkdir(parents=True)
    (run_dir / DRIVER_OUTBOX).write_text('{"call": "set_terminated", "status": "KILLED"}\n')

    adopt_start_checkpoint(run_dir, donor)
    assert sorted(path.name for path in run_dir.iterdir()) == sorted(
        [RUN_FILE, RANK0_OUTBOX, f"{RANK0_OUTBOX}.files", DRIVER_OUTBOX, "start"]
    )
    assert (run_dir / RANK0_OUTBOX).read_text().startswith('{"call": "log_batch"')
