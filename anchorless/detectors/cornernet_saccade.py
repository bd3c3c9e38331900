"""CornerNet-Saccade (Law et al., "CornerNet-Lite: Efficient Keypoint-Based Object
Detection", BMVC 2020): CornerNet that looks first, then zooms into a few crops, so it
processes far fewer pixels than CornerNet on the whole image.

The network is CornerNet's heads (corner pooling, heatmaps, embeddings, offsets, every stack
supervised) on Hourglass-54 (:class:`~anchorless.detectors.backbones.Hourglass54`), plus,
per stack, three attention maps predicted from the hourglass's upsampling maps at strides
4, 8 and 16 (small objects from the finest): each a 3x3 conv-ReLU, then a 1x1 conv and a
sigmoid. Their targets are a 1 at the centre cell of each object of their size class
(:mod:`~anchorless.detectors.assigners.attention`) and they learn by a focal loss
(exponent 2) beside the corner losses.

Training is CornerNet's on crops around objects: the data pipeline's ``object_crop``
augmentation cuts them, the loop is the ordinary one. Inference has two steps
(:mod:`~anchorless.detectors.postprocess.saccade`): attention maps and coarse boxes on
downsized views of the image, then the corner heads on up to ``k_max`` zoomed crops, merged
by Soft-NMS. The crops depend on the image, so there is no fixed-shape (exportable) form.

Shapes: B images, C classes, S stacks; V views, N crops; h x w an attention map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from anchorless.detectors.assigners.attention import SaccadeTarget
from anchorless.detectors.backbones import Hourglass54
from anchorless.detectors.base import Detections, reduce_normalizer
from anchorless.detectors.cornernet import PROB_EPS, CornerNet, CornerNetHead, CornerNetLoss, prediction_branch
from anchorless.detectors.losses import GaussianFocalLoss
from anchorless.detectors.postprocess.saccade import Locations, SaccadePostprocess, view_locations, zoom_crops
from anchorless.detectors.registry import register


class SaccadeHead(CornerNetHead):
    """CornerNet's head per stack, plus three attention branches per stack, each a 3x3 conv
    (with bias) + ReLU + 1x1 conv on one upsampling level (small, medium, large objects).

    Args:
        in_channels, num_classes, num_stacks, level_channels: set by the detector.
        attention_channels: hidden width of each attention branch (256, the official code).
        (channels, pool_channels, heatmap_bias, branch_kernel as :class:`CornerNetHead`;
        the attention logits start at ``heatmap_bias`` too, as the official code.)
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_stacks: int = 1,
        level_channels: Sequence[int] = (256, 384, 384),
        *,
        channels: int = 256,
        pool_channels: int = 128,
        heatmap_bias: float = -2.19,
        branch_kernel: int = 3,
        attention_channels: int = 256,
    ) -> None:
        super().__init__(
            in_channels, num_classes, num_stacks, channels=channels, pool_channels=pool_channels,
            heatmap_bias=heatmap_bias, branch_kernel=branch_kernel,
        )  # fmt: skip
        self.attention = nn.ModuleList(
            nn.ModuleList(prediction_branch(width, attention_channels, 1) for width in level_channels)
            for _ in range(num_stacks)
        )
        for branch in self.attention.modules():
            if isinstance(branch, nn.Sequential):
                nn.init.constant_(branch[-1].bias, heatmap_bias)

    def forward_attention(self, levels: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Per stack given (the last ones), the attention logits (B, 1, h, w), small to large."""
        stacks = self.attention[len(self.attention) - len(levels) :]
        return [[branch(level) for branch, level in zip(branches, maps)] for branches, maps in zip(stacks, levels)]


class SaccadeLoss(CornerNetLoss):
    """CornerNet's losses plus the attention maps' focal loss, every term averaged over the stacks.

    Args:
        attention: weight of the attention maps' focal loss (1; the official code divides
            it by the stacks twice, an effective 1/3 with three stacks).
        attention_alpha: its focusing exponent (2).
        (heatmap, pull, push, offset, alpha, beta, margin as :class:`CornerNetLoss`.)
    """

    def __init__(self, *, attention: float = 1.0, attention_alpha: float = 2.0, **corner_losses: Any) -> None:
        super().__init__(**corner_losses)
        # On 0/1 targets the penalty reduction (1 - y)^beta is 1 everywhere: the plain focal loss.
        self.attention_loss = GaussianFocalLoss(weight=attention, alpha=attention_alpha)


@register("cornernet_saccade")
class CornerNetSaccade(CornerNet):
    """CornerNet-Saccade: Hourglass-54, CornerNet's heads, attention maps; two-step inference."""

    components = {
        **CornerNet.components,
        "backbone": Hourglass54,
        "head": SaccadeHead,
        "assigner": SaccadeTarget,
        "loss": SaccadeLoss,
        "postprocess": SaccadePostprocess,
    }

    @classmethod
    def head_inputs(cls, neck: nn.Module, num_classes: int) -> tuple[Any, ...]:
        widths = neck.out_channels[0]  # the map's width, then the attention levels', small to large
        return widths[0], num_classes, len(neck.out_channels), tuple(widths[1:])

    def forward_head(self, features: list[list[torch.Tensor]]) -> dict[str, Any]:
        # Every stack learns; only the last predicts, as CornerNet.
        used = features if self.training else features[-1:]
        return {
            "stacks": self.head([maps[0] for maps in used]),
            "attention": self.head.forward_attention([maps[1:] for maps in used]),
        }

    # ------------------------------------------------------------------ training
    def losses(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        losses = super().losses(outputs, targets, image_size)
        stacks = outputs["attention"]  # S lists of (B, 1, h, w) logits, small to large
        sizes = [tuple(level.shape[-2:]) for level in stacks[0]]
        wanted = [self.assigner.attention(t["boxes"], sizes, self.backbone.level_strides, image_size) for t in targets]
        total = 0.0
        for level in range(len(sizes)):
            target = torch.stack([maps[level] for maps in wanted])[:, None]  # (B, 1, h, w)
            num_objects = reduce_normalizer(target.sum(), target.device)
            for attention in stacks:
                prob = attention[level].sigmoid().clamp(PROB_EPS, 1 - PROB_EPS)
                total = total + self.loss.attention_loss(prob, target, num_objects)
        return {**losses, "loss_attention": total / len(stacks)}

    # ------------------------------------------------------------------ inference
    def forward(
        self, images: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | Detections:
        if targets is not None:
            return super().forward(images, targets)
        return self.detect(images)

    def detect(self, images: torch.Tensor) -> Detections:
        """The two steps (see the module docstring) for (B, 3, H, W) images in [0, 1]."""
        image_size = self._check_images(images)
        post: SaccadePostprocess = self.postprocess
        side = post.canvas_side(self.size_divisor)
        views = view_locations(images.shape[0], image_size, post.init_sizes, images.device)
        view_outputs, view_origins = self.look(images, views, side)
        coarse = post.crop_detections(view_outputs, views, view_origins, image_size, self.stride)
        crops = post.next_locations(
            view_outputs["attention"], self.backbone.level_strides, views, view_origins, coarse, image_size
        )
        if len(crops.image):
            crop_outputs, crop_origins = self.look(images, crops, side)
            fine = post.crop_detections(crop_outputs, crops, crop_origins, image_size, self.stride)
        else:  # nothing worth a closer look: the views' boxes alone
            fine = coarse._replace(valid=torch.zeros_like(coarse.valid))
            crops = views
        return post.merge(images.shape[0], coarse, views, fine, crops)

    def look(self, images: torch.Tensor, where: Locations, side: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The last stack's outputs on the ``side``-wide crops at ``where`` (heatmaps and
        attention as probabilities) and the crops' origins. Outside the image a crop holds
        the mean pixel, which normalises to zero."""
        crops, origins = zoom_crops(images, where, side, fill=self.pixel_mean)  # (N, 3, S, S)
        _, outputs = self._network(crops)
        with torch.autocast(images.device.type, enabled=False):
            probabilities = self.probabilities(outputs)
            probabilities["attention"] = [level.sigmoid() for level in outputs["attention"][-1]]
        return probabilities, origins

    def inference(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> Detections:
        raise NotImplementedError("cornernet_saccade detects from the images (two steps): call predict(images)")

    def predict_padded(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            "cornernet_saccade has no fixed-shape form, so it cannot be exported: its second step crops a number "
            "of locations that depends on the image (attention peaks and coarse boxes, up to k_max); export "
            "cornernet_squeeze or cornernet instead"
        )
