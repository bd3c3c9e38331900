"""ResNet backbones (torchvision) returning feature maps at the strides a neck asks for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50

from anchorless.detectors.layers.norm import norm_layer

_RESNETS = {18: resnet18, 34: resnet34, 50: resnet50}
# Output stride of each stage: C2 (layer1) .. C5 (layer4).
_STAGE_STRIDES = {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights for a torchvision ResNet from a local file (never downloads).

    Accepts a torchvision state dict, optionally wrapped in {"state_dict": ...} or
    {"model": ...}; the classifier (`fc.*`) is ignored. Any other missing or unexpected
    key is an error, so a checkpoint for another depth or norm fails loudly.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained: no such file {str(path)!r} (weights are never downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"pretrained: {path} does not fit this backbone: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )


class ResNetBackbone(nn.Module):
    """torchvision ResNet-18/34/50 trunk returning C2..C5 maps at the requested strides.

    Args:
        out_strides: strides of the maps to return, any of 4, 8, 16, 32 (set by the neck).
        depth: 18, 34 or 50.
        norm: "bn" (BatchNorm), "frozen_bn" (torchvision FrozenBatchNorm2d, the usual choice
            with ImageNet weights and small per-GPU batches) or "gn" (GroupNorm, 32 groups).
        pretrained: path to a local torchvision ResNet state dict, or None for random init.
        frozen_stages: how many leading stages get no gradient: 0 none, 1 the stem,
            2 the stem and C2 (detectron2's FREEZE_AT=2, the official FCOS setting), ... 5 all.
    """

    def __init__(
        self,
        out_strides: Sequence[int] = (8, 16, 32),
        *,
        depth: Literal[18, 34, 50] = 50,
        norm: Literal["bn", "frozen_bn", "gn"] = "frozen_bn",
        pretrained: str | None = None,
        frozen_stages: int = 0,
    ) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"depth must be one of 18, 34, 50, got {depth}")
        unknown = [s for s in out_strides if s not in _STAGE_STRIDES]
        if unknown:
            raise ValueError(f"out_strides {unknown} not available; expected a subset of 4, 8, 16, 32")
        if not 0 <= frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in 0..5, got {frozen_stages}")
        trunk = _RESNETS[depth](weights=None, norm_layer=norm_layer(norm))
        if pretrained is not None:
            load_backbone_weights(trunk, pretrained)
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.out_strides = tuple(out_strides)
        expansion = 4 if depth == 50 else 1
        widths = {4: 64 * expansion, 8: 128 * expansion, 16: 256 * expansion, 32: 512 * expansion}
        self.out_channels = [widths[s] for s in self.out_strides]
        frozen = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4][:frozen_stages]
        for module in frozen:
            module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stride, name in _STAGE_STRIDES.items():
            x = getattr(self, name)(x)
            if stride in self.out_strides:
                outputs.append(x)
            if stride >= max(self.out_strides):
                break
        return outputs
