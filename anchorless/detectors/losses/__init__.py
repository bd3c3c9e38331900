"""Losses: each formula is a plain function on tensors, each module adds only a
``weight`` and takes the normaliser (number of positives etc.) as an argument, and
returns ``weight * sum(loss) / normalizer`` (:func:`weighted_sum`)."""

from anchorless.detectors.losses.base import Normalizer, weighted_sum
from anchorless.detectors.losses.centerness import CenternessLoss, centerness_target
from anchorless.detectors.losses.embedding import EmbeddingLoss, pull_push_loss
from anchorless.detectors.losses.focal import FocalLoss, GaussianFocalLoss, penalty_reduced_focal_loss
from anchorless.detectors.losses.gfocal import (
    DistributionFocalLoss,
    QualityFocalLoss,
    distribution_focal_loss,
    quality_focal_loss,
)
from anchorless.detectors.losses.iou import (
    IOU_KINDS,
    IoUKind,
    IoULoss,
    elementwise_iou,
    iou_loss,
    pairwise_iou_similarity,
)
from anchorless.detectors.losses.l1 import L1Loss

__all__ = [
    "IOU_KINDS",
    "CenternessLoss",
    "DistributionFocalLoss",
    "EmbeddingLoss",
    "FocalLoss",
    "GaussianFocalLoss",
    "IoUKind",
    "IoULoss",
    "L1Loss",
    "Normalizer",
    "QualityFocalLoss",
    "centerness_target",
    "distribution_focal_loss",
    "elementwise_iou",
    "iou_loss",
    "pairwise_iou_similarity",
    "penalty_reduced_focal_loss",
    "pull_push_loss",
    "quality_focal_loss",
    "weighted_sum",
]
