"""The last step of every detector: score threshold, class-wise NMS of a chosen kind, top-k.

Every detector ends in :meth:`Postprocess.finalize` (or :meth:`Postprocess.select`), so the
NMS kind (``none`` for the NMS-free detectors, ``hard``, Soft-NMS, Cluster-NMS, ... see
:mod:`.nms`) can be switched by config for any of them, which is how the NMS-free claim
and the NMS variants are measured.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import nms as torchvision_nms

from anchorless.detectors.postprocess.nms import (
    NMS_KINDS,
    NMSKind,
    kind_settings,
    nms,
    pad_detections,
    soft_nms_padded,
)


class Postprocess(nn.Module):
    """The last step of every detector: score threshold, NMS, top-k.

    Args:
        topk: detections kept per image (100, the COCO maximum).
        nms: the NMS kind (:mod:`.nms`): "none" (the NMS-free detectors), "hard"
            (torchvision batched_nms), "soft_linear", "soft_gaussian", "fast", "matrix",
            "cluster", "cluster_spm", "cluster_diou", "cluster_weighted", "diou"; false and
            true mean "none" and "hard". On an NMS-free detector it measures what NMS would
            still remove.
        nms_iou: IoU above which a box is suppressed (hard, fast, cluster*, diou) or decayed
            (soft_linear).
        score_threshold: detections scoring below it are dropped first.
        nms_sigma: the Gaussian decay's sigma in exp(-IoU^2 / sigma); null: the kind's paper
            value (Soft-NMS and Matrix NMS 0.5, Cluster-NMS's score penalty 0.2).
        nms_beta: exponent of DIoU's distance term (rho^2 / c^2)^beta in diou and
            cluster_diou / cluster_weighted; null: 0.6 as their official codes.
        nms_min_score: the soft kinds drop boxes rescored below it; null: the kind's value
            (Soft-NMS 0.001, Matrix NMS 0.05, Cluster-NMS 0.01).
    """

    def __init__(
        self,
        *,
        topk: int = 100,
        nms: bool | NMSKind = False,
        nms_iou: float = 0.6,
        score_threshold: float = 0.0,
        nms_sigma: float | None = None,
        nms_beta: float | None = None,
        nms_min_score: float | None = None,
    ) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not 0 < nms_iou <= 1:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        kind = {False: "none", True: "hard"}[nms] if isinstance(nms, bool) else nms
        if kind not in NMS_KINDS:
            raise ValueError(f"nms must be true, false or one of {', '.join(NMS_KINDS)}, got {nms!r}")
        for name, value in (("nms_sigma", nms_sigma), ("nms_beta", nms_beta)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.topk, self.nms, self.nms_iou, self.score_threshold = topk, kind, nms_iou, score_threshold
        self.nms_settings = {"iou_threshold": nms_iou, "sigma": nms_sigma, "beta": nms_beta, "min_score": nms_min_score}

    def finalize(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """boxes (N, 4), scores (N,), labels (N,) -> dict of at most topk detections, best first."""
        keep = scores >= self.score_threshold  # (N,)
        return self.select(boxes[keep], scores[keep], labels[keep])

    def select(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """NMS of the configured kind (rescoring or averaging for the kinds that do), then the
        topk best; no score threshold."""
        kept = nms(boxes, scores, labels, self.nms, **self.nms_settings)
        keep = kept.keep[: self.topk]
        return {"boxes": kept.boxes[: self.topk], "scores": kept.scores[: self.topk], "labels": labels[keep]}

    # Batch-wide, fixed-shape forms of finalize and select for deployment graphs (ONNX).
    # Shapes: B images, N candidates each, K = topk.

    def finalize_padded(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`finalize` for (B, N, 4) boxes, (B, N) scores and labels; a candidate below
        the threshold gets score 0 instead of leaving the (fixed-size) batch."""
        return self.select_padded(boxes, scores * (scores >= self.score_threshold), labels)

    def select_padded(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`select` batch-wide: (B, K, 4) boxes, (B, K) scores and labels, padded with
        score 0; score-0 candidates are padding. ``none``, ``hard`` (torchvision's, which
        exports to ONNX's NonMaxSuppression) and the two Soft-NMS kinds have this form."""
        if self.nms in ("soft_linear", "soft_gaussian"):
            settings = kind_settings(self.nms, **self.nms_settings)
            method = "linear" if self.nms == "soft_linear" else "gaussian"
            boxes, scores, labels = soft_nms_padded(boxes, scores, labels, self.topk, method, **settings)
            return {"boxes": boxes, "scores": scores, "labels": labels}
        if self.nms not in ("none", "hard"):
            raise NotImplementedError(
                f"postprocess.nms={self.nms!r} has no batch-wide graph form; export with nms none, hard, "
                "soft_linear or soft_gaussian"
            )
        batch, num = scores.shape
        if self.nms == "hard":
            keep = _grouped_nms(boxes, scores, labels, self.nms_iou)  # (M,) into the flattened batch
            kept = torch.zeros(batch * num, dtype=scores.dtype, device=scores.device).index_fill(0, keep, 1.0)
            scores = scores * kept.view(batch, num)
        top_scores, order = scores.topk(min(self.topk, num), dim=1)  # (B, K')
        top_boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))  # (B, K', 4)
        top_labels = labels.gather(1, order)  # (B, K')
        top_boxes, top_scores, top_labels = pad_detections(top_boxes, top_scores, top_labels, self.topk)
        return {"boxes": top_boxes, "scores": top_scores, "labels": top_labels}


def _grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy NMS of a whole batch in one ``torchvision.ops.nms`` call (one ONNX op), each
    (image, class) a group: every group's boxes are moved to a tile of their own, so boxes
    of two groups never overlap. Tiles on a 2-D grid rather than a line (as ``batched_nms``
    does) keep the coordinates small enough for float32 to hold the IoUs exactly; with one
    line of (image x class) offsets, a batch of images moved boxes far enough to change them.
    A score-0 candidate comes last, so it never suppresses a real one. Returns indices into
    the flattened (B*N) candidates."""
    batch, num = scores.shape
    image = torch.arange(batch, device=scores.device).view(batch, 1).expand(batch, num)
    group = (image * (labels.max() + 1) + labels).flatten()  # (B*N,)
    tile = boxes.max() + 1  # boxes are clipped to the image: each tile holds any box
    column, row = group % 64, torch.div(group, 64, rounding_mode="floor")  # (B*N,)
    shift = torch.stack([column, row, column, row], dim=1).to(boxes.dtype) * tile  # (B*N, 4)
    return torchvision_nms(boxes.flatten(0, 1) + shift, scores.flatten(), iou)
