"""Deployment speed: our detectors as served by torch (eager, BatchNorm folded) vs the same
models exported as one ONNX graph and run by onnxruntime, and by OpenVINO where the graph
converts, with torchvision's ``fcos_resnet50_fpn`` in torch eager beside as the peer; then
the latency of one HTTP request to the model server, in its torch and its ONNX format.

Models: OneNet-R18, CenterNet-R18 and FCOS-R50, 80 classes, **randomly initialised** (no
weights are downloaded; speed does not depend on the weights' values, but post-processing
does: with random weights few candidates pass the default score thresholds, so this is the
network's cost; ``--loaded`` sets every threshold to 0, the worst case of decoding and NMS).
Our FCOS-R50 uses BatchNorm like torchvision's ``weights=None`` build, so it folds; its head's
GroupNorm cannot. torchvision's model is built with ``min_size = max_size`` = the input size,
so its transform does not resize.

Every runtime gets the same inputs: one random uint8 batch per (size, batch), letterboxed
already (square), as float32 in 0-255 (ours divide by 255 inside, torchvision gets
``images / 255`` as a list). torch eager is what ``anchorless models serve`` runs
(``model.predict``); the ONNX graph is what ``anchorless export`` writes (the same export
function, parity-checked against torch on random images before it is timed); OpenVINO
compiles that graph for its CPU device in float32.

Throughput is measured on one thread per runtime (torch ``set_num_threads(1)``,
onnxruntime ``intra_op_num_threads=1``, OpenVINO ``INFERENCE_NUM_THREADS=1``) and timed
in CPU time of this process (``time.process_time``: the load of other jobs on a shared
machine does not enter); runtimes are interleaved round by round and the median round
reported. With ``--threads N`` > 1, wall-clock time instead.

The server section (skip with ``--no-serve``) registers a random OneNet-R18 in a throw-away
MLflow store, exports its ONNX graph beside it, starts ``anchorless models serve`` on a
loopback port in each format (each server with its runtime's default threads) and times
``--requests`` sequential POSTs of one 640x480 JPEG from one client: p50 and p95 ms.

    .venv/bin/python bench/export.py                 # 416 and 512 px, batch 1 and 8, 200 requests
    .venv/bin/python bench/export.py --quick         # smoke test: 256 px, batch 1 and 2, 20 requests

Prints a table per (size, batch) with the ratios, the server's latencies, then one JSON
line: every figure, plus the headline ratios at the largest size and batch 1,
``"onnx_vs_eager_onenet_b1"`` and ``"best_fcos_vs_torchvision"``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torchvision.models.detection import fcos_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from anchorless.detectors import build_detector  # noqa: E402
from anchorless.detectors.layers import fold_batchnorm  # noqa: E402
from anchorless.platform.models.export import ModelError  # noqa: E402
from anchorless.platform.models.onnx import DetectionGraph, check_batch, export_onnx, torch_detections  # noqa: E402
from anchorless.platform.models.onnx_runtime import onnxruntime_session, run_onnx  # noqa: E402
from anchorless.platform.models.openvino import compile_cpu, export_openvino, run_openvino  # noqa: E402
from common import CATEGORIES_80, random_photo, register_random_detector  # noqa: E402

OURS = {
    "OneNet-R18": {"name": "onenet"},
    "CenterNet-R18": {"name": "centernet"},
    "FCOS-R50": {"name": "fcos", "backbone": {"depth": 50, "norm": "bn"}},
}
PEER = "torchvision FCOS-R50"
RUNTIMES = ("eager", "onnxruntime", "openvino")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="416,512", help="square input sizes, multiples of 32 (default 416,512)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per setting (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="threads per runtime (default 1; >1 times wall clock)")
    parser.add_argument("--loaded", action="store_true", help="every score threshold 0: the worst case of post-processing")
    parser.add_argument("--requests", type=int, default=200, help="timed HTTP requests per server format")
    parser.add_argument("--no-serve", action="store_true", help="skip the HTTP server latency")
    parser.add_argument("--quick", action="store_true", help="smoke test: 256 px, batch 1 and 2, 2 rounds, 20 requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.repeats, args.requests = "256", "1,2", 2, 20
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


# --- building every runtime of every model, at one size -----------------------------------------


def build_runtimes(size: int, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> run(images float32 (B, 3, S, S) in 0-255), and name -> why a runtime is missing."""
    runs: dict[str, Callable[[np.ndarray], Any]] = {}
    missing: dict[str, str] = {}
    threshold = {"score_threshold": 0.0} if args.loaded else {}
    generator = torch.Generator().manual_seed(size)
    check_images = [torch.randint(0, 256, (3, size * 3 // 4, size), dtype=torch.uint8, generator=generator) for _ in range(2)]
    for label, cfg in OURS.items():
        torch.manual_seed(0)
        model = fold_batchnorm(build_detector({**cfg, "num_classes": 80, "postprocess": threshold}).eval())
        runs[f"{label} eager"] = _eager(model)
        meta = {"config": {"detector": model.config, "data": {"image_size": size}}, "categories": CATEGORIES_80,
                "image_size": size, "manifest_sha256": None}  # fmt: skip
        out = workdir / f"{cfg['name']}-{size}"
        out.mkdir()
        started = time.perf_counter()
        onnx_path = export_onnx(model, meta, out, check_images)  # parity-checked against torch
        print(f"  {label} {size} px: ONNX export + check {time.perf_counter() - started:.0f} s", flush=True)
        session = onnxruntime_session(onnx_path, threads=args.threads)
        runs[f"{label} onnxruntime"] = lambda x, session=session: run_onnx(session, x)
        try:
            batch = check_batch(check_images, size)
            reference = torch_detections(DetectionGraph(model).eval(), batch)
            ir = export_openvino(onnx_path, meta, out, batch.numpy(), reference)  # parity-checked too
            compiled = compile_cpu(ir, threads=args.threads)
            runs[f"{label} openvino"] = lambda x, compiled=compiled: run_openvino(compiled, x)
        except ModelError as exc:  # say plainly which model OpenVINO could not take, and go on
            missing[f"{label} openvino"] = str(exc)
            print(f"  {label} {size} px: no OpenVINO row: {exc}", flush=True)
    peer = fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=80, min_size=size, max_size=size,
        **({"score_thresh": 0.0} if args.loaded else {}),
    ).eval()  # fmt: skip
    runs[PEER + " eager"] = _eager(peer, as_list=True)
    return runs, missing


def _eager(model: torch.nn.Module, *, as_list: bool = False) -> Callable[[np.ndarray], Any]:
    def run(images: np.ndarray):
        with torch.inference_mode():
            batch = torch.from_numpy(images).div_(255.0)
            return model(list(batch)) if as_list else model.predict(batch)

    return run


def measure(runs: dict[str, Callable], images: np.ndarray, repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Images/s per runtime: every runtime once per round, rounds interleaved, the median round."""
    for run in runs.values():
        run(images.copy())  # warm-up: first-call allocations, OpenVINO's and onnxruntime's lazy set-up
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            batch = images.copy()  # eager divides in place
            start = clock()
            run(batch)
            seconds[name].append(clock() - start)
    return {name: len(images) / statistics.median(times) for name, times in seconds.items()}


# --- the HTTP server ---------------------------------------------------------------------------


def serve_latency(size: int, requests: int, workdir: Path) -> dict[str, dict[str, float]]:
    """p50/p95 ms of one request (one 640x480 JPEG), per server format, from one client."""
    from anchorless.platform.models.onnx import export_model
    from anchorless.platform.models.serving import post, request_body, start_server

    photo = random_photo(workdir / "photo.jpg", width=640, height=480)
    store, uri = register_random_detector(workdir / "registry", {"name": "onenet", "num_classes": 80}, size, "bench-onenet")
    export_model(uri, workdir / "deploy", tracking_uri=store, check_image_paths=[photo])
    body = request_body([photo])
    figures = {}
    for format in ("torch", "onnx"):
        with start_server(uri, tracking_uri=store, format=format, log_path=workdir / f"serve-{format}.log") as server:
            for _ in range(5):  # warm-up
                status, answer = post(server.url, body)
                if status != 200:
                    raise RuntimeError(f"the {format} server answered {status}: {answer}")
            latencies = []
            for _ in range(requests):
                start = time.perf_counter()
                status, _ = post(server.url, body)
                latencies.append((time.perf_counter() - start) * 1000)
                if status != 200:
                    raise RuntimeError(f"the {format} server answered {status}")
        figures[format] = {
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p95_ms": round(float(np.percentile(latencies, 95)), 2),
            "requests": requests,
        }
    return figures


# --- the report --------------------------------------------------------------------------------


def ratios(ips: dict[str, float]) -> dict[str, float | None]:
    """One setting's ratios: each exported runtime vs eager, per model, and our best FCOS vs the peer."""
    out: dict[str, float | None] = {}
    for label in OURS:
        key = label.split("-")[0].lower()
        eager = ips.get(f"{label} eager")
        for runtime in ("onnxruntime", "openvino"):
            name = "onnx" if runtime == "onnxruntime" else runtime
            value = ips.get(f"{label} {runtime}")
            out[f"{name}_vs_eager_{key}"] = round(value / eager, 3) if value and eager else None
    best = max(ips.get(f"FCOS-R50 {runtime}") or 0.0 for runtime in RUNTIMES)
    out["best_fcos_vs_torchvision"] = round(best / ips[PEER + " eager"], 3)
    return out


def print_table(size: int, batch: int, ips: dict[str, float], clock_name: str) -> None:
    print(f"\n{size} px, batch {batch}: images per {clock_name} second (x: vs the same model in torch eager)")
    print(f"{'model':<22} | {'torch eager':>11} | {'onnxruntime':>18} | {'OpenVINO':>18} | {'best vs tv FCOS':>15}")
    print("-" * 96)
    peer = ips[PEER + " eager"]
    for label in OURS:
        eager = ips[f"{label} eager"]
        cells = []
        for runtime in ("onnxruntime", "openvino"):
            value = ips.get(f"{label} {runtime}")
            cells.append(f"{value:>9.2f} ({value / eager:4.2f}x)" if value else f"{'-':>18}")
        best = max(ips.get(f"{label} {runtime}") or 0.0 for runtime in RUNTIMES)
        print(f"{label:<22} | {eager:>11.2f} | {cells[0]} | {cells[1]} | {best / peer:>14.2f}x")
    print(f"{PEER:<22} | {peer:>11.2f} | {'-':>18} | {'-':>18} | {1.0:>14.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    importlib.import_module("mlflow")  # it configures its loggers on import: quieten them after
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its table creation and validation notes
    torch.set_num_threads(args.threads)
    clock, clock_name = (time.process_time, "CPU") if args.threads == 1 else (time.perf_counter, "wall-clock")
    print(f"Export bench: sizes {args.sizes}, batches {args.batches}, {args.threads} thread(s) per runtime, "
          f"random weights{', loaded (thresholds 0)' if args.loaded else ''}, median of {args.repeats} rounds", flush=True)
    images_per_s: dict[str, dict[str, float]] = {}
    setting_ratios: dict[str, dict[str, float | None]] = {}
    missing: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="anchorless-bench-export-") as tmp:
        workdir = Path(tmp)
        for size in args.sizes:
            runs, absent = build_runtimes(size, args, workdir)
            missing.update(absent)
            for batch in args.batches:
                rng = np.random.default_rng(batch)
                images = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8).astype(np.float32)
                ips = measure(runs, images, args.repeats, clock)
                key = f"{size}_b{batch}"
                images_per_s[key] = {name: round(value, 3) for name, value in ips.items()}
                setting_ratios[key] = ratios(ips)
                print_table(size, batch, ips, clock_name)
        serving = None
        if not args.no_serve:
            serving = serve_latency(max(args.sizes), args.requests, workdir)
            print(f"\nHTTP server, OneNet-R18 at {max(args.sizes)} px, one 640x480 JPEG per request, "
                  f"{args.requests} sequential requests from one client on loopback")
            print(f"{'format':<8} | {'p50 ms':>8} | {'p95 ms':>8}")
            for format, row in serving.items():
                print(f"{format:<8} | {row['p50_ms']:>8.1f} | {row['p95_ms']:>8.1f}")
    headline = f"{max(args.sizes)}_b{min(args.batches)}"
    print(json.dumps({
        "benchmark": "export",
        "threads": args.threads,
        "loaded": args.loaded,
        "clock": clock_name,
        "images_per_s": images_per_s,
        "ratios": setting_ratios,
        "openvino_missing": missing,
        "serving": serving,
        "headline_setting": headline,
        "onnx_vs_eager_onenet_b1": setting_ratios[headline]["onnx_vs_eager_onenet"],
        "best_fcos_vs_torchvision": setting_ratios[headline]["best_fcos_vs_torchvision"],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
