"""OneNet (Sun et al., ICML 2021): end-to-end one-stage detection by minimum-cost assignment.

A stride-4 map (ResNet + deconvolution upsampler, as CenterNet) predicts at every location
class logits and a box ``location -/+ ReLU(l, t, r, b)``. Each ground truth is matched to
the single location of minimum cost (classification + L1 + GIoU, the same terms and
weights as the loss), so classification learns one positive per object and inference is
top-100 without NMS.

Optionally (``head.one_to_many_topk`` > 0) a second, training-only classifier learns from
a one-to-many assignment on the same cost (each object's k cheapest locations inside it),
as DeFCN's auxiliary loss and YOLOv10's dual assignments do: the backbone, the neck and
(by default) the box regression see k times the positives, which speeds up learning from
scratch, while inference still reads the one-to-one head alone, top-k with no NMS.

``onenet_fpn`` is the paper's FCOS-head variant: FPN P3-P7, FCOS's shared towers, box sides
regressed in strides (ReLU(scale_l * x) * stride_l), and the same minimum-cost match over
the locations of every level at once, so an object is matched on the level whose box fits
it best instead of on a stride-4 cell that must see all of it.

Shapes: B images, C classes, H x W the stride-4 map, R locations (H*W, or those of every
level), M ground truths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.ops import clip_boxes_to_image

from anchorless.detectors.assigners import AssignResult, MinCostAssigner
from anchorless.detectors.backbones import ResNetBackbone
from anchorless.detectors.base import Detections, PyramidDetector, SingleMapDetector, grid_points, reduce_normalizer
from anchorless.detectors.layers import TowerHead, init_dense_head, prior_logit
from anchorless.detectors.losses import FocalLoss, IoUKind, IoULoss, L1Loss
from anchorless.detectors.necks import FPN, DeconvUpsampler
from anchorless.detectors.postprocess import Postprocess, decode_ltrb, topk_dense
from anchorless.detectors.registry import register


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def _init_convs(module: nn.Module, classifier: nn.Conv2d, prior_prob: float) -> None:
    """Xavier weights and zero biases for every conv of ``module``; the classifier's bias
    starts every class at ``prior_prob`` (the focal-loss prior)."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
    nn.init.constant_(classifier.bias, prior_logit(prior_prob))


class OneNetHead(nn.Module):
    """Classification and ltrb regression at stride 4, optionally with multi-head training.

    Head k >= 1 (training only) sees F_k = ReLU(conv(concat(F_0, F_{k-1}))), F_0 being the
    neck output, and shares the prediction layers with head 0. Inference uses head 0 only,
    so extra heads cost nothing at test time.

    Args:
        in_channels, num_classes: set by the detector.
        prior_prob: initial foreground probability of the classifier (0.01).
        num_heads: 1 (plain OneNet) or more for multi-head training.
        ltrb_init: initial bias of the ltrb regression, in pixels (4 = one stride). The
            official code keeps PyTorch's default bias (about 0), so about half of the
            ReLU'd box sides start at 0 with no gradient and only learn once matching moves
            elsewhere; starting every side alive halves the early box loss on our overfit test.
        ltrb_scale: pixels per unit of the regression output. The official stride-4 head
            regresses raw pixels (1); its FPN variant, like FCOS, multiplies by the stride.
            A conv must grow its output to ~30 for a 60 px object at scale 1, which from
            scratch takes hundreds of steps at a detection learning rate.
        one_to_many_topk: 0 (OneNet), or the positives per object of an auxiliary
            one-to-many head on the same neck output (training only).
        one_to_many_shares_boxes: True: the auxiliary head has its own classifier but
            learns its boxes through this head's regression, which then sees every
            one-to-many positive (k per object instead of one). Which location is positive
            differs between the two assignments; the box a location should predict does
            not, so sharing loses nothing (hybrid-matching DETRs share their decoder between
            the one-to-one and one-to-many groups likewise); it measured better on BCCD
            (BENCHMARKS.md). False: the auxiliary head regresses its own boxes (its own
            copy of this head).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        prior_prob: float = 0.01,
        num_heads: int = 1,
        ltrb_init: float = 4.0,
        ltrb_scale: float = 1.0,
        one_to_many_topk: int = 0,
        one_to_many_shares_boxes: bool = True,
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if one_to_many_topk < 0:
            raise ValueError(f"one_to_many_topk must be >= 0, got {one_to_many_topk}")
        if ltrb_scale <= 0:
            raise ValueError(f"ltrb_scale must be > 0, got {ltrb_scale}")
        self.ltrb_scale = ltrb_scale
        self.feat = _conv3x3(in_channels, in_channels)
        self.cls_score = _conv3x3(in_channels, num_classes)
        self.ltrb_pred = _conv3x3(in_channels, 4)
        self.stages = nn.ModuleList(_conv3x3(2 * in_channels, in_channels) for _ in range(num_heads - 1))
        _init_convs(self, self.cls_score, prior_prob)
        nn.init.constant_(self.ltrb_pred.bias, ltrb_init / ltrb_scale)
        self.one_to_many_topk = one_to_many_topk
        self.one_to_many_shares_boxes = one_to_many_shares_boxes
        self.one_to_many: nn.Module | None = None
        if one_to_many_topk and one_to_many_shares_boxes:
            self.one_to_many = nn.Sequential(_conv3x3(in_channels, in_channels), nn.ReLU(), _conv3x3(in_channels, num_classes))
            _init_convs(self.one_to_many, self.one_to_many[2], prior_prob)
        elif one_to_many_topk:
            self.one_to_many = OneNetHead(in_channels, num_classes, prior_prob=prior_prob, ltrb_init=ltrb_init, ltrb_scale=ltrb_scale)

    def predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, H, W) -> class logits (B, C, H, W), ltrb distances >= 0 in pixels (B, 4, H, W)."""
        feat = torch.relu(self.feat(features))
        return self.cls_score(feat), torch.relu(self.ltrb_pred(feat)) * self.ltrb_scale

    def predict_one_to_many(self, features: torch.Tensor, ltrb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary head's (logits, ltrb); ``ltrb`` is head 0's, used when the boxes are shared."""
        if self.one_to_many_shares_boxes:
            return self.one_to_many(features), ltrb
        return self.one_to_many.predict(features)

    def forward(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outputs = [self.predict(features)]
        if self.training:
            stage = features
            for conv in self.stages:
                stage = torch.relu(conv(torch.cat([features, stage], dim=1)))
                outputs.append(self.predict(stage))
        return outputs


class OneNetLoss(nn.Module):
    """OneNet's weighted losses: focal classification, L1 on size-normalised boxes, GIoU (or
    another IoU-family loss).

    Args:
        cls, l1, giou: loss weights (2, 5, 2: the same as the matching cost); ``giou`` weighs
            the IoU-family term whatever its kind (``loss_giou`` keeps its name).
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).
        one_to_many: factor on the auxiliary one-to-many head's three terms (when the head has one).
        box_loss: the IoU-family kind, "giou" (the paper), "iou", "linear_iou", "diou" or
            "ciou"; the matching cost uses the same kind.
    """

    def __init__(
        self,
        *,
        cls: float = 2.0,
        l1: float = 5.0,
        giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        one_to_many: float = 1.0,
        box_loss: IoUKind = "giou",
    ) -> None:
        super().__init__()
        self.cls_loss = FocalLoss(weight=cls, alpha=focal_alpha, gamma=focal_gamma)
        self.l1_loss = L1Loss(weight=l1)
        self.giou_loss = IoULoss(weight=giou, kind=box_loss)
        self.one_to_many = one_to_many


class MinCostTraining:
    """What both OneNets share once their head's outputs are decoded: the minimum-cost
    assignment, the losses of every head and the NMS-free top-k.

    ``forward_head`` returns ``{"heads": [head, ...], "one_to_many": head}`` (the last only
    when training with the auxiliary head), each head a dict of per-location ``cls_logits``
    (B, R, C), xyxy ``boxes`` (B, R, 4), ``points`` (R, 2) and ``strides`` (a float, or
    (R, 1) per location), which the centre-region prior of the assigner reads.
    """

    @classmethod
    def part_inputs(cls, section: str, parts: Mapping[str, nn.Module]) -> tuple[Any, ...]:
        # The matching cost's IoU term is the box loss's kind (detector.loss.box_loss).
        return (parts["loss"].giou_loss.kind,) if section == "assigner" else ()

    def losses(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        device = outputs["heads"][0]["boxes"].device
        num_boxes = reduce_normalizer(sum(len(t["labels"]) for t in targets), device)
        losses = {}
        for k, head in enumerate(outputs["heads"]):
            suffix = "" if k == 0 else f"_{k}"
            matches = [
                self.assigner(
                    head["cls_logits"][i].detach(), head["boxes"][i].detach(), t["boxes"], t["labels"], image_size,
                    points=head["points"], stride=head["strides"],
                )  # fmt: skip
                for i, t in enumerate(targets)
            ]
            for name, value in self._head_losses(head, targets, matches, image_size, num_boxes).items():
                losses[name + suffix] = value
        if "one_to_many" in outputs:
            head, topk = outputs["one_to_many"], self.head.one_to_many_topk
            matches = [
                self.assigner.one_to_many(
                    head["cls_logits"][i].detach(), head["boxes"][i].detach(), t["boxes"], t["labels"], image_size, head["points"], topk
                )
                for i, t in enumerate(targets)
            ]
            num_positives = reduce_normalizer(sum(match.num_pos for match in matches), device)
            for name, value in self._head_losses(head, targets, matches, image_size, num_positives).items():
                losses[name + "_o2m"] = self.loss.one_to_many * value
        return losses

    def _head_losses(
        self,
        head: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        matches: list[AssignResult],
        image_size: tuple[int, int],
        normalizer: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Focal, L1 and GIoU terms of one head given its assignment per image."""
        cls_logits, boxes = head["cls_logits"], head["boxes"]  # (B, R, C), (B, R, 4)
        cls_targets = torch.zeros_like(cls_logits)  # (B, R, C)
        matched_pred, matched_gt = [], []
        for i, (target, match) in enumerate(zip(targets, matches)):
            # Two ground truths may pick one location (mode "min"): it learns both classes.
            cls_targets[i, match.pred_idx, target["labels"][match.gt_idx]] = 1.0
            matched_pred.append(boxes[i, match.pred_idx])  # (K, 4)
            matched_gt.append(target["boxes"][match.gt_idx])  # (K, 4)
        pred_boxes, gt_boxes = torch.cat(matched_pred), torch.cat(matched_gt)  # (K_total, 4)
        height, width = image_size
        scale = pred_boxes.new_tensor([width, height, width, height])  # (4,)
        return {
            "loss_cls": self.loss.cls_loss(cls_logits, cls_targets, normalizer),
            "loss_l1": self.loss.l1_loss(pred_boxes / scale, gt_boxes / scale, normalizer),
            "loss_giou": self.loss.giou_loss(pred_boxes, gt_boxes, normalizer),
        }

    def inference(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> Detections:
        head = outputs["heads"][0]
        probs = head["cls_logits"].sigmoid()  # (B, R, C)
        detections = []
        for image_probs, image_boxes in zip(probs, head["boxes"]):
            scores, point_idx, labels = topk_dense(image_probs, self.postprocess.topk)  # (K,) each
            boxes = clip_boxes_to_image(image_boxes[point_idx], image_size)  # (K, 4)
            detections.append(self.postprocess.finalize(boxes, scores, labels))
        return detections

    def inference_padded(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        head = outputs["heads"][0]
        probs = head["cls_logits"].sigmoid()  # (B, R, C)
        num_classes = probs.shape[-1]
        scores, flat_idx = probs.flatten(1).topk(min(self.postprocess.topk, probs[0].numel()), dim=1)  # (B, K)
        point_idx, labels = flat_idx // num_classes, flat_idx % num_classes  # (B, K)
        boxes = head["boxes"].gather(1, point_idx.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4)
        return self.postprocess.finalize_padded(clip_boxes_to_image(boxes, image_size), scores, labels)


@register("onenet")
class OneNet(MinCostTraining, SingleMapDetector):
    """OneNet: ResNet + deconvolution upsampler, MinCostAssigner, NMS-free top-k."""

    components = {
        "backbone": ResNetBackbone,
        "neck": DeconvUpsampler,
        "head": OneNetHead,
        "assigner": MinCostAssigner,
        "loss": OneNetLoss,
        "postprocess": Postprocess,
    }
    # Official OneNet R18: BatchNorm, nothing frozen.
    defaults = {"backbone": {"depth": 18, "norm": "bn"}}

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, Any]:
        predictions = self.head(features[-1])
        outputs: dict[str, Any] = {"heads": [self._decode(cls_logits, ltrb) for cls_logits, ltrb in predictions]}
        if self.training and self.head.one_to_many is not None:
            outputs["one_to_many"] = self._decode(*self.head.predict_one_to_many(features[-1], predictions[0][1]))
        return outputs

    def _decode(self, cls_logits: torch.Tensor, ltrb: torch.Tensor) -> dict[str, Any]:
        """(B, C, H, W) logits, (B, 4, H, W) ltrb -> per-location logits (B, R, C), xyxy boxes (B, R, 4), points (R, 2)."""
        height, width = cls_logits.shape[-2:]
        points = grid_points(height, width, self.stride, cls_logits.device)  # (R, 2)
        boxes = decode_ltrb(points, ltrb.flatten(2).transpose(1, 2))  # (B, R, 4)
        return {"cls_logits": cls_logits.flatten(2).transpose(1, 2), "boxes": boxes, "points": points, "strides": self.stride}


class OneNetPyramidHead(TowerHead):
    """The FCOS-style OneNet head: FCOS's classification and regression towers shared by every
    level, class logits on the first, ltrb = ReLU(scale_l * x) * stride_l on the second (no
    centerness: one positive per object needs no down-weighting of off-centre ones).

    Args:
        in_channels, num_classes, strides: set by the detector.
        num_convs: depth of each tower (4).
        prior_prob: initial foreground probability of the classifier (0.01).
        ltrb_init: initial bias of the regression, in strides (1: every side starts one
            stride long and alive; with a zero bias half the ReLU'd sides start dead).
        one_to_many_topk: 0 (OneNet), or the positives per object of an auxiliary
            one-to-many classifier (training only) on the classification tower; it learns its
            boxes through this head's regression, as ``OneNetHead`` shares them.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        *,
        num_convs: int = 4,
        prior_prob: float = 0.01,
        ltrb_init: float = 1.0,
        one_to_many_topk: int = 0,
    ) -> None:
        super().__init__(in_channels, num_classes, strides, num_convs)
        if one_to_many_topk < 0:
            raise ValueError(f"one_to_many_topk must be >= 0, got {one_to_many_topk}")
        self.ltrb_pred = nn.Conv2d(in_channels, 4, kernel_size=3, padding=1)
        self.one_to_many_topk = one_to_many_topk
        self.one_to_many = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1) if one_to_many_topk else None
        init_dense_head(self, self.cls_logits, prior_prob)
        if self.one_to_many is not None:
            nn.init.constant_(self.one_to_many.bias, prior_logit(prior_prob))
        nn.init.constant_(self.ltrb_pred.bias, ltrb_init)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """L maps (B, D, H_l, W_l) -> class logits (B, R, C), ltrb in pixels (B, R, 4), and the
        auxiliary one-to-many logits (B, R, C) when training with them, else None."""
        with_one_to_many = self.training and self.one_to_many is not None
        cls_logits, ltrb, one_to_many = [], [], []
        for level, feature in enumerate(features):
            cls_feat, reg_feat = self.cls_tower(feature), self.reg_tower(feature)
            cls_logits.append(self.cls_logits(cls_feat).flatten(2))  # (B, C, H_l*W_l)
            ltrb.append((torch.relu(self.ltrb_pred(reg_feat) * self.scales[level]) * self.strides[level]).flatten(2))
            if with_one_to_many:
                one_to_many.append(self.one_to_many(cls_feat).flatten(2))
        return (
            torch.cat(cls_logits, dim=2).transpose(1, 2),  # (B, R, C)
            torch.cat(ltrb, dim=2).transpose(1, 2),  # (B, R, 4)
            torch.cat(one_to_many, dim=2).transpose(1, 2) if with_one_to_many else None,
        )


@register("onenet_fpn")
class OneNetFPN(MinCostTraining, PyramidDetector):
    """OneNet with the FCOS head (the paper's FPN variant): ResNet + FPN P3-P7, one
    minimum-cost match over the locations of every level, NMS-free top-k."""

    components = {
        "backbone": ResNetBackbone,
        "neck": FPN,
        "head": OneNetPyramidHead,
        "assigner": MinCostAssigner,
        "loss": OneNetLoss,
        "postprocess": Postprocess,
    }
    # The paper's FCOS-head OneNet is an R50 FPN on Detectron2's defaults: frozen BatchNorm,
    # stem and res2 frozen (as our FCOS).
    defaults = {"backbone": {"depth": 50, "norm": "frozen_bn", "frozen_stages": 2}}

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, Any]:
        cls_logits, ltrb, one_to_many_logits = self.head(features)
        locations = self.locations(features, self.head.strides)
        points, strides = locations["points"], locations["point_strides"][:, None].to(ltrb.dtype)  # (R, 2), (R, 1)
        head = {"cls_logits": cls_logits, "boxes": decode_ltrb(points, ltrb), "points": points, "strides": strides}
        outputs: dict[str, Any] = {"heads": [head]}
        if one_to_many_logits is not None:
            outputs["one_to_many"] = {**head, "cls_logits": one_to_many_logits}
        return outputs
