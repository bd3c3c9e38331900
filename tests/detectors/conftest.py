"""Shared helpers for the detector tests: tiny configs and a few synthetic images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _few_threads():
    """The test machine is shared: keep each test to two threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


def small_config(name: str, **sections) -> dict:
    """A ResNet-18, BatchNorm, nothing-frozen config with 3 classes, plus overrides."""
    cfg = {"name": name, "num_classes": 3, "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def load_synthetic(root: Path, split: str, count: int) -> tuple[torch.Tensor, list[dict], dict]:
    """The first `count` images of a synthetic split that have objects, as a batch.

    Returns images (B, 3, S, S) in [0, 1], targets (xyxy boxes, labels 0..C-1) and the COCO
    ground truth restricted to those images.
    """
    coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    images = [im for im in coco["images"] if by_image.get(im["id"])][:count]
    category_ids = sorted(c["id"] for c in coco["categories"])
    batch, targets = [], []
    for im in images:
        pixels = np.array(Image.open(root / "images" / im["file_name"]).convert("RGB"))
        batch.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        anns = by_image[im["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])
        labels = torch.tensor([category_ids.index(a["category_id"]) for a in anns], dtype=torch.long)
        targets.append({"boxes": boxes, "labels": labels})
    kept = {im["id"] for im in images}
    gt = {
        "images": images,
        "annotations": [a for a in coco["annotations"] if a["image_id"] in kept],
        "categories": coco["categories"],
    }
    return torch.stack(batch), targets, gt
