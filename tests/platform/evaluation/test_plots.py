"""Pictures of an evaluation: PR curves from pycocotools' own accumulation, the sample grid."""

from __future__ import annotations

import numpy as np
import pytest

from anchorless.platform.data.drawing import class_color
from anchorless.platform.evaluation import plots

COCO_GT = {
    "images": [{"id": 1, "width": 64, "height": 48}, {"id": 2, "width": 64, "height": 48}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [30, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [2, 20, 10, 20], "area": 200, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "tall box"}],
}


def test_pr_curve_of_a_perfect_class_is_flat_at_one_and_a_false_positive_first_halves_the_start():
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [30, 10, 20, 20], "score": 0.8},
        # class 2: a confident false positive, then the true box.
        {"image_id": 1, "category_id": 2, "bbox": [40, 20, 10, 20], "score": 0.95},
        {"image_id": 2, "category_id": 2, "bbox": [2, 20, 10, 20], "score": 0.5},
    ]
    curves = {curve.name: curve for curve in plots.precision_recall_curves(COCO_GT, results)}
    assert curves["box"].average_precision == 1.0
    assert np.all(curves["box"].precision == 1.0) and curves["box"].recall[-1] == 1.0
    # One ground truth found second: precision 1/2 at every recall point.
    assert curves["tall box"].average_precision == pytest.approx(0.5)


def test_evaluation_grid_draws_detections_in_the_images_pixels():
    network_image = np.zeros((3, 128, 128), dtype=np.uint8)
    results = [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 18, 18], "score": 0.9}]
    samples = [{"image": network_image, "image_id": 1, "scale": 2.0}]
    grid = plots.evaluation_grid({**COCO_GT, "annotations": []}, results, samples)
    assert grid.shape == (256, 256, 3)  # one tile: make_grid adds no padding
    # The box at 2x lands at x, y = 10..46 in the 128 px image, which sits unscaled in the tile.
    colored = (grid == np.array(class_color(0), dtype=np.uint8)).all(axis=-1)
    ys, xs = np.nonzero(colored)
    assert (xs.min(), xs.max(), ys.max()) == (10, 46, 46)
