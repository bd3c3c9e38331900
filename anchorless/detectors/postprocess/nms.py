"""The NMS family, one interface: ``nms(boxes, scores, labels, kind, ...)`` -> the kept
boxes, best first, with their (possibly rescored) scores and (possibly averaged) boxes.

Every kind is class-aware (a box is only suppressed by boxes of its own class) and takes
its paper's parameters as keyword arguments with the paper's values as defaults:

- ``none``: no suppression, sorted by score (the NMS-free detectors' own output);
- ``hard``: greedy NMS, torchvision's ``batched_nms`` (the speed reference);
- ``soft_linear``, ``soft_gaussian``: Soft-NMS (Bodla et al., ICCV 2017) decays rather than
  removes: s *= 1 - IoU above ``iou_threshold`` (0.3), or s *= exp(-IoU^2 / sigma) (0.5);
  boxes decayed below ``min_score`` (0.001, the official code) are dropped;
- ``fast``: Fast NMS (YOLACT): one matrix step; a box already suppressed still suppresses;
- ``matrix``: Matrix NMS (SOLOv2): decay_j = min_i f(IoU_ij) / f(max_k IoU_ki) with
  f(x) = exp(-x^2 / sigma), sigma 0.5 (the official code's exp(-2 x^2)), keeping decayed
  scores >= ``min_score`` (0.05);
- ``cluster``: Cluster-NMS (Zheng et al., "Enhancing Geometric Factors...", TCYB 2021):
  matrix steps until the keep set stops changing; its first step is Fast NMS and its fixed
  point is exactly greedy NMS;
- ``cluster_spm``: Cluster-NMS with the score penalty: s_j *= prod_i exp(-B_ij^2 / sigma),
  B the converged IoU matrix of kept boxes over the others, sigma 0.2, keeping s > 0.01;
- ``cluster_diou``: the same plus the DIoU distance penalty:
  s_j *= prod_i min(exp(-B_ij^2 / sigma) + R_ij^beta [B_ij > 0], 1), R = rho^2 / c^2 (DIoU's
  centre distance over the enclosing diagonal), beta 0.6;
- ``cluster_weighted``: ``cluster_diou`` whose kept boxes become the score-weighted average
  of the boxes they overlap by more than ``average_iou`` (0.8) (the official Cluster-NMS code);
- ``diou``: DIoU-NMS (Zheng et al., AAAI 2020): greedy NMS on IoU - R^beta (beta 0.6, the
  official darknet code; the paper's DIoU is beta 1), computed as Cluster-NMS on that matrix.

All use torchvision's ``box_iou`` and ``distance_box_iou``. A kind is one function plus one
``@register_nms`` line here; :data:`NMSKind` lists the registered names.

Shapes: N boxes in, K kept; N_c the boxes of one class.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torchvision.ops import batched_nms, box_iou, distance_box_iou

from anchorless.detectors.losses.iou import elementwise_iou


class NMSResult(NamedTuple):
    """The kept boxes, best (final score) first."""

    keep: torch.Tensor  # (K,) int64 indices into the input
    scores: torch.Tensor  # (K,) their scores, rescored by the soft kinds
    boxes: torch.Tensor  # (K, 4) their boxes, averaged by cluster_weighted


NMSFunction = Callable[..., NMSResult]
# What a one-class kernel returns: indices into its sorted boxes, their new scores, their boxes.
KernelOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_KINDS: dict[str, NMSFunction] = {}
_SETTINGS: dict[str, frozenset[str]] = {}  # the keyword arguments each kind takes
NMS_FUNCTIONS: Mapping[str, NMSFunction] = types.MappingProxyType(_KINDS)


def register_nms(name: str) -> Callable[[NMSFunction], NMSFunction]:
    """Make a function ``(boxes, scores, labels, *, settings...) -> NMSResult`` the kind ``name``."""

    def decorator(function: NMSFunction) -> NMSFunction:
        if name in _KINDS:
            raise ValueError(f"NMS kind {name!r} is already registered")
        _KINDS[name] = function
        _SETTINGS[name] = frozenset(inspect.signature(function).parameters)
        return function

    return decorator


def per_class(kernel: Callable[..., KernelOutput]) -> NMSFunction:
    """Class-aware and sorted around a one-class ``kernel(boxes, scores, **settings)``.

    The kernel gets one class's boxes sorted by score (best first) and returns (indices into
    them, their new scores, their boxes). A loop over classes: each class's pairwise matrices
    alone take N_c^2 memory instead of N^2, and need no cross-class mask.
    """

    @functools.wraps(kernel)
    def batched(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, **settings: Any) -> NMSResult:
        kept, kept_scores, kept_boxes = [], [], []
        for label in torch.unique(labels):
            members = torch.nonzero(labels == label).squeeze(1)  # (N_c,)
            members = members[scores[members].argsort(descending=True, stable=True)]
            index, new_scores, new_boxes = kernel(boxes[members], scores[members], **settings)
            kept.append(members[index])
            kept_scores.append(new_scores)
            kept_boxes.append(new_boxes)
        if not kept:
            return _sorted(torch.zeros(0, dtype=torch.long, device=boxes.device), scores[:0], boxes[:0])
        return _sorted(torch.cat(kept), torch.cat(kept_scores), torch.cat(kept_boxes))

    return batched


def _sorted(keep: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor) -> NMSResult:
    order = scores.argsort(descending=True)
    return NMSResult(keep[order], scores[order], boxes[order])


def _better_over_worse(matrix: torch.Tensor) -> torch.Tensor:
    """Keep entry (i, j) only for i ranked before j (strict upper triangle): what a better box
    does to a worse one."""
    return matrix.triu(diagonal=1)


def _kept(keep: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor) -> KernelOutput:
    """A kernel's output from its keep mask (N_c,) over its scores and boxes."""
    return torch.nonzero(keep).squeeze(1), scores[keep], boxes[keep]


def _distance_penalty(boxes: torch.Tensor, iou: torch.Tensor, beta: float) -> torch.Tensor:
    """(N, N) DIoU's penalty (rho^2 / c^2)^beta, from the boxes' (N, N) IoU: IoU - DIoU
    (torchvision's distance_box_iou) is rho^2 / c^2."""
    return (iou - distance_box_iou(boxes, boxes)).clamp(min=0).pow(beta)


def _cluster(
    overlaps: torch.Tensor, iou_threshold: float, max_iterations: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster-NMS on an (N, N) better-over-worse matrix: (keep (N,) bool, the converged matrix,
    rows of suppressed boxes zeroed).

    A loop of matrix steps, each keeping the boxes that no box kept by the previous step
    overlaps beyond the threshold (the first step, from all boxes, is Fast NMS). After step t
    the first t boxes are final, so it converges within N steps; in practice in a few, the
    length of the longest suppression chain.
    """
    keep = torch.ones(overlaps.shape[0], dtype=torch.bool, device=overlaps.device)  # (N,)
    for _ in range(max_iterations or overlaps.shape[0]):
        following = overlaps[keep].amax(dim=0) <= iou_threshold  # (N,) box 0 is always kept
        if torch.equal(following, keep):
            break
        keep = following
    return keep, overlaps * keep[:, None]


# --------------------------------------------------------------------------- the kinds


@register_nms("none")
def no_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> NMSResult:
    """Every box, sorted by score: the NMS-free detectors' output as it is."""
    return _sorted(torch.arange(len(scores), device=scores.device), scores, boxes)


@register_nms("hard")
def hard_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, *, iou_threshold: float = 0.5) -> NMSResult:
    """Greedy NMS: torchvision's ``batched_nms`` (class-aware, sorted by score)."""
    keep = batched_nms(boxes, scores, labels, iou_threshold)  # (K,)
    return NMSResult(keep, scores[keep], boxes[keep])


def _soft(
    boxes: torch.Tensor, scores: torch.Tensor, *, linear: bool, iou_threshold: float, sigma: float, min_score: float
) -> KernelOutput:
    overlaps = box_iou(boxes, boxes)  # (N_c, N_c)
    scores = scores.clone()
    alive = torch.ones_like(scores, dtype=torch.bool)  # (N_c,)
    picked = []
    # A loop: each pick is the best score after the previous picks' decay, so it is sequential.
    for _ in range(len(scores)):
        best = torch.where(alive, scores, -math.inf).argmax()
        if not alive[best]:
            break
        picked.append(best)
        alive[best] = False
        overlap = overlaps[best]  # (N_c,)
        if linear:
            decay = torch.where(overlap > iou_threshold, 1 - overlap, torch.ones_like(overlap))
        else:
            decay = torch.exp(-overlap.square() / sigma)
        touched = alive & (overlap > 0)  # the official code decays and drops only overlapping boxes
        scores = torch.where(touched, scores * decay, scores)
        alive &= ~(touched & (scores < min_score))
    index = torch.stack(picked) if picked else torch.zeros(0, dtype=torch.long, device=scores.device)
    return index, scores[index], boxes[index]


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    method: Literal["linear", "gaussian"] = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.001,
) -> NMSResult:
    """Soft-NMS, class-aware (public: CornerNet decodes with it): the kept indices (best
    first) and their rescored scores, as an :class:`NMSResult`.

    Repeatedly keeps the best remaining box and decays the scores of the boxes of its class
    that overlap it: "linear" s *= 1 - IoU where IoU > ``iou_threshold``; "gaussian"
    s *= exp(-IoU^2 / ``sigma``). A decayed box scoring below ``score_threshold`` is dropped.
    The defaults are CornerNet's (Gaussian, sigma 0.5, threshold 0.5, floor 0.001); the
    Soft-NMS paper's linear threshold is 0.3, the default of the ``soft_linear`` kind.
    """
    if method not in ("linear", "gaussian"):
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    kernel = functools.partial(_soft, linear=method == "linear")
    return per_class(kernel)(boxes, scores, labels, iou_threshold=iou_threshold, sigma=sigma, min_score=score_threshold)


def soft_nms_padded(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    topk: int,
    method: Literal["linear", "gaussian"] = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.5,
    min_score: float = 0.001,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`soft_nms` of a whole batch with fixed shapes, the form a deployment graph runs.

    boxes (B, N, 4), scores (B, N), labels (B, N), a score-0 candidate being padding ->
    the ``topk`` best kept of each image: boxes (B, K, 4), rescored scores (B, K), labels
    (B, K), best first, padded with score 0. The picks and scores of :func:`soft_nms`: a
    class's picks depend only on its own boxes, and since a decay only lowers scores, each
    image's best live candidate over all classes is its next pick in soft_nms's order, so K
    steps find the K best. A loop of K steps (unrolled in a graph): each pick follows the
    previous picks' decay.
    """
    if method not in ("linear", "gaussian"):
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    num = scores.shape[1]
    columns = torch.arange(num, device=scores.device)  # (N,)
    alive = scores > 0  # (B, N)
    boxes_and_labels = torch.cat([boxes, labels.unsqueeze(-1).to(boxes.dtype)], dim=-1)  # (B, N, 5): one gather a pick
    picked: list[tuple[torch.Tensor, torch.Tensor]] = []
    # Few ops a step: a graph unrolls the loop, and every op costs the exporter time.
    for _ in range(min(topk, num)):
        best_score, best = torch.where(alive, scores, -math.inf).max(dim=1, keepdim=True)  # (B, 1)
        pick = boxes_and_labels.gather(1, best.unsqueeze(-1).expand(-1, -1, 5))  # (B, 1, 5)
        picked.append((pick, best_score.clamp(min=0)))  # none alive: -inf, padding
        alive = alive & (columns != best)
        overlap = elementwise_iou(pick[..., :4], boxes)  # (B, N): each image's pick against its own boxes
        if method == "linear":
            decay = torch.where(overlap > iou_threshold, 1 - overlap, torch.ones_like(overlap))
        else:
            decay = torch.exp(-overlap.square() / sigma)
        touched = alive & (boxes_and_labels[..., 4] == pick[..., 4]) & (overlap > 0)  # as soft_nms: overlaps of the class
        scores = torch.where(touched, scores * decay, scores)
        alive = alive & ~(touched & (scores < min_score))
    picks = torch.cat([pick for pick, _ in picked], dim=1)  # (B, K', 5)
    out_boxes, out_labels = picks[..., :4], picks[..., 4].to(labels.dtype)
    out_scores = torch.cat([score for _, score in picked], dim=1)  # (B, K')
    return pad_detections(out_boxes, out_scores, out_labels, topk)


def pad_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K', 4) boxes, (B, K') scores and labels padded with zeros to K = ``topk`` columns
    (a batch-wide decoding with fewer candidates than K)."""
    missing = topk - scores.shape[1]
    if missing > 0:
        boxes = torch.nn.functional.pad(boxes, (0, 0, 0, missing))
        scores = torch.nn.functional.pad(scores, (0, missing))
        labels = torch.nn.functional.pad(labels, (0, missing))
    return boxes, scores, labels


def kind_settings(kind: str, **settings: Any) -> dict[str, Any]:
    """The keyword arguments the NMS ``kind`` runs with: those given (not None) that it takes,
    else its own defaults."""
    parameters = inspect.signature(_KINDS[kind]).parameters
    return {
        name: settings[name] if settings.get(name) is not None else parameter.default
        for name, parameter in parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


@register_nms("soft_linear")
def soft_nms_linear(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    iou_threshold: float = 0.3,
    min_score: float = 0.001,
) -> NMSResult:
    """Soft-NMS with the linear decay (:func:`soft_nms`)."""
    return soft_nms(boxes, scores, labels, method="linear", iou_threshold=iou_threshold, score_threshold=min_score)


@register_nms("soft_gaussian")
def soft_nms_gaussian(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, *, sigma: float = 0.5, min_score: float = 0.001
) -> NMSResult:
    """Soft-NMS with the Gaussian decay (:func:`soft_nms`); it has no IoU threshold."""
    return soft_nms(boxes, scores, labels, method="gaussian", sigma=sigma, score_threshold=min_score)


@register_nms("fast")
@per_class
def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float = 0.5) -> KernelOutput:
    """Fast NMS: drop every box a better one overlaps beyond the threshold, suppressed or not."""
    keep = _better_over_worse(box_iou(boxes, boxes)).amax(dim=0) <= iou_threshold  # (N_c,)
    return _kept(keep, scores, boxes)


@register_nms("matrix")
@per_class
def matrix_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    sigma: float = 0.5,
    kernel: Literal["gaussian", "linear"] = "gaussian",
    min_score: float = 0.05,
) -> KernelOutput:
    """Matrix NMS: each box decays by its worst overlap with a better box, compensated by how
    much that better box is itself overlapped; keeps decayed scores >= ``min_score``."""
    overlaps = _better_over_worse(box_iou(boxes, boxes))  # (N_c, N_c) [i, j]: i better
    compensation = overlaps.amax(dim=0)[:, None]  # (N_c, 1): row i, how much box i is overlapped
    if kernel == "gaussian":
        decay = torch.exp((compensation.square() - overlaps.square()) / sigma).amin(dim=0)  # (N_c,)
    elif kernel == "linear":
        decay = ((1 - overlaps) / (1 - compensation).clamp(min=1e-6)).amin(dim=0)
    else:
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    rescored = scores * decay
    return _kept(rescored >= min_score, rescored, boxes)


@register_nms("cluster")
@per_class
def cluster_nms(
    boxes: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float = 0.5, max_iterations: int | None = None
) -> KernelOutput:
    """Cluster-NMS: Fast NMS repeated, counting only kept boxes, until it stops changing:
    exactly greedy NMS's keep set, in matrix steps. ``max_iterations`` caps the steps (None:
    until it converges; 1 is Fast NMS)."""
    keep, _ = _cluster(_better_over_worse(box_iou(boxes, boxes)), iou_threshold, max_iterations)
    return _kept(keep, scores, boxes)


def _score_penalty(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, sigma: float, beta: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster-NMS's score penalty (with the distance term when ``beta`` is given):
    (new scores (N_c,), the converged matrix (N_c, N_c))."""
    iou = box_iou(boxes, boxes)  # (N_c, N_c)
    converged = _cluster(_better_over_worse(iou), iou_threshold)[1]
    penalty = torch.exp(-converged.square() / sigma)  # (N_c, N_c)
    if beta is not None:
        penalty = (penalty + _distance_penalty(boxes, iou, beta) * (converged > 0)).clamp(max=1)
    return scores * penalty.prod(dim=0), converged


@register_nms("cluster_spm")
@per_class
def cluster_nms_spm(
    boxes: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float = 0.5, sigma: float = 0.2, min_score: float = 0.01
) -> KernelOutput:
    """Cluster-NMS with the score penalty mechanism: every box's score decays by its overlaps
    with the kept boxes; boxes scoring above ``min_score`` remain."""
    rescored, _ = _score_penalty(boxes, scores, iou_threshold, sigma, None)
    return _kept(rescored > min_score, rescored, boxes)


@register_nms("cluster_diou")
@per_class
def cluster_nms_spm_diou(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    iou_threshold: float = 0.5,
    sigma: float = 0.2,
    beta: float = 0.6,
    min_score: float = 0.01,
) -> KernelOutput:
    """Cluster-NMS with the score penalty softened by DIoU's centre distance: a box whose
    centre is far from the kept box overlapping it is penalised less."""
    rescored, _ = _score_penalty(boxes, scores, iou_threshold, sigma, beta)
    return _kept(rescored > min_score, rescored, boxes)


@register_nms("cluster_weighted")
@per_class
def cluster_nms_weighted(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    iou_threshold: float = 0.5,
    sigma: float = 0.2,
    beta: float = 0.6,
    min_score: float = 0.01,
    average_iou: float = 0.8,
) -> KernelOutput:
    """``cluster_diou``, then each kept box becomes the average of itself and the boxes it
    overlaps by more than ``average_iou``, weighted by (that IoU, 1 for itself) x their score."""
    rescored, converged = _score_penalty(boxes, scores, iou_threshold, sigma, beta)
    keep = rescored > min_score
    close = converged * (converged > average_iou) + torch.eye(len(scores), device=scores.device)  # (N_c, N_c)
    weights = close[keep] * rescored[None, :]  # (K_c, N_c)
    averaged = weights @ boxes / weights.sum(dim=1, keepdim=True)  # (K_c, 4)
    return torch.nonzero(keep).squeeze(1), rescored[keep], averaged  # (K_c,), (K_c,), (K_c, 4)


@register_nms("diou")
@per_class
def diou_nms(boxes: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float = 0.5, beta: float = 0.6) -> KernelOutput:
    """DIoU-NMS: greedy NMS on IoU - (rho^2 / c^2)^beta, so a box whose centre is far from a
    better one's survives a large overlap (occlusion); greedy's result via Cluster-NMS."""
    iou = box_iou(boxes, boxes)  # (N_c, N_c)
    overlaps = _better_over_worse(iou - _distance_penalty(boxes, iou, beta))
    keep, _ = _cluster(overlaps, iou_threshold)
    return _kept(keep, scores, boxes)


# Every registered name, for configs to validate against (a Literal built from the table).
NMSKind = Literal[tuple(_KINDS)]  # type: ignore[valid-type]
NMS_KINDS: tuple[str, ...] = tuple(_KINDS)


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, kind: str = "hard", **settings: Any
) -> NMSResult:
    """Run the NMS ``kind`` on boxes (N, 4) xyxy, scores (N,), labels (N,).

    ``settings`` (``iou_threshold``, ``sigma``, ``beta``, ``min_score``, ...) reach the kinds
    that take them; others ignore them, and None means the kind's own (paper) value.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown NMS kind {kind!r}; expected one of {', '.join(_KINDS)}")
    given = {name: value for name, value in settings.items() if value is not None and name in _SETTINGS[kind]}
    return _KINDS[kind](boxes, scores, labels, **given)
