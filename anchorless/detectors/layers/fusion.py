"""Inference-only folding of BatchNorm into the convolution in front of it.

In eval mode a BatchNorm (or a FrozenBatchNorm) is a fixed per-channel affine map, so it
can be folded into the weight and bias of the convolution that feeds it and then costs
nothing: one pass over every backbone feature map less per forward. torch provides the
arithmetic (``fuse_conv_bn_eval``); this module finds the pairs in our networks:

- torchvision's ResNet stem and blocks (``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3``,
  applied in that order in their forward) and the ``downsample`` ``Sequential(conv, bn)``;
- any ``nn.Sequential`` in which a ``Conv2d``/``ConvTranspose2d`` is directly followed by a
  BatchNorm (the upsampling neck).

GroupNorm normalises by statistics of the input itself and cannot be folded (FCOS's head).
The folded model is for inference only: its BatchNorms are gone, so it must not train.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)
_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
_RESNET_PARTS = (ResNet, BasicBlock, Bottleneck)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every foldable BatchNorm folded; ``model`` is untouched."""
    if model.training:
        raise ValueError("fold_batchnorm: the model is in training mode; BatchNorm folds only in eval mode")
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for module in list(folded.modules()):
            if isinstance(module, _RESNET_PARTS):
                for index in (1, 2, 3):
                    _fold_pair(module, f"conv{index}", f"bn{index}")
            if isinstance(module, nn.Sequential):
                names = list(module._modules)
                for conv_name, norm_name in zip(names, names[1:]):
                    _fold_pair(module, conv_name, norm_name)
    return folded


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(module, _NORMS) for module in model.modules())


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> None:
    conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
    if not isinstance(conv, _CONVS) or not isinstance(norm, _NORMS):
        return
    if isinstance(conv, nn.ConvTranspose2d) and conv.groups != 1:
        return  # torch folds a transposed conv's output channels assuming one group
    setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose2d)))
    setattr(parent, norm_name, nn.Identity())
