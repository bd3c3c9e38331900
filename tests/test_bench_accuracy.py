"""bench/accuracy.py's own logic, without a race: where --data points, the classes read from the
data, shards reused while their source is unchanged, the rows and their overrides, and the
headline against the stronger peer. (The race itself trains for minutes: it is not a test.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from anchorless.detectors import DETECTORS as REGISTERED

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts bench/ on sys.path for its `common`
    return module


@pytest.fixture(scope="module")
def common(bench):
    return sys.modules["common"]  # bench/common.py, as the script imported it


def write_split(root: Path, folder: str, split: str, categories: list[str], images: list[str]) -> None:
    """A COCO instances JSON of ``images`` (40 x 30 px, one box each) under ``root/folder``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (40, 30), (120, 80, 40)).save(root / "images" / name)
    document = {
        "images": [{"id": i + 1, "file_name": name, "width": 40, "height": 30} for i, name in enumerate(images)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [5, 5, 20, 15], "area": 300, "iscrowd": 0} for i in range(len(images))],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(categories)],
    }
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / f"instances_{split}.json").write_text(json.dumps(document))


def test_a_preset_is_its_own_variable_else_under_the_datasets_folder_and_anything_else_a_path(common, monkeypatch, tmp_path):
    monkeypatch.delenv("ANCHORLESS_RACCOON", raising=False)
    monkeypatch.setenv("ANCHORLESS_DATASETS", str(tmp_path / "all"))
    assert common.dataset_root("raccoon") == tmp_path / "all" / "raccoon"
    assert common.dataset_root("raccoon", tmp_path / "given") == tmp_path / "given" / "raccoon"
    monkeypatch.setenv("ANCHORLESS_RACCOON", str(tmp_path / "mine"))
    assert common.dataset_root("raccoon", tmp_path / "given") == tmp_path / "mine"
    assert common.dataset_root(str(tmp_path / "raccoon")) == tmp_path / "raccoon"  # a path, not the preset


def test_splits_are_found_under_annotations_or_coco_and_a_root_without_them_is_refused(common, tmp_path):
    write_split(tmp_path / "a", "annotations", "train", ["cell"], ["1.jpg"])
    write_split(tmp_path / "a", "annotations", "val", ["cell"], ["2.jpg"])
    write_split(tmp_path / "a", "annotations", "test", ["cell"], ["3.jpg"])
    assert set(common.coco_split_files(tmp_path / "a")) == {"train", "val", "test"}
    write_split(tmp_path / "b", "coco", "train", ["raccoon"], ["1.jpg"])
    write_split(tmp_path / "b", "coco", "val", ["raccoon"], ["2.jpg"])
    assert common.coco_split_files(tmp_path / "b") == {split: tmp_path / "b" / "coco" / f"instances_{split}.json" for split in ("train", "val")}
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        common.coco_split_files(tmp_path / "c")


def test_classes_come_from_the_data_and_shards_are_reused_until_the_source_changes(bench, tmp_path):
    root, cache = tmp_path / "set", tmp_path / "cache"
    write_split(root, "coco", "train", ["raccoon"], ["1.jpg", "2.jpg"])
    write_split(root, "coco", "val", ["raccoon"], ["3.jpg"])
    data = bench.shard_splits(str(root), cache)
    assert (data.classes, data.scored, set(data.shards)) == (["raccoon"], "val", {"train", "val"})
    manifest = data.shards["train"] / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert bench.shard_splits(str(root), cache).shards == data.shards and manifest.stat().st_mtime_ns == written
    write_split(root, "coco", "train", ["raccoon"], ["1.jpg"])  # the source changed: sharded again
    bench.shard_splits(str(root), cache)
    assert json.loads(manifest.read_text())["num_images"] == 1
    write_split(root, "coco", "val", ["raccoon", "dog"], ["3.jpg"])
    with pytest.raises(ValueError, match="categories differ"):
        bench.shard_splits(str(root), cache)


def test_every_registered_detector_is_an_entry(bench):
    missing = set(REGISTERED) - {recipe["name"] for recipe in bench.DETECTORS.values()}
    assert not missing, f"registered detectors without an entry in bench/accuracy.py's DETECTORS: {sorted(missing)}"
    assert all("num_classes" not in recipe for recipe in bench.DETECTORS.values())  # read from the data


def test_saccade_trains_on_256_px_object_crops_and_the_others_on_the_races_canvas(bench, common, tmp_path):
    import argparse

    data = common.ShardedData("shapes", tmp_path, {"train": tmp_path / "train", "val": tmp_path / "val"}, ["a", "b"], "val")
    args = argparse.Namespace(image_size=416, minutes=10.0, overrides=["cornernet_saccade:training.seed=3"])
    saccade = bench.experiment_config("cornernet_saccade", data, tmp_path, args, seed=1)
    assert (saccade.data.image_size, saccade.data.augment.object_crop.enabled) == (256, True)
    assert saccade.training.seed == 3 and saccade.detector["num_classes"] == 2  # --set after the entry's own
    squeeze = bench.experiment_config("cornernet_squeeze", data, tmp_path, args, seed=1)
    assert (squeeze.data.image_size, squeeze.data.augment.object_crop.enabled, squeeze.training.seed) == (416, False, 1)


def test_ablation_rows_follow_their_entry_and_take_its_overrides_then_their_own(bench):
    assert bench.race_rows(["torchvision_fcos_r18", "fcos_r18"], ["ema", "mixup"], ["fcos_r18"]) == [
        "torchvision_fcos_r18", "fcos_r18", "fcos_r18+ema", "fcos_r18+mixup",
    ]  # fmt: skip
    given = ["training.seed=1", "fcos_r18:training.optimizer.lr=1e-3", "fcos_r18+ema:training.ema.tau=300", "onenet_r18:x.y=1"]
    assert bench.overrides_for("fcos_r18+ema", given) == [
        *bench.TRICKS["ema"], "training.seed=1", "training.optimizer.lr=1e-3", "training.ema.tau=300",
    ]  # fmt: skip
    assert bench.overrides_for("fcos_r18", given) == ["training.seed=1", "training.optimizer.lr=1e-3"]
    with pytest.raises(ValueError, match="'fcos_r19' is not an entry"):
        bench.overrides_for("fcos_r18", ["fcos_r19:training.seed=1"])


def test_the_headline_is_against_the_stronger_peer_row_not_a_peer_ablation(bench):
    results = {
        "torchvision_fcos_r18": {"AP": 0.30},
        "torchvision_fcos_r18_bf16": {"AP": 0.40},
        "torchvision_fcos_r18_bf16+ema": {"AP": 0.80},
        "fcos_r18": {"AP": 0.52},
    }
    head = bench.headline(results)
    assert (head["peer"], head["peer_AP"]) == ("torchvision_fcos_r18_bf16", 0.40)
    assert head["AP_ratio"]["fcos_r18"] == 1.3 and head["AP_ratio"]["torchvision_fcos_r18"] == 0.75
    assert bench.headline({"fcos_r18": {"AP": 0.5}}) == {}
    assert bench.headline({"torchvision_fcos_r18": {"AP": 0.0}, "fcos_r18": {"AP": 0.1}})["AP_ratio"]["fcos_r18"] is None
