"""Necks: turn a backbone's maps into the maps a head reads (one stride-4 map, or a pyramid)."""

from anchorless.detectors.necks.deconv import DeconvUpsampler
from anchorless.detectors.necks.fpn import FPN
from anchorless.detectors.necks.identity import NoNeck, NoNeckStride8

__all__ = ["FPN", "DeconvUpsampler", "NoNeck", "NoNeckStride8"]
