"""Pictures of an evaluation for people: a precision-recall curve per class and a grid
of sample images with their detections and ground truth, logged to a run.

PR curves come from pycocotools' own accumulated ``eval['precision']`` so they
agree with the AP figures; boxes are drawn by :mod:`anchorless.platform.data.drawing`.
Matplotlib runs on its file-only backend (no display).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from anchorless.platform.data.drawing import class_color, draw_coco_detections, image_grid
from anchorless.platform.evaluation.metrics import as_coco, pycocotools_quiet

log = logging.getLogger(__name__)


@dataclass
class PRCurve:
    """Precision at pycocotools' 101 recall points for one class; -1 entries are removed."""

    category_id: int
    name: str
    recall: np.ndarray  # (R,)
    precision: np.ndarray  # (R,)
    average_precision: float  # mean precision over the recall points; -1 if the class has no ground truth


def precision_recall_curves(
    coco_gt: Mapping[str, Any],
    coco_results: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
) -> list[PRCurve]:
    """One curve per category of ``coco_gt`` at the given IoU, area "all", 100 detections."""
    from pycocotools.cocoeval import COCOeval

    with pycocotools_quiet():
        ground_truth = as_coco(coco_gt)  # a copy: COCOeval marks annotations in place
        categories = {category["id"]: category["name"] for category in ground_truth.dataset.get("categories", [])}
        if not coco_results:
            empty = np.zeros(0)
            return [
                PRCurve(category_id, name, empty, empty, 0.0 if ground_truth.getAnnIds(catIds=[category_id]) else -1.0)
                for category_id, name in sorted(categories.items())
            ]
        # loadRes adds keys to each result dict; give it copies.
        detections = ground_truth.loadRes([dict(result) for result in coco_results])
        evaluator = COCOeval(ground_truth, detections, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    params = evaluator.params
    iou_index = int(np.argmin(np.abs(np.asarray(params.iouThrs) - iou_threshold)))
    area_index = list(params.areaRngLbl).index("all")
    dets_index = len(params.maxDets) - 1
    precision = evaluator.eval["precision"]  # (T, R, K, A, M)
    recall_points = np.asarray(params.recThrs)
    curves = []
    for k, category_id in enumerate(params.catIds):
        values = precision[iou_index, :, k, area_index, dets_index]
        valid = values > -1
        average_precision = float(values[valid].mean()) if valid.any() else -1.0
        name = categories.get(category_id, str(category_id))
        curves.append(PRCurve(category_id, name, recall_points[valid], values[valid], average_precision))
    return curves


def plot_pr_curve(curve: PRCurve, *, iou_threshold: float = 0.5):
    """A matplotlib Figure of one class's PR curve; the caller saves or logs it and closes it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 4.0), dpi=100)
    axes = figure.subplots()
    if curve.recall.size:
        axes.plot(curve.recall, curve.precision, color=np.array(class_color(0)) / 255, linewidth=2)
        axes.fill_between(curve.recall, curve.precision, alpha=0.15, color=np.array(class_color(0)) / 255)
    if curve.average_precision < 0:
        ap_text = "no ground truth"
    else:
        ap_text = f"AP{int(round(iou_threshold * 100))} = {curve.average_precision:.3f}"
    axes.set_title(f"{curve.name} (id {curve.category_id}): {ap_text}", fontsize=10)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def evaluation_grid(
    coco_gt: Mapping[str, Any],
    coco_results: Sequence[Mapping[str, Any]],
    sample_images: Sequence[Mapping[str, Any]],
    *,
    score_threshold: float = 0.3,
    columns: int = 4,
) -> np.ndarray:
    """A grid (H,W,3) uint8 of sample images with their detections and ground truth drawn."""
    names = {category["id"]: category["name"] for category in coco_gt.get("categories", [])}
    detections_by_image: dict[int, list[Mapping[str, Any]]] = {}
    for result in coco_results:
        detections_by_image.setdefault(int(result["image_id"]), []).append(result)
    truth_by_image: dict[int, list[Mapping[str, Any]]] = {}
    for annotation in coco_gt.get("annotations", []):
        truth_by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
    drawn = []
    for sample in sample_images:
        image_id = int(sample["image_id"])
        drawn.append(
            draw_coco_detections(
                sample["image"],
                detections_by_image.get(image_id, []),
                names,
                scale=float(sample.get("scale", 1.0)),
                score_threshold=score_threshold,
                ground_truth=truth_by_image.get(image_id, []),
            )
        )
    return image_grid(drawn, columns=columns)


def log_evaluation(
    tracker: Any,
    summary: Mapping[str, Any],
    step: int,
    coco_gt: Mapping[str, Any],
    coco_results: Sequence[Mapping[str, Any]],
    sample_images: Sequence[Mapping[str, Any]] | None = None,
    *,
    score_threshold: float = 0.3,
) -> None:
    """Evaluation artifacts of a run under ``evaluation/step_NNNNNNN/``: ``summary.json``, a PR
    curve per class (``pr_curves/<id>_<name>.png``, IoU 0.5) and ``predictions.png``, a grid of images.

    ``tracker`` is a :class:`~anchorless.platform.tracking.tracker.Tracker` (its calls are
    retried, then dropped: a plot never stops training). ``sample_images`` items are dicts
    ``{"image": array (H,W,3) or (3,H,W), "image_id": int, "scale": float}``; ``scale`` maps
    original pixels to the image's (network px / original px, 1.0 for an original image).
    Their detections (score >= ``score_threshold``) are drawn in class colours, ground
    truth thin and white. Metrics go through the tracker's ``log_metrics``.
    """
    folder = f"evaluation/step_{int(step):07d}"
    tracker.log_dict(summary, f"{folder}/summary.json")
    try:
        curves = precision_recall_curves(coco_gt, coco_results)
    except Exception as exc:  # a plot must not stop training
        log.warning("PR curves skipped: %s", exc)
        curves = []
    for curve in curves:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", curve.name).strip("_") or "class"
        tracker.log_figure(plot_pr_curve(curve), f"{folder}/pr_curves/{curve.category_id}_{name}.png")
    if sample_images:
        grid = evaluation_grid(coco_gt, coco_results, sample_images, score_threshold=score_threshold)
        tracker.log_image(grid, f"{folder}/predictions.png")
