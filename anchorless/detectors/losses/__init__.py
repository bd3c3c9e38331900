"""Losses: each formula is a plain function on tensors, each module adds only a
``weight`` and takes the normaliser (number of positives etc.) as an argument, and
returns ``weight * sum(loss) / normalizer`` (:func:`weighted_sum`)."""

from anchorless.detectors.losses.base import Normalizer, weighted_sum
from anchorless.detectors.losses.centerness import CenternessLoss, centerness_target
from anchorless.detectors.losses.focal import FocalLoss, GaussianFocalLoss, penalty_reduced_focal_loss
from anchorless.detectors.losses.iou import IoULoss
from anchorless.detectors.losses.l1 import L1Loss

__all__ = [
    "CenternessLoss",
    "FocalLoss",
    "GaussianFocalLoss",
    "IoULoss",
    "L1Loss",
    "Normalizer",
    "centerness_target",
    "penalty_reduced_focal_loss",
    "weighted_sum",
]
