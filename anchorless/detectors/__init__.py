"""Detectors: pure PyTorch models for anchor-free, NMS-free object detection (OneNet,
CenterNet, FCOS, GFL, CornerNet and their kin), one file per detector over shared parts in
``backbones/``, ``necks/``, ``layers/``, ``assigners/``, ``losses/`` and ``postprocess/``.

Everything here runs and is tested with plain PyTorch, torchvision and scipy; nothing here
imports ray, deepspeed or mlflow, so a detector can be trained in a notebook as well as on
the cluster. The platform builds a detector from a plain config dict with
:func:`build_detector`; a detector module registers its class with ``@register(name)``.
"""

from anchorless.detectors.base import BaseDetector, DetectorConfigError, reduce_normalizer
from anchorless.detectors.layers import corner_pool
from anchorless.detectors.postprocess import soft_nms
from anchorless.detectors.registry import (
    DETECTORS,
    build_detector,
    default_detector_config,
    register,
    resolve_detector_config,
)

# Each detector module registers its class when imported; a new detector file joins this line.
from anchorless.detectors import centernet, centernet_triplets, cornernet, cornernet_saccade, cornernet_squeeze, fcos, gfl, onenet  # noqa: E402, F401  isort: skip

__all__ = [
    "DETECTORS",
    "BaseDetector",
    "DetectorConfigError",
    "build_detector",
    "corner_pool",
    "default_detector_config",
    "reduce_normalizer",
    "register",
    "resolve_detector_config",
    "soft_nms",
]
