"""Offline evaluation on a tiny synthetic shard set: exact scores from stand-in models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anchorless.platform.config import DataConfig
from anchorless.errors import DataError
from anchorless.platform.models.export import ModelError
from anchorless.platform.data.shards import manifest_checksum

IMAGE_SIZE = 96  # network input; the synthetic images are 128 px, so every scale is 0.75
NUM_IMAGES = 8


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    from anchorless.platform.data.shards import write_shards
    from anchorless.platform.data.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("evaluate")
    files = generate_synthetic_coco(
        root / "synth", num_images=2 * NUM_IMAGES, size=128, seed=3, val_fraction=0.5, progress=False
    )
    out = root / "shards" / "val"
    write_shards(files["val"], root / "synth" / "images", out, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _pixels_key(image: torch.Tensor) -> str:
    """The identity of a letterboxed image, from its uint8 pixels."""
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class OracleDetector(torch.nn.Module):
    """A stand-in detector that 'predicts' each image's ground truth (network pixels).

    With ``shift`` > 0 every box moves sideways, towards the image's middle, by that
    fraction of its width: its IoU with the truth is then (1 - shift) / (1 + shift).
    """

    def __init__(self, truth: dict[str, tuple[np.ndarray, np.ndarray, float]], shift: float = 0.0) -> None:
        super().__init__()
        self.truth = truth
        self.shift = shift

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            boxes, labels, valid_width = self.truth[_pixels_key(image.mul(255).round().to(torch.uint8))]
            boxes = torch.tensor(boxes).clone()  # (N, 4)
            if self.shift:
                width = boxes[:, 2] - boxes[:, 0]
                centre = (boxes[:, 0] + boxes[:, 2]) / 2
                direction = torch.where(centre < valid_width / 2, 1.0, -1.0)
                boxes[:, 0::2] += (direction * self.shift * width)[:, None]
            out.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": torch.tensor(labels)})
        return out


@pytest.fixture(scope="module")
def truth(shard_dir, ray_session) -> dict:
    """Each letterboxed image's boxes, read through the evaluation pipeline itself."""
    from anchorless.platform.data.pipeline import build_dataset

    table = {}
    dataset = build_dataset(shard_dir, DataConfig(image_size=IMAGE_SIZE), train=False)
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
        for row, image in enumerate(batch["image"]):
            count = int(batch["num_boxes"][row])
            valid_width = float(batch["orig_width"][row] * batch["scale"][row])
            table[_pixels_key(torch.from_numpy(np.array(image)))] = (
                batch["boxes"][row, :count], batch["labels"][row, :count], valid_width
            )
    return table


def _oracle(shard_dir: Path, truth: dict, shift: float = 0.0) -> tuple[OracleDetector, dict]:
    """The oracle and the meta load_model would give it."""
    from anchorless.platform.data.shards import read_manifest

    data = DataConfig(image_size=IMAGE_SIZE).model_dump(mode="json")
    meta = {"categories": read_manifest(shard_dir)["categories"], "config": {"data": data}, "source": "oracle"}
    return OracleDetector(truth, shift), meta


@pytest.mark.slow
def test_a_model_predicting_the_ground_truth_scores_ap_one_and_shifted_boxes_score_the_known_lower_ap(
    shard_dir, truth, tmp_path
):
    from anchorless.platform.evaluation.offline import METRICS, evaluate

    exact = evaluate(_oracle(shard_dir, truth), shard_dir, batch_size=3, out_dir=tmp_path / "exact", progress=False)
    # In this process (the same decode, the same pixels): the same exact detections.
    here = evaluate(_oracle(shard_dir, truth), shard_dir, batch_size=3, out_dir=tmp_path / "here", progress=False, executor="process")
    assert {key: here[key] for key in (*METRICS, "detections")} == {key: exact[key] for key in (*METRICS, "detections")}
    assert json.loads((tmp_path / "here" / "coco_results.json").read_text()) == json.loads((tmp_path / "exact" / "coco_results.json").read_text())
    assert exact["images"] == NUM_IMAGES
    assert (exact["AP"], exact["AP50"], exact["AP75"], exact["AR100"]) == (1.0, 1.0, 1.0, 1.0)
    assert exact["duplicate_rate"] == 0.0
    assert exact["confident_detections"] == sum(len(boxes) for boxes, _, _ in truth.values())  # score 1 each
    assert set(exact["per_class_AP"].values()) == {1.0}

    # IoU (1 - s) / (1 + s) = 0.725 with the truth: a hit at IoU thresholds 0.50..0.70, a miss
    # at 0.75..0.95, so AP = 5/10, AP50 = 1 and AP75 = 0.
    shift = 0.275 / 1.725
    shifted_oracle = _oracle(shard_dir, truth, shift)
    shifted = evaluate(shifted_oracle, shard_dir, batch_size=3, out_dir=tmp_path / "shifted", progress=False)
    assert shifted["AP"] == pytest.approx(0.5, abs=1e-9)
    assert shifted["AR100"] == pytest.approx(0.5, abs=1e-9)
    assert (shifted["AP50"], shifted["AP75"]) == (1.0, 0.0)

    # Files: the COCO results (original pixels, xywh) and the summary, as returned.
    results = json.loads((tmp_path / "exact" / "coco_results.json").read_text())
    summary = json.loads((tmp_path / "exact" / "summary.json").read_text())
    assert summary == exact and summary["results"] == str(tmp_path / "exact" / "coco_results.json")
    from anchorless.platform.data.shards import coco_ground_truth, read_manifest

    ground_truth = coco_ground_truth(shard_dir)
    assert len(results) == len(ground_truth["annotations"]) == exact["detections"]
    def keys(records: list[dict]) -> set:
        return {(r["image_id"], r["category_id"], tuple(round(v, 2) for v in r["bbox"])) for r in records}

    assert keys(results) == keys(ground_truth["annotations"])
    assert summary["data_manifest_sha256"] == manifest_checksum(read_manifest(shard_dir))


@pytest.mark.slow
def test_evaluate_runs_an_exported_model_file_on_ray_actors(shard_dir, ray_session, tmp_path):
    from anchorless.detectors import build_detector
    from anchorless.platform.config import build_config
    from anchorless.platform.evaluation.offline import evaluate
    from anchorless.platform.models.export import export_checkpoint
    from anchorless.platform.data.shards import coco_ground_truth, read_manifest

    cfg = build_config(
        {
            "data": {"image_size": IMAGE_SIZE},
            "detector": {
                "name": "onenet",
                "num_classes": 3,
                "backbone": {"depth": 18},
                "neck": {"channels": [32, 32, 32]},
            },
        }
    )
    torch.manual_seed(0)
    manifest = read_manifest(shard_dir)
    path = export_checkpoint(build_detector(cfg.detector), cfg, manifest, tmp_path / "model.pt")
    summary = evaluate(str(path), shard_dir, batch_size=4, out_dir=tmp_path / "out", concurrency=2, progress=False)

    assert summary["images"] == NUM_IMAGES and summary["model"] == str(path)
    assert summary["model_manifest_sha256"] == summary["data_manifest_sha256"] == manifest_checksum(manifest)
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert len(results) == summary["detections"] > 0
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco_ground_truth(shard_dir)["images"]}
    for result in results:  # mapped back to original pixels and clipped to the image
        x, y, w, h = result["bbox"]
        width, height = sizes[result["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
    assert 0.0 <= summary["AP"] <= 1.0 and 0.0 <= summary["duplicate_rate"] <= 1.0

    # Here, without Ray: the same decode and predictor, the same counts and scores.
    here = evaluate(str(path), shard_dir, batch_size=3, out_dir=tmp_path / "here", progress=False, executor="process")
    assert here["images"] == NUM_IMAGES and here["detections"] == summary["detections"]
    here_results = json.loads((tmp_path / "here" / "coco_results.json").read_text())

    def per_image(records: list[dict]) -> dict[int, int]:
        return {i: sum(r["image_id"] == i for r in records) for i in sizes}

    # Untrained scores are near-ties (the top 100 may differ in float rounding), so counts and
    # scores compare here; the oracle test compares the detections themselves.
    assert per_image(here_results) == per_image(results)
    for metric in ("AP", "AP50", "AR100", "duplicate_rate"):
        assert here[metric] == pytest.approx(summary[metric], abs=1e-3), metric


def test_auto_scores_a_small_set_here_unless_a_ray_cluster_is_given_or_joined(monkeypatch):
    import sys

    from anchorless.platform.evaluation.offline import IN_PROCESS_MAX_IMAGES, EvaluationError, _in_this_process, evaluate

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    class JoinedRay:
        @staticmethod
        def is_initialized() -> bool:
            return True

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert _in_this_process("auto", None, IN_PROCESS_MAX_IMAGES)
    assert not _in_this_process("auto", None, IN_PROCESS_MAX_IMAGES + 1)  # large: Ray's parallel decode pays
    assert not _in_this_process("auto", "ray://head:10001", 10)
    assert _in_this_process("process", "ray://head:10001", 10**6) and not _in_this_process("ray", None, 1)
    monkeypatch.setitem(sys.modules, "ray", JoinedRay)
    assert not _in_this_process("auto", None, 10)  # a Ray this process joined (a job, a trial) is used
    monkeypatch.delitem(sys.modules, "ray")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert not _in_this_process("auto", None, 10)
    with pytest.raises(EvaluationError, match="executor must be one of auto, ray, process, got 'gpu'"):
        evaluate((None, {}), "anywhere", executor="gpu")


def test_a_model_trained_on_other_categories_is_refused_with_both_tables(shard_dir):
    from anchorless.platform.evaluation.offline import evaluate

    meta = {
        "categories": [{"label": 0, "coco_id": 1, "name": "cat"}, {"label": 1, "coco_id": 2, "name": "dog"}],
        "config": {"data": DataConfig(image_size=IMAGE_SIZE).model_dump(mode="json")},
    }
    with pytest.raises(ModelError) as error:
        evaluate((OracleDetector({}), meta), shard_dir, progress=False)
    message = str(error.value)
    assert "the model's categories do not match the shards' manifest" in message
    assert "model: [0=cat (coco 1), 1=dog (coco 2)]" in message
    assert "shards: [0=rectangle (coco 1), 1=ellipse (coco 2), 2=triangle (coco 3)]" in message


def test_a_missing_shard_directory_is_a_data_error(tmp_path):
    from anchorless.platform.evaluation.offline import evaluate

    with pytest.raises(DataError, match="no manifest; not a shard directory"):
        evaluate((OracleDetector({}), {}), tmp_path / "nowhere", progress=False)


def test_manifest_checksum_is_the_sha256_of_the_manifest_file(shard_dir):
    from anchorless.platform.data.shards import read_manifest

    file_sha = hashlib.sha256((shard_dir / "manifest.json").read_bytes()).hexdigest()
    assert manifest_checksum(read_manifest(shard_dir)) == file_sha
