"""Multi-scale training (one size per step, the same on every rank) and mixup (both images' boxes kept)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from anchorless.platform.config import ConfigError, build_config
from anchorless.platform.data.mixup import mix_samples, mixup
from anchorless.platform.data.pipeline import decode_and_transform, multiscale_size, resize_batch
from anchorless.platform.data.shards import write_shards
from anchorless.platform.data.transforms import Sample

SIZES = [320, 384, 448, 512]


def test_the_step_size_is_a_function_of_seed_and_step_alone_so_every_rank_draws_the_same():
    # Two "ranks" asking in different orders, at different times, get the same size per step.
    rank0 = [multiscale_size(SIZES, seed=7, step=step) for step in range(1, 201)]
    rank1 = [multiscale_size(SIZES, seed=7, step=step) for step in reversed(range(1, 201))][::-1]
    assert rank0 == rank1
    assert set(rank0) == set(SIZES)  # every size is drawn, roughly evenly
    assert min(rank0.count(size) for size in SIZES) > 200 / len(SIZES) / 2
    assert rank0 != [multiscale_size(SIZES, seed=8, step=step) for step in range(1, 201)]  # the seed matters


def test_a_batch_resized_to_the_step_size_carries_its_boxes_with_it():
    images = torch.rand(2, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[8.0, 4.0, 40.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    resized, moved = resize_batch(images, targets, 32)
    assert resized.shape == (2, 3, 32, 32)
    torch.testing.assert_close(moved[0]["boxes"], torch.tensor([[4.0, 2.0, 20.0, 30.0]]))
    assert moved[0]["labels"].tolist() == [1] and moved[1]["boxes"].shape == (0, 4)
    assert resize_batch(images, targets, 64)[0] is images  # the canvas size: untouched
    assert resize_batch(images, targets, 96)[0].shape == (2, 3, 96, 96)


def test_multiscale_sizes_are_validated_naming_the_key():
    assert build_config({}).data.multiscale.enabled is False  # off by default
    with pytest.raises(ConfigError, match=r"data\.multiscale\.sizes: .*multiple of 32.*\[400\]"):
        build_config({"data": {"multiscale": {"enabled": True, "sizes": [384, 400]}}})
    with pytest.raises(ConfigError, match=r"data\.multiscale\.sizes: needs at least one size"):
        build_config({"data": {"multiscale": {"sizes": []}}})


def _sample(value: int, boxes: list[list[float]], labels: list[int]) -> Sample:
    return Sample.create(torch.full((3, 32, 32), value, dtype=torch.uint8), np.array(boxes, np.float32), np.array(labels))


def test_mixup_blends_the_pixels_and_keeps_the_boxes_of_both_images():
    first = _sample(200, [[1, 1, 10, 10]], [0])
    second = _sample(100, [[5, 5, 20, 20], [0, 0, 30, 8]], [2, 1])
    mixed = mixup(first, second, 0.75)
    assert mixed.image.dtype == torch.uint8 and int(mixed.image[0, 0, 0]) == 175  # 0.75 * 200 + 0.25 * 100
    assert mixed.boxes.tolist() == [[1, 1, 10, 10], [5, 5, 20, 20], [0, 0, 30, 8]]
    assert mixed.labels.tolist() == [0, 2, 1]
    assert tuple(mixed.boxes.canvas_size) == (32, 32)


def test_mixing_a_block_pairs_each_image_with_another_reproducibly():
    samples = [_sample(10 * i, [[i, i, i + 5, i + 5]], [i]) for i in range(4)]
    ids = [11, 12, 13, 14]
    always = mix_samples(samples, ids, prob=1.0, alpha=1.5, seed=0, epoch=3)
    for own, mixed in zip(samples, always):
        assert len(mixed.labels) == 2 and mixed.labels[0] == own.labels[0]  # its own box first
        assert mixed.labels[1] != own.labels[0]  # then another image's, never its own again
    again = mix_samples(samples, ids, prob=1.0, alpha=1.5, seed=0, epoch=3)
    assert all(torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels) for a, b in zip(always, again))
    never = mix_samples(samples, ids, prob=0.0, alpha=1.5, seed=0, epoch=3)
    assert all(mixed is own for mixed, own in zip(never, samples))
    assert mix_samples(samples[:1], ids[:1], prob=1.0, alpha=1.5, seed=0, epoch=3)[0] is samples[0]  # no partner


def test_the_decoded_block_with_mixup_ships_both_images_boxes(tmp_path, make_coco):
    annotations, images = make_coco()
    manifest = write_shards(annotations, images, tmp_path / "out", progress=False)
    table = pq.read_table(tmp_path / "out" / manifest["shards"][0]["file"])
    kwargs = {"image_size": 64, "max_boxes": 8, "augment": None, "seed": 0, "epoch": 0}
    plain = decode_and_transform(table, **kwargs)
    mixed = decode_and_transform(table, **kwargs, mixup={"prob": 1.0, "alpha": 1.5})
    # Every image now carries its own boxes and its partner's: the total grows, none is lost.
    assert (mixed["num_boxes"] >= plain["num_boxes"]).all()
    assert mixed["num_boxes"].sum() > plain["num_boxes"].sum()
    for row, count in enumerate(plain["num_boxes"].tolist()):
        np.testing.assert_array_equal(mixed["boxes"][row, :count], plain["boxes"][row, :count])
    assert not np.array_equal(mixed["image"], plain["image"])
