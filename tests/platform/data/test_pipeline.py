"""The Ray Data pipeline: decoded fixed-shape rows, model inputs, equal steps on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from anchorless.platform.config import AugmentConfig, DataConfig
from anchorless.platform.data.pipeline import (
    EpochStream,
    decode_and_transform,
    passes_per_execution,
    steps_per_epoch,
    stream_pass_order,
    to_model_inputs,
)
from anchorless.platform.data.shards import coco_ground_truth, write_shards


@pytest.fixture
def shard_table(tmp_path, make_coco):
    annotations, images = make_coco()
    manifest = write_shards(annotations, images, tmp_path / "out", progress=False)
    return pq.read_table(tmp_path / "out" / manifest["shards"][0]["file"])


def _decode(table, *, augment=None, max_boxes=8, size=64, seed=0, epoch=0):
    return decode_and_transform(
        table, image_size=size, max_boxes=max_boxes, augment=augment, seed=seed, epoch=epoch
    )


def test_eval_rows_are_letterboxed_with_padded_targets_and_a_scale_back_to_original(shard_table) -> None:
    out = _decode(shard_table)
    assert out["image"].shape == (3, 3, 64, 64) and out["image"].dtype == np.uint8
    assert out["boxes"].shape == (3, 8, 4) and out["boxes"].dtype == np.float32
    assert out["labels"].shape == (3, 8) and out["labels"].dtype == np.int64
    assert out["image_id"].tolist() == [1, 2, 3]
    assert out["orig_width"].tolist() == [40] * 3 and out["orig_height"].tolist() == [30] * 3
    np.testing.assert_allclose(out["scale"], 64 / 40)
    # image 1: two boxes; image 2: its crowd box is left out of targets; image 3: none
    assert out["num_boxes"].tolist() == [2, 1, 0]
    assert out["labels"][0].tolist() == [1, 0, -1, -1, -1, -1, -1, -1]
    assert out["labels"][2].tolist() == [-1] * 8
    np.testing.assert_allclose(out["boxes"][0, :2] / out["scale"][0], [[2, 3, 12, 11], [20, 5, 35, 25]], atol=0.5)
    np.testing.assert_allclose(out["boxes"][1, 0] / out["scale"][1], [5.5, 6.25, 10, 10], atol=0.5)
    assert not out["boxes"][0, 2:].any()


def test_boxes_over_the_cap_are_dropped_and_counted(shard_table) -> None:
    out = _decode(shard_table, max_boxes=1)
    assert out["num_boxes"].tolist() == [1, 1, 0]
    assert out["num_boxes_capped"].tolist() == [1, 0, 0]


def test_augmentation_repeats_for_the_same_seed_and_epoch_and_changes_with_the_epoch(shard_table) -> None:
    augment = AugmentConfig(crop_prob=0.5).model_dump()
    first = _decode(shard_table, augment=augment, epoch=0)
    again = _decode(shard_table, augment=augment, epoch=0)
    next_epoch = _decode(shard_table, augment=augment, epoch=1)
    other_seed = _decode(shard_table, augment=augment, seed=1, epoch=0)
    for key in ("image", "boxes", "labels", "scale"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["image"], next_epoch["image"])
    assert not np.array_equal(first["image"], other_seed["image"])
    assert next_epoch["epoch"].tolist() == [1, 1, 1]


def test_model_inputs_are_unit_float_images_and_unpadded_targets(shard_table) -> None:
    out = _decode(shard_table)
    images, targets, meta = to_model_inputs(out, "cpu")
    assert images.dtype == torch.float32 and images.shape == (3, 3, 64, 64)
    assert 0.0 <= images.min() and images.max() <= 1.0
    torch.testing.assert_close(images[0], torch.from_numpy(out["image"][0]).float() / 255)
    assert [len(t["labels"]) for t in targets] == [2, 1, 0]
    assert targets[0]["labels"].dtype == torch.int64 and targets[0]["boxes"].shape == (2, 4)
    assert meta["image_id"].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "num_images, world_size, batch_size, steps", [(23, 2, 4, 2), (205, 2, 8, 12), (7, 3, 2, 1), (5, 2, 4, 0)]
)
def test_steps_per_epoch_is_what_every_rank_can_run(num_images, world_size, batch_size, steps) -> None:
    assert steps_per_epoch(num_images, world_size, batch_size) == steps


class _Iterable:
    def __init__(self, make_iterator) -> None:
        self.make_iterator = make_iterator

    def __iter__(self):
        return self.make_iterator()


class _FakeIterator:
    """A DataIterator whose every execution yields ``num_batches`` batches."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches
        self.executions = 0
        self.ended = 0  # executions whose iteration was closed or ran out

    def iter_batches(self, **kwargs):
        """Like Ray's DataIterator: an iterable (not an iterator) over one execution."""
        assert kwargs["drop_last"] is True
        return _Iterable(self._execution)

    def _execution(self):
        self.executions += 1
        try:
            yield from self._batches()
        finally:
            self.ended += 1

    def _batches(self):
        for index in range(self.num_batches):
            yield {
                "image": np.zeros((2, 3, 32, 32), np.uint8),
                "boxes": np.zeros((2, 4, 4), np.float32),
                "labels": np.full((2, 4), -1),
                "num_boxes": np.zeros(2, np.int32),
                "num_boxes_capped": np.array([index, 0], np.int32),
                "image_id": np.array([2 * index, 2 * index + 1]),
                "epoch": np.full(2, self.executions),
            }


def test_epochs_are_cut_from_one_stream_that_runs_on_across_executions() -> None:
    fake = _FakeIterator(5)
    stream = EpochStream(fake, batch_size=2, steps=3)
    epochs = [[meta for _, _, meta in stream.epoch()] for _ in range(4)]
    assert [len(metas) for metas in epochs] == [3, 3, 3, 3]
    # 12 batches from executions of 5: nothing dropped at an epoch's end, the next execution started twice
    assert fake.executions == 3
    ids = [meta["image_id"][0].item() for metas in epochs for meta in metas]
    assert ids == [0, 2, 4, 6, 8, 0, 2, 4, 6, 8, 0, 2]
    # an epoch left early resumes where it stopped
    partial = stream.epoch()
    next(partial)
    assert next(stream.epoch())[2]["image_id"][0].item() == 6


def test_closing_a_stream_ends_its_execution_at_once_and_the_next_epoch_starts_a_new_one() -> None:
    fake = _FakeIterator(5)
    stream = EpochStream(fake, batch_size=2, steps=3)
    assert [meta["image_id"][0].item() for _, _, meta in stream.epoch()] == [0, 2, 4]
    assert (fake.executions, fake.ended) == (1, 0)  # in flight
    stream.close()  # before an evaluation: Ray Data must be told now, not at garbage collection
    assert (fake.executions, fake.ended) == (1, 1)
    stream.close()  # nothing in flight: no-op
    assert [meta["image_id"][0].item() for _, _, meta in stream.epoch()] == [0, 2, 4]
    assert (fake.executions, fake.ended) == (2, 1)


def test_a_batch_fetched_ahead_in_another_thread_opens_the_next_epoch_and_is_not_fetched_twice() -> None:
    from concurrent.futures import ThreadPoolExecutor

    fake = _FakeIterator(5)
    stream = EpochStream(fake, batch_size=2, steps=3)
    with ThreadPoolExecutor(1) as early:  # as the worker does while it builds its engine
        early.submit(stream.fetch_ahead).result()
    stream.fetch_ahead()  # one batch ahead at most
    assert fake.executions == 1
    epochs = [[meta["image_id"][0].item() for _, _, meta in stream.epoch()] for _ in range(2)]
    assert epochs == [[0, 2, 4], [6, 8, 0]]  # nothing skipped, nothing repeated
    stream.fetch_ahead()
    stream.close()  # a batch fetched ahead belongs to the execution it ends
    assert [meta["image_id"][0].item() for _, _, meta in stream.epoch()] == [0, 2, 4]


def test_a_stream_with_no_batch_fails_with_a_message() -> None:
    with pytest.raises(RuntimeError, match="delivered no batch of 2"):
        next(EpochStream(_FakeIterator(0), batch_size=2, steps=3).epoch())
    with pytest.raises(ValueError, match="at least one step"):
        EpochStream(_FakeIterator(1), batch_size=2, steps=0)


@pytest.mark.parametrize("num_images, stream_rows, passes", [(205, 4096, 20), (4096, 4096, 1), (100_000, 4096, 1), (23, 100, 5)])
def test_a_cached_stream_spans_about_stream_rows(num_images, stream_rows, passes) -> None:
    assert passes_per_execution(num_images, stream_rows) == passes
    assert passes_per_execution(num_images, stream_rows, max_passes=3) == min(passes, 3)  # a run's epochs


def test_each_pass_visits_every_block_once_in_its_own_order() -> None:
    orders = [stream_pass_order(7, data_pass, 10) for data_pass in range(3)]
    assert all(sorted(order.tolist()) == list(range(10)) for order in orders)
    assert len({tuple(order.tolist()) for order in orders}) == 3
    assert np.array_equal(stream_pass_order(7, 1, 10), orders[1])


# --- with Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory) -> tuple[Path, dict]:
    """23 training images (an odd count) of 64 px shapes, sharded."""
    from anchorless.platform.data.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synth")
    files = generate_synthetic_coco(root / "coco", num_images=29, size=64, seed=3, progress=False)
    manifest = write_shards(files["train"], root / "coco" / "images", root / "shards", progress=False)
    assert manifest["num_images"] == 23
    return root / "shards", manifest


@pytest.mark.slow
def test_ray_dataset_streams_every_image_once_with_targets_matching_the_ground_truth(ray_local, synth_shards) -> None:
    from anchorless.platform.data.pipeline import build_dataset

    shard_dir, manifest = synth_shards
    cfg = DataConfig(image_size=64, batch_size=4, max_boxes=10)
    rows = {}
    for batch in build_dataset(shard_dir, cfg, train=False, block_rows=4).iter_batches(batch_size=5, batch_format="numpy"):
        for i, image_id in enumerate(batch["image_id"].tolist()):
            rows[image_id] = {key: value[i] for key, value in batch.items()}
    truth = coco_ground_truth(shard_dir)
    assert sorted(rows) == sorted(image["id"] for image in truth["images"])
    label_of = {c["coco_id"]: c["label"] for c in manifest["categories"]}
    for image_id, row in rows.items():
        expected = [a for a in truth["annotations"] if a["image_id"] == image_id]
        assert row["num_boxes"] == len(expected)
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in expected)]).reshape(-1, 4)
        np.testing.assert_allclose(row["boxes"][: len(expected)] / row["scale"], xyxy, atol=0.5)
        assert row["labels"][: len(expected)].tolist() == [label_of[a["category_id"]] for a in expected]

    augmented = next(iter(build_dataset(shard_dir, cfg, train=True, block_rows=4).iter_batches(batch_size=23)))
    assert augmented["image"].shape == (23, 3, 64, 64)
    same = [np.array_equal(augmented["image"][i], rows[image_id]["image"]) for i, image_id in enumerate(augmented["image_id"])]
    assert not all(same)  # training rows are augmented


def _report_batches(config: dict) -> None:
    """Ray Train loop: for each dataset, record each epoch's batches, image ids and augmentation
    passes on this rank."""
    import ray.train

    from anchorless.platform.config import DataConfig
    from anchorless.platform.data.pipeline import EpochStream, steps_per_epoch

    world_size = ray.train.get_context().get_world_size()
    rank = ray.train.get_context().get_world_rank()
    for name, data in config["data"].items():
        cfg = DataConfig(**data)
        stream = EpochStream(  # as the training worker makes it: the same steps on every rank
            ray.train.get_dataset_shard(name),
            batch_size=cfg.batch_size,
            steps=steps_per_epoch(config["num_images"], world_size, cfg.batch_size),
            device="cpu",
            prefetch_batches=cfg.prefetch_batches,
        )
        record = []
        for _ in range(config["epochs"]):
            batches, rows = 0, []
            for images, targets, meta in stream.epoch():
                assert images.shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
                assert len(targets) == cfg.batch_size
                batches += 1
                rows += list(zip(meta["image_id"].tolist(), meta["epoch"].tolist()))
            record.append({"batches": batches, "rows": rows})
        Path(config["out"], f"{name}-rank{rank}.json").write_text(json.dumps(record))


# Both ways a split streams, in one Ray Train run (its start-up is most of the cost): one
# pass per Ray Data execution, and four passes per execution (92 rows of 23 images).
STREAM_ROWS = {"one-pass-per-execution": 1, "four-passes-per-execution": 92}


@pytest.mark.slow
def test_two_train_workers_run_the_same_number_of_batches_on_an_odd_image_count(ray_local, synth_shards, tmp_path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anchorless.platform.data.pipeline import build_dataset

    shard_dir, manifest = synth_shards
    configs = {
        name: DataConfig(image_size=64, batch_size=4, cache_encoded="always", stream_rows=stream_rows)
        for name, stream_rows in STREAM_ROWS.items()
    }
    epochs = 6
    trainer = TorchTrainer(
        _report_batches,
        train_loop_config={
            "data": {name: cfg.model_dump() for name, cfg in configs.items()},
            "num_images": manifest["num_images"],
            "out": str(tmp_path),
            "epochs": epochs,
        },
        scaling_config=ScalingConfig(num_workers=2),
        datasets={name: build_dataset(shard_dir, cfg, train=True, block_rows=4) for name, cfg in configs.items()},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="equal-steps"),
    )
    trainer.fit()
    expected = steps_per_epoch(23, 2, 4)  # 11 rows per rank and pass -> 2 full batches
    assert expected == 2
    image_ids = {image["id"] for image in coco_ground_truth(shard_dir)["images"]}
    for name in STREAM_ROWS:
        ranks = [json.loads((tmp_path / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1)]
        assert [[epoch["batches"] for epoch in rank] for rank in ranks] == [[expected] * epochs] * 2, name
        rows = [tuple(row) for rank in ranks for epoch in rank for row in epoch["rows"]]
        passes: dict[int, list[int]] = {}
        for image_id, data_pass in rows:
            passes.setdefault(data_pass, []).append(image_id)
        # no image twice in a pass, across both ranks; passes (augmentation seeds) count on across executions
        assert all(len(ids) == len(set(ids)) for ids in passes.values()), name
        assert set(range(4)) <= set(passes) and max(passes) >= 4, name  # 96 rows consumed, 23 per pass
        assert all(image_id in image_ids for image_id, _ in rows), name


def test_grayscale_and_png_images_decode_to_three_channels(tmp_path, make_coco) -> None:
    from PIL import Image

    annotations, images = make_coco()
    Image.new("L", (40, 30), 90).save(images / "img_1.jpg", format="JPEG")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(images / "img_2.jpg", format="PNG")  # PNG bytes, .jpg name
    manifest = write_shards(annotations, images, tmp_path / "out", progress=False)
    out = _decode(pq.read_table(tmp_path / "out" / manifest["shards"][0]["file"]))
    assert out["image"].shape == (3, 3, 64, 64)
    gray = out["image"][0, :, :48, :]  # 30 * 64/40 = 48 rows of content
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all() and abs(int(gray[0, 10, 10]) - 90) <= 2
    assert out["image"][1, :, 10, 10].tolist() == [10, 200, 30]
