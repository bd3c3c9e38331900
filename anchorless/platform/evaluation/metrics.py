"""Scoring detections against COCO ground truth: COCO results, pycocotools AP, duplicate rate.

:func:`score_detections` is the one scorer: training's validation, offline evaluation
and the benchmarks all call it. Boxes are xyxy inside the code; COCO's xywh in
original-image pixels appears only here, at the boundary.
"""

from __future__ import annotations

import contextlib
import copy
import io
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

# sys.stdout is one per process: two redirects interleaving in two threads (rank 0 scores on
# its training thread while its side thread plots the previous evaluation) would restore each
# other's buffers and leave stdout pointing at a dead one. Reentrant: scoring nests them.
_STDOUT_LOCK = threading.RLock()


@contextlib.contextmanager
def pycocotools_quiet() -> Iterator[None]:
    """Swallow what pycocotools prints (every stage of an evaluation), one thread at a time."""
    with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):
        yield


# COCOeval.stats positions of the numbers we report.
_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def detections_to_coco_results(
    detections: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    scales: Sequence[float] | torch.Tensor | None = None,
    label_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) for pycocotools.

    Args:
        detections: per image ``{"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,)}``.
        image_ids: COCO image id of each image.
        scales: per-image letterbox scale (input pixels per original pixel); boxes are
            divided by it to return to original pixels. None keeps input pixels.
        label_to_category_id: contiguous label -> COCO category id (a mapping or a list
            indexed by label). None uses the label itself.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"got {len(detections)} detections for {len(image_ids)} image ids")
    if scales is not None and len(scales) != len(image_ids):
        raise ValueError(f"got {len(scales)} scales for {len(image_ids)} image ids")
    results = []
    for i, (det, image_id) in enumerate(zip(detections, image_ids)):
        boxes = torch.as_tensor(det["boxes"]).detach().float().cpu().reshape(-1, 4)  # (N, 4)
        if scales is not None:
            boxes = boxes / float(scales[i])
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()  # (N, 4)
        scores = torch.as_tensor(det["scores"]).detach().float().cpu().reshape(-1).tolist()
        labels = torch.as_tensor(det["labels"]).detach().cpu().reshape(-1).tolist()
        for bbox, score, label in zip(xywh, scores, labels):
            category = int(label) if label_to_category_id is None else int(label_to_category_id[int(label)])
            results.append({"image_id": int(image_id), "category_id": category, "bbox": bbox, "score": score})
    return results


def as_coco(coco_gt: COCO | Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` of a ground-truth dict (a copy, completed), or the object itself."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    dataset = copy.deepcopy(dict(coco_gt))
    for ann in dataset.get("annotations", []):  # fields COCOeval needs but hand-made sets omit
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    dataset.setdefault("info", {})
    coco = COCO()
    coco.dataset = dataset
    with pycocotools_quiet():
        coco.createIndex()
    return coco


def coco_eval(
    coco_gt: COCO | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Box AP with pycocotools: AP, AP50, AP75, APs, APm, APl, AR100 and ``per_class_AP``.

    ``per_class_AP`` maps category name (or id when unnamed) to AP@[.5:.95]. As in
    pycocotools, a metric with no ground truth to score (e.g. APl without large objects)
    is -1. No results at all gives zeros rather than pycocotools' crash. ``image_ids``
    restricts the evaluation (default: every image of ``coco_gt``).
    """
    coco = as_coco(coco_gt)
    categories = coco.loadCats(coco.getCatIds())
    names = {c["id"]: c.get("name", c["id"]) for c in categories}
    if not results:
        return {**{key: 0.0 for key in _STATS}, "per_class_AP": {names[c]: 0.0 for c in sorted(names)}}
    known = set(coco.getImgIds())
    unknown = {r["image_id"] for r in results} - known
    if unknown:
        raise ValueError(f"results refer to image ids not in the ground truth: {sorted(unknown)[:10]}")
    with pycocotools_quiet():
        coco_dt = coco.loadRes(copy.deepcopy(list(results)))  # loadRes edits its input
        evaluator = COCOeval(coco, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics: dict[str, Any] = {key: float(evaluator.stats[index]) for key, index in _STATS.items()}
    precision = evaluator.eval["precision"]  # (T iou, R recall, K classes, A areas, M max dets)
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", 100 detections
        per_class[names[category_id]] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    metrics["per_class_AP"] = per_class
    return metrics


def duplicate_counts(
    detections: Sequence[Mapping[str, torch.Tensor]],
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> tuple[int, int]:
    """(duplicates, confident): the two counts behind :func:`duplicate_rate`.

    ``confident`` is the number of detections with score >= score_threshold over all
    images; ``duplicates`` how many of them overlap (IoU >= iou_threshold) a
    higher-scoring detection of the same class in the same image. Equal scores are
    ranked by their order in the input.
    """
    confident, duplicates = 0, 0
    for det in detections:
        scores = torch.as_tensor(det["scores"]).detach().float().reshape(-1)
        keep = scores >= score_threshold  # (N,)
        if not keep.any():
            continue
        boxes = torch.as_tensor(det["boxes"]).detach().float().reshape(-1, 4)[keep]  # (N, 4)
        labels = torch.as_tensor(det["labels"]).detach().reshape(-1)[keep]  # (N,)
        order = torch.sort(scores[keep], descending=True, stable=True).indices  # (N,)
        boxes, labels = boxes[order], labels[order]
        overlap = (box_iou(boxes, boxes) >= iou_threshold) & (labels[:, None] == labels[None, :])  # (N, N)
        better = torch.ones_like(overlap).triu(diagonal=1)  # better[i, j]: i ranks above j
        duplicates += int((overlap & better).any(dim=0).sum())
        confident += len(labels)
    return duplicates, confident


def duplicate_rate(
    detections: Sequence[Mapping[str, torch.Tensor]],
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> float:
    """Fraction of confident detections that duplicate a better one: the cost of no NMS.

    See :func:`duplicate_counts`. 0 when there are no confident detections, so a
    model that detects nothing has a perfect rate: read it beside the confident count.
    """
    return duplicate_metrics(detections, score_threshold, iou_threshold)["duplicate_rate"]


def duplicate_metrics(
    detections: Sequence[Mapping[str, torch.Tensor]],
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> dict[str, float | int]:
    """``duplicate_rate`` and ``confident_detections``, as logged with every evaluation."""
    duplicates, confident = duplicate_counts(detections, score_threshold, iou_threshold)
    return {"duplicate_rate": duplicates / confident if confident else 0.0, "confident_detections": confident}


class Scores(NamedTuple):
    """What :func:`score_detections` returns: the summary and the COCO results it scored."""

    metrics: dict[str, Any]  # AP ... AR100, per_class_AP, duplicate_rate, confident_detections
    results: list[dict[str, Any]]  # COCO results (xywh, category ids), as written to coco_results.json


def score_detections(
    coco_gt: COCO | Mapping[str, Any],
    detections: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Mapping[int, int] | Sequence[int],
    *,
    duplicate_score_threshold: float = 0.3,
    duplicate_iou_threshold: float = 0.5,
) -> Scores:
    """COCO AP (every ground-truth image counts, predicted or not) and the duplicate rate of
    detections in original-image pixels, one per entry of ``image_ids``."""
    results = detections_to_coco_results(detections, image_ids, label_to_category_id=label_to_category_id)
    metrics = coco_eval(coco_gt, results)
    metrics.update(
        duplicate_metrics(detections, score_threshold=duplicate_score_threshold, iou_threshold=duplicate_iou_threshold)
    )
    return Scores(metrics, results)


__all__ = [
    "Scores",
    "as_coco",
    "coco_eval",
    "detections_to_coco_results",
    "duplicate_counts",
    "duplicate_metrics",
    "duplicate_rate",
    "score_detections",
]
