"""Label assigners: which prediction (location) learns which ground-truth box.

Every assigner returns an :class:`AssignResult` (the positive pairs of one image) and runs
under ``torch.no_grad()``: matching picks targets, it is never differentiated. Boxes are
xyxy in input pixels.
"""

from anchorless.detectors.assigners.atss import ATSSAssigner
from anchorless.detectors.assigners.attention import SaccadeTarget, attention_targets, size_class
from anchorless.detectors.assigners.base import AssignResult
from anchorless.detectors.assigners.center_heatmap import CenterHeatmapTarget
from anchorless.detectors.assigners.corners import CornerTarget, CornerTargets, KeypointTargets
from anchorless.detectors.assigners.costs import BoxL1Cost, FocalClassCost, IoUCost
from anchorless.detectors.assigners.gaussian import draw_gaussians, gaussian_radius
from anchorless.detectors.assigners.min_cost import MinCostAssigner
from anchorless.detectors.assigners.point import PointAssigner
from anchorless.detectors.assigners.pyramid import PyramidAssigner

__all__ = [
    "ATSSAssigner",
    "AssignResult",
    "BoxL1Cost",
    "CenterHeatmapTarget",
    "CornerTarget",
    "CornerTargets",
    "FocalClassCost",
    "IoUCost",
    "KeypointTargets",
    "MinCostAssigner",
    "PointAssigner",
    "PyramidAssigner",
    "SaccadeTarget",
    "attention_targets",
    "draw_gaussians",
    "gaussian_radius",
    "size_class",
]
