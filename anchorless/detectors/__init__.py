"""Detectors: pure PyTorch models, label assigners, losses, post-processing and
evaluation helpers for anchor-free, NMS-free object detection (OneNet, CenterNet,
FCOS and their kin). Everything here runs and is tested with plain PyTorch,
torchvision, scipy and pycocotools; nothing here imports ray, deepspeed or mlflow,
so a detector can be trained in a notebook as well as on the cluster. The platform
builds a detector from a plain config dict with :func:`build_detector`.
"""

from anchorless.detectors.base import BaseDetector, DetectorConfigError, reduce_normalizer
from anchorless.detectors.registry import (
    DETECTORS,
    build_detector,
    default_detector_config,
    resolve_detector_config,
)

__all__ = [
    "DETECTORS",
    "BaseDetector",
    "DetectorConfigError",
    "build_detector",
    "default_detector_config",
    "reduce_normalizer",
    "resolve_detector_config",
]
