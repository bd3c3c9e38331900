"""Backbones: trunks that return feature maps at the strides their neck asks for."""

from anchorless.detectors.backbones.resnet import ResNetBackbone, load_backbone_weights

__all__ = ["ResNetBackbone", "load_backbone_weights"]
