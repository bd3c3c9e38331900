"""Fixtures for the data path: tiny COCO data sets on disk, BCCD and raccoon, a local Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def bccd_root() -> Path:
    """BCCD beside the repository (or $ANCHORLESS_BCCD)."""
    return Path(os.environ.get("ANCHORLESS_BCCD", REPO / ".." / "shared" / "datasets" / "bccd"))


@pytest.fixture(scope="session")
def bccd() -> Path:
    root = bccd_root()
    if not (root / "annotations" / "instances_train.json").is_file():
        pytest.skip(f"BCCD not found at {root} (set ANCHORLESS_BCCD)")
    return root


def write_jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


CocoFactory = Callable[..., tuple[Path, Path]]


@pytest.fixture
def make_coco(tmp_path: Path) -> CocoFactory:
    """Write a small valid COCO data set, then let a test break one thing.

    ``make_coco(edit=fn)`` calls ``fn(coco_dict)`` before writing the JSON;
    returns ``(annotations_json, image_root)``. Three 40x30 images (ids 1..3),
    categories with COCO ids 7 and 3, four boxes; image 3 has none.
    """

    def factory(edit: Callable[[dict[str, Any]], None] | None = None, *, size: tuple[int, int] = (40, 30)) -> tuple[Path, Path]:
        width, height = size
        root = tmp_path / "data"
        images = root / "images"
        coco: dict[str, Any] = {
            "images": [
                {"id": i, "file_name": f"img_{i}.jpg", "width": width, "height": height} for i in (1, 2, 3)
            ],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
                {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 5, 15, 20], "area": 250, "iscrowd": 0},
                {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 40, 30], "area": 1000, "iscrowd": 1},
                {"id": 13, "image_id": 2, "category_id": 7, "bbox": [5.5, 6.25, 4.5, 3.75], "iscrowd": 0},
            ],
            "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        }
        for image in coco["images"]:
            write_jpeg(images / image["file_name"], width, height, seed=image["id"])
        if edit is not None:
            edit(coco)
        annotations = root / "instances.json"
        annotations.write_text(json.dumps(coco))
        return annotations, images

    return factory


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module, shut down after it.

    Module-scoped, not session-scoped: other modules start their own Ray or
    assert that none is running.
    """
    import ray

    if ray.is_initialized():  # left over by a test that did not clean up
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group, as Ray Train sets one up on each worker. One per session:
    DeepSpeed caches the group it first sees, so a second one would leave it stale."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_model():
    """A two-layer MLP with fixed initial weights: enough for an optimizer and a schedule to act on."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def raccoon_root() -> Path:
    """The raccoon data set (Pascal VOC) beside the repository (or $ANCHORLESS_RACCOON)."""
    return Path(os.environ.get("ANCHORLESS_RACCOON", REPO / ".." / "shared" / "datasets" / "raccoon"))


@pytest.fixture(scope="session")
def raccoon() -> Path:
    root = raccoon_root()
    if not (root / "annotations").is_dir() or not (root / "splits" / "train.txt").is_file():
        pytest.skip(f"raccoon not found at {root} (set ANCHORLESS_RACCOON)")
    return root


def write_yolo_labels(coco: dict[str, Any], labels_dir: Path) -> None:
    """A COCO data set's boxes as YOLO label files (``class cx cy w h``, normalised, full precision);
    class ``i`` is the ``i``-th category in id order."""
    class_of = {category["id"]: index for index, category in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    lines: dict[int, list[str]] = {image["id"]: [] for image in coco["images"]}
    size = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    for ann in coco["annotations"]:
        (x, y, w, h), (width, height) = ann["bbox"], size[ann["image_id"]]
        values = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
        lines[ann["image_id"]].append(" ".join([str(class_of[ann["category_id"]]), *(repr(v) for v in values)]))
    labels_dir.mkdir(parents=True, exist_ok=True)
    for image in coco["images"]:
        (labels_dir / Path(image["file_name"]).with_suffix(".txt")).write_text("".join(f"{line}\n" for line in lines[image["id"]]))
