"""Layers the networks share: normalisation by name, deformable convolution, the dense
heads' conv towers, corner / centre pooling, the fire module, and the inference-only folding of BatchNorm into convolutions."""

from anchorless.detectors.layers.corner_pool import (
    CascadeCornerPooling,
    CenterPooling,
    CornerPooling,
    corner_pool,
)
from anchorless.detectors.layers.deform_conv import ModulatedDeformConv3x3
from anchorless.detectors.layers.fire import FireModule
from anchorless.detectors.layers.fusion import count_batchnorms, fold_batchnorm
from anchorless.detectors.layers.norm import norm_layer
from anchorless.detectors.layers.tower import TowerHead, conv_tower, init_dense_head, prior_logit

__all__ = [
    "CascadeCornerPooling",
    "CenterPooling",
    "CornerPooling",
    "FireModule",
    "ModulatedDeformConv3x3",
    "TowerHead",
    "conv_tower",
    "corner_pool",
    "count_batchnorms",
    "fold_batchnorm",
    "init_dense_head",
    "norm_layer",
    "prior_logit",
]
