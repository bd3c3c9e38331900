"""Layers the networks share: normalisation by name, deformable convolution, and the
inference-only folding of BatchNorm into convolutions."""

from anchorless.detectors.layers.deform_conv import ModulatedDeformConv3x3
from anchorless.detectors.layers.fusion import count_batchnorms, fold_batchnorm
from anchorless.detectors.layers.norm import norm_layer

__all__ = ["ModulatedDeformConv3x3", "count_batchnorms", "fold_batchnorm", "norm_layer"]
