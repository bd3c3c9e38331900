"""Backbones: trunks that return feature maps at the strides their neck asks for."""

from anchorless.detectors.backbones.hourglass import HOURGLASS_DEPTHS, Hourglass, HourglassModule
from anchorless.detectors.backbones.hourglass54 import Hourglass54
from anchorless.detectors.backbones.hourglass_squeeze import HourglassSqueeze
from anchorless.detectors.backbones.keypoint import KeypointBackbone
from anchorless.detectors.backbones.resnet import ResNetBackbone, load_backbone_weights

__all__ = [
    "HOURGLASS_DEPTHS",
    "Hourglass",
    "Hourglass54",
    "HourglassModule",
    "HourglassSqueeze",
    "KeypointBackbone",
    "ResNetBackbone",
    "load_backbone_weights",
]
