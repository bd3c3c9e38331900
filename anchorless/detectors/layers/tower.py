"""The conv towers of the dense pyramid heads (FCOS, GFL) and their initialisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def conv_tower(channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x (3x3 conv + GroupNorm(32) + ReLU), as FCOS, ATSS and GFL stack them."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.GroupNorm(32, channels), nn.ReLU()]
    return nn.Sequential(*layers)


def prior_logit(prior_prob: float) -> float:
    """The classifier bias that starts every class at ``prior_prob`` (the focal-loss prior)."""
    return -math.log((1 - prior_prob) / prior_prob)


def init_dense_head(head: nn.Module, classifier: nn.Conv2d, prior_prob: float) -> None:
    """Every conv of ``head``: normal(std 0.01) weights, zero biases (the official FCOS, ATSS
    and GFL initialisation); the classifier's bias starts every class at ``prior_prob``."""
    for module in head.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)
    nn.init.constant_(classifier.bias, prior_logit(prior_prob))


class TowerHead(nn.Module):
    """What the pyramid heads share (FCOS, GFL): a classification and a regression tower used
    by every level, class logits on the first, a learnable scale per level for the
    regression. A subclass adds its regression outputs, then calls :func:`init_dense_head`.

    Args:
        in_channels, num_classes, strides: set by the detector.
        num_convs: depth of each tower.
    """

    def __init__(self, in_channels: int, num_classes: int, strides: Sequence[int], num_convs: int) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.cls_tower = conv_tower(in_channels, num_convs)
        self.reg_tower = conv_tower(in_channels, num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))  # (L,)
