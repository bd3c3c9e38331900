"""The platform against a real S3 API: the session's local S3 server (moto, ``object_store``).

Shards are written to and read from ``s3://``, a shard writer killed half-way leaves no
manifest, and one slow run goes the whole way: raccoon sharded from its Pascal VOC folder
to S3 (or, where raccoon is absent, the synthetic shapes from YOLO labels), a CenterNet
(keypoint triplets) trained by two Ray Train workers streaming from there with DeepSpeed
checkpoints and the MLflow artifacts on S3, then evaluated and promoted from the registry
reading both back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from anchorless.errors import DataError
from anchorless.platform.data.shards import coco_ground_truth, read_manifest, shard_dataset, write_shards
from anchorless.platform.data.synth import CATEGORIES, generate_synthetic_coco
from tests.conftest import tiny_keypoint_detector
from tests.platform.conftest import raccoon_root, write_yolo_labels


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    """90 synthetic 64 px images, COCO JSON per split: ``{"train": json, "val": json, "images": dir}``."""
    root = tmp_path_factory.mktemp("s3-synth")
    files = generate_synthetic_coco(root, num_images=90, size=64, seed=5, progress=False)
    return {**files, "images": root / "images"}


def test_shards_on_s3_read_back_verified_and_a_rewrite_replaces_them_leaving_nothing_beside(object_store, synth) -> None:
    bucket = object_store.bucket("shards-roundtrip")
    out = f"{bucket}/shapes/val"
    first = write_shards(synth["val"], synth["images"], out, target_shard_mb=0.01, workers=1, progress=False)
    assert read_manifest(out, verify=True) == first and len(first["shards"]) > 1
    assert len(coco_ground_truth(out)["images"]) == first["num_images"] == 18
    again = write_shards(synth["train"], synth["images"], out, target_shard_mb=1, workers=1, progress=False)
    assert read_manifest(out, verify=True) == again
    keys = object_store.keys("shards-roundtrip")
    assert sorted(key for key in keys if key.endswith((".parquet", ".json"))) == sorted(
        [f"shapes/val/{shard['file']}" for shard in again["shards"]] + ["shapes/val/manifest.json"]
    )  # the first run's extra shards are gone, no temporary prefix is left


def test_a_shard_writer_killed_half_way_leaves_no_manifest_in_the_bucket(object_store, synth) -> None:
    bucket = object_store.bucket("shards-killed")
    # One image per shard and one writer: 72 shards written one after another.
    command = [
        sys.executable, "-m", "anchorless.jobs.cli", "data", "shard", "--annotations", str(synth["train"]),
        "--images", str(synth["images"]), "--out", f"{bucket}/train", "--shard-mb", "0.000001", "--workers", "1",
    ]  # fmt: skip
    writer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while sum(key.endswith(".parquet") for key in object_store.keys("shards-killed")) < 3:
            assert writer.poll() is None, f"the writer ended before it was killed: {writer.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the writer wrote no shard in two minutes"
            time.sleep(0.05)
        os.killpg(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    keys = object_store.keys("shards-killed")
    assert any(key.endswith(".parquet") for key in keys)  # it was killed while writing
    assert not [key for key in keys if key.endswith("manifest.json")], keys
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(f"{bucket}/train")


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_voc_shards_on_s3_train_centernet_triplets_on_two_workers_checkpointing_and_logging_there_then_evaluate_and_promote(
    object_store, ray_local, synth, tiny_config, tmp_path, monkeypatch
) -> None:
    from mlflow import MlflowClient

    from anchorless.platform.config import build_config
    from anchorless.platform.registry.promotion import evaluate_version, promote
    from anchorless.platform.training.driver import train

    bucket = object_store.bucket("anchorless")
    took: dict[str, float] = {}
    started = time.monotonic()
    shards = {split: f"{bucket}/data/{split}" for split in ("train", "val")}
    raccoon = raccoon_root()
    if (raccoon / "splits" / "train.txt").is_file():
        from anchorless.platform.data.voc import load_voc

        model_name, loaders = "raccoon-s3", {
            split: partial(load_voc, raccoon / "annotations", raccoon / "images", split=raccoon / "splits" / f"{split}.txt")
            for split in shards
        }
    else:  # raccoon absent: the synthetic shapes, through the YOLO reader
        from anchorless.platform.data.yolo import load_yolo

        (tmp_path / "names.txt").write_text("".join(f"{c['name']}\n" for c in CATEGORIES))
        model_name, loaders = "shapes-s3", {}
        for split in shards:
            coco = json.loads(synth[split].read_text())
            write_yolo_labels(coco, tmp_path / "labels" / split)
            (tmp_path / "images" / split).mkdir(parents=True)
            for image in coco["images"]:
                (tmp_path / "images" / split / image["file_name"]).symlink_to(synth["images"] / image["file_name"])
            loaders[split] = partial(load_yolo, tmp_path / "labels" / split, tmp_path / "images" / split, tmp_path / "names.txt")
    manifests = {split: shard_dataset(loaders[split], shards[split], workers=1, progress=False) for split in shards}
    took["shard"] = time.monotonic() - started

    raw = tiny_config(
        tmp_path / "workspace", shards, model_name,
        tracking={"experiment": "s3", "registered_model": model_name, "artifact_location": f"{bucket}/mlflow"},
        epochs=1, checkpoint={"storage": f"{bucket}/runs"},
    )  # fmt: skip
    # CenterNet keypoint triplets (tiny): that family's run through the platform, its model
    # read back from the registry on S3 and scored by promotion's evaluation.
    raw["detector"] = tiny_keypoint_detector("centernet_triplets", num_classes=len(manifests["train"]["categories"]))
    started = time.monotonic()
    summary = train(build_config(raw), progress=False)
    took["train"] = time.monotonic() - started

    # Checkpoints: every rank's DeepSpeed part, under the run's name in the bucket.
    assert summary["checkpoint"].startswith(f"{bucket}/runs/{model_name}/checkpoint_epoch0001_"), summary["checkpoint"]
    checkpoint_keys = object_store.keys("anchorless", summary["checkpoint"].removeprefix(f"{bucket}/"))
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= {
        key.rsplit("/", 1)[1] for key in checkpoint_keys
    }
    # MLflow: the run's artifacts (model, data manifest) in the bucket, the model registered as v1.
    client = MlflowClient(summary["tracking_uri"], registry_uri=summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.artifact_uri.startswith(f"{bucket}/mlflow/s3/"), run.info.artifact_uri
    artifact_keys = object_store.keys("anchorless", run.info.artifact_uri.removeprefix(f"{bucket}/"))
    assert any(key.endswith("data/manifest.json") for key in artifact_keys)
    assert any("/model/" in key for key in artifact_keys) or client.get_model_version(model_name, "1").source.startswith("models:/")
    assert summary["model_uri"] == f"models:/{model_name}/1"

    # Promotion evaluates the version (`evaluate`: the model through the registry from the
    # bucket, the validation shards from the bucket) and moves the alias.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", summary["tracking_uri"])
    started = time.monotonic()
    evaluate_fn = partial(evaluate_version, out_dir=tmp_path / "evaluation", progress=False)
    decision = promote(client, model_name, "1", shards["val"], evaluate_fn=evaluate_fn)
    took["evaluate+promote"] = time.monotonic() - started
    assert decision.promoted and str(client.get_model_version_by_alias(model_name, "champion").version) == "1"
    scored = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert scored["images"] == manifests["val"]["num_images"] and scored["data"] == shards["val"]
    assert scored["AP"] == pytest.approx(decision.candidate_metrics["AP"])
    print("seconds: " + ", ".join(f"{step} {seconds:.0f}" for step, seconds in took.items()))
