import pytest
import torch

from anchorless.platform.evaluation.metrics import coco_eval, detections_to_coco_results, duplicate_metrics, duplicate_rate

GT = {
    "images": [{"id": 7, "width": 100, "height": 100}, {"id": 9, "width": 100, "height": 100}],
    "annotations": [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 5, "bbox": [0, 0, 40, 40]},  # no area / iscrowd: filled in
    ],
    "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
}


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def test_results_are_xywh_in_original_pixels_with_category_ids():
    detections = [_det([[20.0, 20.0, 60.0, 80.0]], [0.5], [1])]
    results = detections_to_coco_results(detections, [7], scales=[2.0], label_to_category_id={0: 3, 1: 5})
    assert results == [{"image_id": 7, "category_id": 5, "bbox": [10.0, 10.0, 20.0, 30.0], "score": 0.5}]
    unscaled = detections_to_coco_results(detections, [7])
    assert unscaled[0]["bbox"] == [20.0, 20.0, 40.0, 60.0] and unscaled[0]["category_id"] == 1


def test_perfect_detections_score_one_and_per_class_ap_is_keyed_by_name():
    detections = [
        _det([[10.0, 10.0, 30.0, 40.0], [50.0, 50.0, 80.0, 80.0]], [0.9, 0.8], [0, 0]),
        _det([[0.0, 0.0, 40.0, 40.0]], [0.7], [1]),
    ]
    metrics = coco_eval(GT, detections_to_coco_results(detections, [7, 9], label_to_category_id=[3, 5]))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)
    assert metrics["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert metrics["APl"] == -1.0  # no large objects: pycocotools' "nothing to score"
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "per_class_AP"}


def test_a_false_positive_between_two_true_positives_gives_the_hand_computed_ap():
    # Ranked: TP (0.9), FP (0.8), TP (0.7) for the 2 cats. Interpolated precision is 1 up to
    # recall 0.5 (51 of COCO's 101 recall points) and 2/3 above (50 points).
    detections = [
        _det([[10.0, 10.0, 30.0, 40.0], [90.0, 0.0, 99.0, 9.0], [50.0, 50.0, 80.0, 80.0]], [0.9, 0.8, 0.7], [0, 0, 0]),
        _det([[0.0, 0.0, 40.0, 40.0]], [0.6], [1]),
    ]
    metrics = coco_eval(GT, detections_to_coco_results(detections, [7, 9], label_to_category_id=[3, 5]))
    cat_ap = (51 + 50 * 2 / 3) / 101
    assert metrics["per_class_AP"]["cat"] == pytest.approx(cat_ap, abs=1e-6)
    assert metrics["AP50"] == pytest.approx((cat_ap + 1.0) / 2, abs=1e-6)


def test_empty_results_give_zeros_instead_of_a_crash():
    metrics = coco_eval(GT, [])
    assert {k: v for k, v in metrics.items() if k != "per_class_AP"} == dict.fromkeys(
        ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"], 0.0
    )
    assert metrics["per_class_AP"] == {"cat": 0.0, "dog": 0.0}


def test_results_for_unknown_images_are_an_error():
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_eval(GT, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}])


def test_duplicate_rate_counts_confident_same_class_overlaps_with_a_better_detection():
    detections = [
        _det(
            [[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 60, 60]],
            [0.9, 0.8, 0.7, 0.2, 0.6],
            [0, 0, 1, 0, 0],
        ),
        _det([[0, 0, 10, 10]], [0.95], [0]),  # another image: never a duplicate of image 0
    ]
    # Confident (>= 0.3): 0.9, 0.8, 0.7, 0.6 and 0.95 -> 5. Duplicates: only 0.8 (IoU 10/11 with
    # 0.9, same class). 0.7 is another class, 0.2 is not confident, 0.6 does not overlap.
    assert duplicate_rate(detections) == pytest.approx(1 / 5)
    assert duplicate_rate(detections, iou_threshold=0.95) == 0.0
    assert duplicate_rate([_det([], [], [])]) == 0.0
    assert duplicate_metrics(detections) == {"duplicate_rate": pytest.approx(1 / 5), "confident_detections": 5}
    assert duplicate_metrics([_det([], [], [])]) == {"duplicate_rate": 0.0, "confident_detections": 0}


def test_pycocotools_quiet_in_two_threads_at_once_leaves_stdout_as_it_was():
    """Rank 0 scores on its training thread while its side thread plots: the second redirect
    waits for the first, so sys.stdout never ends up pointing at one of their buffers."""
    import sys
    import threading

    from anchorless.platform.evaluation.metrics import pycocotools_quiet

    before = sys.stdout
    plotting, plotted, scored = threading.Event(), threading.Event(), threading.Event()

    def plot() -> None:
        with pycocotools_quiet():
            print("pycocotools chatter")
            plotting.set()
            assert plotted.wait(10)

    def score() -> None:
        with pycocotools_quiet():
            scored.set()

    side = threading.Thread(target=plot)
    side.start()
    assert plotting.wait(10)
    main = threading.Thread(target=score)
    main.start()
    assert not scored.wait(0.3)  # held until the plot's redirect has ended
    plotted.set()
    side.join()
    main.join()
    assert scored.is_set() and sys.stdout is before
