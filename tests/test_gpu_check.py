"""bench/gpu_check.py, the check a GPU machine runs, smoke-run on the CPU so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from anchorless.detectors import DETECTORS

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_every_detector_fits_a_batch_and_predicts_on_the_cpu_beside_the_peer():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "8", "--image-size", "96",
         "--train-batch", "2", "--infer-batches", "1,2", "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}
    assert set(report["detectors"]) == {*DETECTORS, "torchvision_fcos_r50"}
    for name, row in report["detectors"].items():  # each loss fell: "failed" names any that did not
        assert row["train_images_per_s"] > 0 and row["infer_b1_images_per_s"] > 0 and row["infer_b2_images_per_s"] > 0
        if name in DETECTORS:
            assert row["infer_b1_vs_peer"] > 0  # ratios against the peer measured in the same run
