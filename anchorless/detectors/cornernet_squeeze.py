"""CornerNet-Squeeze (Law et al., "CornerNet-Lite: Efficient Keypoint-Based Object
Detection", BMVC 2020): CornerNet made cheap per pixel, for real-time detection.

The heads, corner pooling, targets, losses, pairing and Soft-NMS are CornerNet's
(:mod:`~anchorless.detectors.cornernet`); what changes is the cost of every pixel:

- the trunk is Hourglass-Squeeze (:class:`~anchorless.detectors.backbones.HourglassSqueeze`):
  fire modules, a stride-8 stem, four levels per module, transposed-convolution upsampling;
- the heads read stride-8 maps (64 x 64 at the paper's 511 input), a quarter of CornerNet's;
- every prediction branch starts with a 1x1 convolution instead of a 3x3.

Decoding follows the official Squeeze test settings: the top 20 corners of each kind, the
best 100 pairs, then Gaussian Soft-NMS.

Shapes as :mod:`~anchorless.detectors.cornernet`, with H x W the stride-8 map.
"""

from __future__ import annotations

from typing import Any, ClassVar

from anchorless.detectors.backbones import HourglassSqueeze
from anchorless.detectors.backbones.hourglass_squeeze import SQUEEZE_STRIDE
from anchorless.detectors.cornernet import CornerNet
from anchorless.detectors.necks import NoNeckStride8
from anchorless.detectors.registry import register


@register("cornernet_squeeze")
class CornerNetSqueeze(CornerNet):
    """CornerNet on Hourglass-Squeeze with 1x1 prediction branches, decoding at stride 8."""

    components = {**CornerNet.components, "backbone": HourglassSqueeze, "neck": NoNeckStride8}
    defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "head": {"branch_kernel": 1},
        "postprocess": {"corner_topk": 20, "candidates": 100},  # the official CornerNet_Squeeze.json
    }
    stride = SQUEEZE_STRIDE
