"""Normalisation layers by config name, for every backbone and neck."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def norm_layer(norm: str, num_groups: int = 32) -> Callable[[int], nn.Module]:
    """A ``norm_layer(num_channels)`` factory (the form torchvision's ResNet takes).

    "bn": BatchNorm; "frozen_bn": torchvision's FrozenBatchNorm2d (fixed statistics and
    affine terms); "gn": GroupNorm with ``num_groups`` groups.
    """
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "gn":
        return partial(nn.GroupNorm, num_groups)
    raise ValueError(f"unknown norm {norm!r}; expected one of bn, frozen_bn, gn")
