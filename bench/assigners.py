"""OneNet's minimum-cost assignment vs the one-to-one (Hungarian) solution, at COCO scale.

Both modes of ``MinCostAssigner`` get the same cost inputs: one image's 128 x 128 stride-4
map (R = 16384 locations) with 80-class logits and predicted boxes, and 10, 50 or 100
ground truths, hence the same (R, M) cost matrix. "min" gives each ground truth its
cheapest location (OneNet); "hungarian" solves the one-to-one problem with scipy's
``linear_sum_assignment``. The headline is the assignment on that same cost matrix, in ms
per image, on one thread; the whole call (building the cost matrix, which both modes
share, plus the assignment) is shown beside it. Times are CPU time of the calling thread
(``time.thread_time``; torch runs on that one thread, as does scipy's solver), so the
load of other jobs on a shared machine does not enter; medians over the repeats.

    .venv/bin/python bench/assigners.py [--repeats 15]

Prints a side-by-side table, then one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from anchorless.detectors.assigners import MinCostAssigner

MAP_SIZE, STRIDE, NUM_CLASSES = 128, 4, 80
IMAGE_SIZE = MAP_SIZE * STRIDE  # 512 x 512 input
GT_COUNTS = (10, 50, 100)


def make_inputs(num_gt: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Logits (R, C), predicted boxes (R, 4) around each location, gt boxes (M, 4), labels (M,)."""
    ys, xs = torch.meshgrid(torch.arange(MAP_SIZE), torch.arange(MAP_SIZE), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], dim=1).float() * STRIDE + STRIDE // 2  # (R, 2)
    ltrb = torch.rand(points.shape[0], 4, generator=generator) * 64  # (R, 4)
    pred_boxes = torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], dim=1)  # (R, 4)
    logits = torch.randn(points.shape[0], NUM_CLASSES, generator=generator) - 4.0  # (R, C)
    corner = torch.rand(num_gt, 2, generator=generator) * IMAGE_SIZE * 0.8  # (M, 2)
    size = 8 + torch.rand(num_gt, 2, generator=generator) * IMAGE_SIZE * 0.3  # (M, 2)
    gt_boxes = torch.cat([corner, (corner + size).clamp(max=IMAGE_SIZE)], dim=1)  # (M, 4)
    labels = torch.randint(0, NUM_CLASSES, (num_gt,), generator=generator)  # (M,)
    return logits, pred_boxes, gt_boxes, labels


def time_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        samples.append((time.thread_time() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per cell (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # scipy's solver is single-threaded: compare like with like
    generator = torch.Generator().manual_seed(0)
    assigners = {mode: MinCostAssigner(mode=mode) for mode in ("min", "hungarian")}

    rows = []
    for num_gt in GT_COUNTS:
        logits, boxes, gt_boxes, labels = make_inputs(num_gt, generator)
        size = (IMAGE_SIZE, IMAGE_SIZE)
        build = assigners["min"].cost_matrix  # the same code for both modes
        cost = build(logits, boxes, gt_boxes, labels, size)  # (M, R)
        # Interleave the two modes so machine load affects both alike.
        cost_ms, assign_ms = [], {"min": [], "hungarian": []}
        for _ in range(3):
            cost_ms.append(time_ms(lambda: build(logits, boxes, gt_boxes, labels, size), max(1, args.repeats // 3)))
            for mode, assigner in assigners.items():
                assign_ms[mode].append(time_ms(lambda a=assigner: a.solve(cost), max(1, args.repeats // 3)))
        row = {"gt": num_gt, "cost_ms": statistics.median(cost_ms)}
        for mode in assigners:
            row[f"{mode}_ms"] = statistics.median(assign_ms[mode])
            row[f"{mode}_call_ms"] = row["cost_ms"] + row[f"{mode}_ms"]
        row["speedup"] = row["hungarian_ms"] / row["min_ms"]
        row["call_speedup"] = row["hungarian_call_ms"] / row["min_call_ms"]
        rows.append(row)

    print(f"MinCostAssigner on a {MAP_SIZE}x{MAP_SIZE} stride-{STRIDE} map (R={MAP_SIZE * MAP_SIZE}), "
          f"{NUM_CLASSES} classes, 1 thread, thread CPU time, median of {args.repeats}")
    print(f"{'':>4} | {'assignment on the same cost matrix, ms/img':^44} || "
          f"{'whole call = cost matrix + assignment':^42}")
    print(f"{'GTs':>4} | {'min (ours)':>12} | {'hungarian (peer)':>16} | {'speed-up':>8} || "
          f"{'cost matrix':>11} | {'min':>7} | {'hungarian':>9} | {'speed-up':>8}")
    print("-" * 100)
    for r in rows:
        print(f"{r['gt']:>4} | {r['min_ms']:>12.3f} | {r['hungarian_ms']:>16.2f} | {r['speedup']:>7.0f}x || "
              f"{r['cost_ms']:>11.2f} | {r['min_call_ms']:>7.2f} | {r['hungarian_call_ms']:>9.2f} | "
              f"{r['call_speedup']:>7.2f}x")
    print("(ours: mode='min', OneNet's per-ground-truth argmin; peer: mode='hungarian', "
          "scipy.optimize.linear_sum_assignment; the cost matrix is the same code for both)")
    headline = {
        "benchmark": "assigners",
        "locations": MAP_SIZE * MAP_SIZE,
        "classes": NUM_CLASSES,
        "threads": 1,
        **{f"min_assign_ms_{r['gt']}gt": round(r["min_ms"], 4) for r in rows},
        **{f"hungarian_assign_ms_{r['gt']}gt": round(r["hungarian_ms"], 3) for r in rows},
        **{f"min_vs_hungarian_speedup_{r['gt']}gt": round(r["speedup"], 1) for r in rows},
        **{f"cost_matrix_ms_{r['gt']}gt": round(r["cost_ms"], 2) for r in rows},
        **{f"whole_call_speedup_{r['gt']}gt": round(r["call_speedup"], 2) for r in rows},
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
