"""Decoding of the corner-keypoint detectors: pairing top-left and bottom-right corners into
boxes (CornerNet), and the central-region check of CenterNet keypoint triplets.

Pairing is batch-wide with fixed shapes (top-K corners of each kind, the K x K pair matrix
masked by class, geometry and embedding distance, then the best candidates), so the eager
and the exported (ONNX) decodings are the same computation.

Shapes: B images, C classes, H x W the stride-s map, K corners of each kind, N candidate
boxes, K_c centre keypoints.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torchvision.ops import clip_boxes_to_image

from anchorless.detectors.postprocess.base import Postprocess
from anchorless.detectors.postprocess.heatmap import gather_cells, heatmap_peaks, topk_heatmap_batched
from anchorless.detectors.postprocess.nms import NMSKind


class Candidates(NamedTuple):
    """Candidate boxes of a batch; ``valid`` marks the pairs that passed every check."""

    boxes: torch.Tensor  # (B, N, 4) xyxy in input pixels, clipped to the image
    scores: torch.Tensor  # (B, N)
    labels: torch.Tensor  # (B, N)
    valid: torch.Tensor  # (B, N) bool


class Keypoints(NamedTuple):
    """The top-K peaks of a keypoint heatmap, with their refined positions."""

    scores: torch.Tensor  # (B, K)
    labels: torch.Tensor  # (B, K)
    xs: torch.Tensor  # (B, K) cell + offset, in map cells
    ys: torch.Tensor  # (B, K)
    cells: tuple[torch.Tensor, torch.Tensor]  # the integer (ys, xs), each (B, K)


def top_keypoints(heatmap: torch.Tensor, offset: torch.Tensor, k: int, kernel: int = 3) -> Keypoints:
    """Peaks of a (B, C, H, W) probability map (``kernel`` max-pool), the top k, each moved by
    its predicted (B, 2, H, W) sub-cell offset."""
    scores, labels, ys, xs = topk_heatmap_batched(heatmap_peaks(heatmap, kernel), k)  # (B, K) each
    shift = gather_cells(offset, ys, xs)  # (B, K, 2)
    return Keypoints(scores, labels, xs + shift[..., 0], ys + shift[..., 1], (ys, xs))


def pair_corners(
    tl: Keypoints,
    br: Keypoints,
    tl_embedding: torch.Tensor,
    br_embedding: torch.Tensor,
    *,
    max_distance: float = 0.5,
    candidates: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CornerNet's pairing: every (top-left, bottom-right) pair is a box; a pair is valid when
    both corners have the same class, the top-left is not right of or below the bottom-right,
    and their 1-D embeddings are at most ``max_distance`` apart. Its score is the mean of the
    two corner scores. Returns the best ``candidates`` pairs (valid ones first): boxes (B, N, 4)
    in map cells, scores (B, N), labels (B, N), valid (B, N).

    tl_embedding, br_embedding: (B, 1, H, W) embedding maps.
    """
    batch, k = tl.scores.shape
    boxes = torch.stack(
        [tl.xs[:, :, None].expand(-1, -1, k), tl.ys[:, :, None].expand(-1, -1, k),
         br.xs[:, None, :].expand(-1, k, -1), br.ys[:, None, :].expand(-1, k, -1)], dim=3
    )  # (B, K, K, 4): [b, i, j] pairs top-left i with bottom-right j  # fmt: skip
    tl_tag = gather_cells(tl_embedding, *tl.cells)[..., 0]  # (B, K)
    br_tag = gather_cells(br_embedding, *br.cells)[..., 0]  # (B, K)
    valid = (
        (tl.labels[:, :, None] == br.labels[:, None, :])
        & ((tl_tag[:, :, None] - br_tag[:, None, :]).abs() <= max_distance)
        & (boxes[..., 2] >= boxes[..., 0])
        & (boxes[..., 3] >= boxes[..., 1])
    )  # (B, K, K)
    scores = (tl.scores[:, :, None] + br.scores[:, None, :]) / 2  # (B, K, K)
    # Invalid pairs sort below every valid one (scores are in [0, 1]).
    ranked = torch.where(valid, scores, scores - 2).flatten(1)  # (B, K*K)
    _, order = ranked.topk(min(candidates, k * k), dim=1)  # (B, N)
    labels = tl.labels[:, :, None].expand(-1, -1, k).flatten(1).gather(1, order)  # (B, N)
    return (
        boxes.flatten(1, 2).gather(1, order[..., None].expand(-1, -1, 4)),
        scores.flatten(1).gather(1, order),
        labels,
        valid.flatten(1).gather(1, order),
    )


def central_regions(
    boxes: torch.Tensor, small_n: int = 3, large_n: int = 5, scale_split: float = 150.0
) -> torch.Tensor:
    """The central region of each (..., 4) box (CenterNet keypoint triplets, Eq. 1): with
    n = ``small_n`` for boxes whose scale sqrt(w h) is at most ``scale_split`` pixels and
    ``large_n`` otherwise, ctl = ((n+1) tl + (n-1) br) / 2n and cbr = ((n-1) tl + (n+1) br) / 2n."""
    tl, br = boxes[..., :2], boxes[..., 2:]  # (..., 2)
    area = (br - tl).prod(dim=-1, keepdim=True)  # (..., 1)
    n = torch.where(area <= scale_split**2, float(small_n), float(large_n))  # (..., 1)
    return torch.cat([((n + 1) * tl + (n - 1) * br) / (2 * n), ((n - 1) * tl + (n + 1) * br) / (2 * n)], dim=-1)


def filter_by_centers(
    candidates: Candidates,
    centers: torch.Tensor,
    center_scores: torch.Tensor,
    center_labels: torch.Tensor,
    *,
    small_n: int = 3,
    large_n: int = 5,
    scale_split: float = 150.0,
) -> Candidates:
    """Keep a candidate only if a centre keypoint of its class lies strictly inside its
    central region; its score becomes the mean of its three keypoints, (2 s + s_c) / 3, with
    the best such centre (the official code's).

    centers (B, K_c, 2) xy in the boxes' pixels, center_scores and center_labels (B, K_c),
    best first.
    """
    region = central_regions(candidates.boxes, small_n, large_n, scale_split)  # (B, N, 4)
    cx, cy = centers[:, None, :, 0], centers[:, None, :, 1]  # (B, 1, K_c)
    inside = (
        (cx > region[..., 0:1]) & (cx < region[..., 2:3]) & (cy > region[..., 1:2]) & (cy < region[..., 3:4])
        & (center_labels[:, None, :] == candidates.labels[..., None])
    )  # (B, N, K_c)  # fmt: skip
    found = inside.any(dim=2)  # (B, N)
    best = inside.to(torch.uint8).argmax(dim=2)  # (B, N) the first (best) centre inside
    center_score = center_scores.gather(1, best)  # (B, N)
    scores = torch.where(found, (2 * candidates.scores + center_score) / 3, candidates.scores)
    return Candidates(candidates.boxes, scores, candidates.labels, candidates.valid & found)


class CornerPostprocess(Postprocess):
    """CornerNet's decoding: sigmoid heatmaps, ``peak_kernel`` max-pool peaks, the top
    ``corner_topk`` corners of each kind, pairing (:func:`pair_corners`), Soft-NMS, the top
    ``topk``.

    Args:
        corner_topk: corners of each kind paired (K, 100).
        max_embedding_distance: pairs whose embeddings differ more are rejected (0.5).
        candidates: best pairs kept before NMS (1000, the official ``num_dets``).
        peak_kernel: max-pool window of the peak extraction (3).
        (topk, nms, nms_iou, score_threshold, nms_sigma, nms_beta, nms_min_score as in
        :class:`Postprocess`; CornerNet: Gaussian Soft-NMS, sigma 0.5, IoU 0.5, the top 100.)
    """

    def __init__(
        self,
        *,
        nms: bool | NMSKind = "soft_gaussian",
        nms_iou: float = 0.5,
        nms_sigma: float | None = 0.5,
        nms_min_score: float | None = 0.001,
        corner_topk: int = 100,
        max_embedding_distance: float = 0.5,
        candidates: int = 1000,
        peak_kernel: int = 3,
        **postprocess: Any,
    ) -> None:
        super().__init__(nms=nms, nms_iou=nms_iou, nms_sigma=nms_sigma, nms_min_score=nms_min_score, **postprocess)
        for name, value in (("corner_topk", corner_topk), ("candidates", candidates)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if peak_kernel < 1 or peak_kernel % 2 == 0:
            raise ValueError(f"peak_kernel must be an odd number >= 1, got {peak_kernel}")
        self.corner_topk, self.max_embedding_distance = corner_topk, max_embedding_distance
        self.candidates, self.peak_kernel = candidates, peak_kernel

    def candidates_of(self, outputs: dict[str, Any], image_size: tuple[int, int], stride: int) -> Candidates:
        """Paired candidates of the batch, boxes in input pixels clipped to the image.
        ``outputs`` holds ``tl_heatmap``, ``br_heatmap`` (B, C, H, W) probabilities,
        ``tl_embedding``, ``br_embedding`` (B, 1, H, W), ``tl_offset``, ``br_offset`` (B, 2, H, W)."""
        tl = top_keypoints(outputs["tl_heatmap"], outputs["tl_offset"], self.corner_topk, self.peak_kernel)
        br = top_keypoints(outputs["br_heatmap"], outputs["br_offset"], self.corner_topk, self.peak_kernel)
        boxes, scores, labels, valid = pair_corners(
            tl, br, outputs["tl_embedding"], outputs["br_embedding"],
            max_distance=self.max_embedding_distance, candidates=self.candidates,
        )  # fmt: skip
        return Candidates(clip_boxes_to_image(boxes * stride, image_size), scores, labels, valid)

    def decode(
        self, outputs: dict[str, Any], image_size: tuple[int, int], stride: int
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image: the valid candidates through :meth:`finalize`."""
        found = self.candidates_of(outputs, image_size, stride)
        return [
            self.finalize(boxes[valid], scores[valid], labels[valid])
            for boxes, scores, labels, valid in zip(*found)
        ]

    def decode_padded(self, outputs: dict[str, Any], image_size: tuple[int, int], stride: int) -> dict[str, torch.Tensor]:
        """:meth:`decode` batch-wide with fixed shapes; invalid candidates score 0 (padding)."""
        found = self.candidates_of(outputs, image_size, stride)
        return self.finalize_padded(found.boxes, found.scores * found.valid, found.labels)


class TripletPostprocess(CornerPostprocess):
    """CenterNet keypoint triplets' decoding: CornerNet's pairing, then a candidate is kept
    only if one of the top ``center_topk`` centre keypoints of its class falls in its
    central region (:func:`filter_by_centers`), scored by the mean of its three keypoints.

    Args:
        center_topk: centre keypoints considered (70, the official COCO setting; also
            the corners' K there).
        small_n, large_n: the central region's n for small and large boxes (3, 5).
        scale_split: the scale sqrt(w h), in input pixels, that separates them (150).
        (the rest as :class:`CornerPostprocess`.)
    """

    def __init__(
        self,
        *,
        corner_topk: int = 70,
        center_topk: int = 70,
        small_n: int = 3,
        large_n: int = 5,
        scale_split: float = 150.0,
        **corners: Any,
    ) -> None:
        super().__init__(corner_topk=corner_topk, **corners)
        if center_topk < 1:
            raise ValueError(f"center_topk must be >= 1, got {center_topk}")
        if small_n < 1 or large_n < 1:
            raise ValueError(f"small_n and large_n must be >= 1, got {small_n}, {large_n}")
        self.center_topk, self.small_n, self.large_n, self.scale_split = center_topk, small_n, large_n, scale_split

    def candidates_of(self, outputs: dict[str, Any], image_size: tuple[int, int], stride: int) -> Candidates:
        """CornerNet's candidates filtered by the centre keypoints (``ct_heatmap``, ``ct_offset``)."""
        paired = super().candidates_of(outputs, image_size, stride)
        ct = top_keypoints(outputs["ct_heatmap"], outputs["ct_offset"], self.center_topk, self.peak_kernel)
        centers = torch.stack([ct.xs, ct.ys], dim=2) * stride  # (B, K_c, 2) input pixels
        return filter_by_centers(
            paired, centers, ct.scores, ct.labels,
            small_n=self.small_n, large_n=self.large_n, scale_split=self.scale_split,
        )  # fmt: skip
