"""No neck: for trunks that already end in the maps the heads read (the stacked hourglass)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class NoNeck(nn.Module):
    """Passes the backbone's maps through (one per hourglass stack); no settings."""

    in_strides = (4,)
    out_strides = (4,)

    def __init__(self, in_channels: int | Sequence[int]) -> None:
        super().__init__()
        self.out_channels = [in_channels] if isinstance(in_channels, int) else list(in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return features


class NoNeckStride8(NoNeck):
    """:class:`NoNeck` for trunks that end at stride 8 (Hourglass-Squeeze)."""

    in_strides = (8,)
    out_strides = (8,)
