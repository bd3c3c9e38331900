"""Predicting on image files: COCO-style JSON in original pixels and drawn copies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anchorless.errors import DataError
from anchorless.platform.data.drawing import class_color
from anchorless.platform.models.predict import predict_images

CATEGORIES = [
    {"label": 0, "coco_id": 1, "name": "rectangle"},
    {"label": 1, "coco_id": 2, "name": "ellipse"},
    {"label": 2, "coco_id": 3, "name": "triangle"},
]
IMAGE_SIZE = 64


class FixedDetector(torch.nn.Module):
    """Predicts the same two boxes (network pixels) on every image and records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.inputs.append(images.clone())
        boxes = torch.tensor([[8.0, 4.0, 40.0, 20.0], [0.0, 0.0, 10.0, 10.0]])
        return [
            {"boxes": boxes, "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0])} for _ in images
        ]


def _source(model: FixedDetector) -> tuple:
    return model, {"categories": CATEGORIES, "image_size": IMAGE_SIZE, "source": "fixed"}


def _image(path: Path, width: int, height: int, value: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)
    return path


def test_predict_writes_coco_json_in_original_pixels_and_a_drawn_copy_of_each_image(tmp_path):
    # 160 x 80 letterboxed to 64: scale 0.4, so network box (8, 4, 40, 20) is (20, 10, 100, 50) here.
    wide = _image(tmp_path / "in" / "wide.png", 160, 80)
    # The same file name in another folder must not overwrite the first drawing.
    twin = _image(tmp_path / "other" / "wide.png", 160, 80, value=200)
    photo = _image(tmp_path / "in" / "photo.jpg", 80, 80)
    model = FixedDetector()

    out = predict_images(_source(model), [wide, twin, photo], tmp_path / "out", score_threshold=0.3, progress=False)

    assert out == tmp_path / "out" / "detections.json"
    document = json.loads(out.read_text())
    assert [(i["file_name"], i["width"], i["height"], i["drawn"]) for i in document["images"]] == [
        (str(wide), 160, 80, "wide.png"),
        (str(twin), 160, 80, "wide-2.png"),
        (str(photo), 80, 80, "photo.jpg"),
    ]
    assert document["categories"] == [{"id": c["coco_id"], "name": c["name"]} for c in CATEGORIES]
    first = [a for a in document["annotations"] if a["image_id"] == 1]
    ellipse = {"category_id": 2, "category_name": "ellipse", "bbox": [20.0, 10.0, 80.0, 40.0], "area": 3200.0}
    assert first == [{"id": 1, "image_id": 1, **ellipse, "score": 0.9}]  # the 0.1 detection is below the threshold
    square = [a for a in document["annotations"] if a["image_id"] == 3]
    assert square[0]["bbox"] == [10.0, 5.0, 40.0, 20.0]  # 80 px letterboxed to 64: scale 0.8

    # The network saw the letterbox: the image top-left, padded with grey below.
    first_batch = model.inputs[0]
    assert first_batch.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(first_batch[0, :, :32, :], torch.full((3, 32, 64), 30 / 255))
    assert torch.allclose(first_batch[0, :, 32:, :], torch.full((3, 32, 64), 114 / 255))

    drawn = np.asarray(Image.open(tmp_path / "out" / "wide.png"))
    assert drawn.shape == (80, 160, 3)
    assert tuple(drawn[30, 20]) == class_color(1)  # left edge of the box, in the ellipse colour
    assert tuple(drawn[70, 140]) == (30, 30, 30)  # untouched elsewhere
    assert np.asarray(Image.open(tmp_path / "out" / "wide-2.png"))[70, 140, 0] == 200
    assert Image.open(tmp_path / "out" / "photo.jpg").format == "JPEG"


def test_a_missing_image_is_named_before_any_model_is_loaded(tmp_path):
    present = _image(tmp_path / "a.png", 32, 32)
    with pytest.raises(DataError, match=r"nothere\.jpg: no such image file"):
        predict_images(tmp_path / "no-model.pt", [present, tmp_path / "nothere.jpg"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_is_a_clear_error_naming_it(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    with pytest.raises(DataError, match=r"broken\.jpg: cannot decode image"):
        predict_images(_source(FixedDetector()), [broken], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "detections.json").exists()
