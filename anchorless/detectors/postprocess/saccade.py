"""CornerNet-Saccade's two-step inference, the parts that are not the network: where to
look, how far to zoom, cutting the crops, bringing their boxes back, and the merge.

1. Each image is downsized so its longer side is each of ``init_sizes`` (255 and 192, the
   second padded to the first's canvas): the *views*. The network predicts, on every view,
   three attention maps (small, medium, large objects) and coarse boxes.
2. Locations come from the coarse boxes (scoring at least ``box_threshold``; zoomed so the
   box's longer side becomes ``target_sides`` 24 / 64 / 192 pixels by its size class) and
   from the attention maps' peaks above ``attention_threshold`` (zoomed by ``zoom_scales``
   4 / 2 / 1 times the view's own zoom). Box-derived locations rank first, each kind by
   score; a location closer than ``location_distance`` zoomed pixels to a better one of a
   similar zoom is dropped (:func:`select_locations`); the first ``k_max`` remain.
3. A ``crop_size`` window centred on each location is cut from the image zoomed by its
   zoom (:func:`zoom_crops`, one batch), the network detects in every crop, boxes touching
   a crop border are dropped (their object runs out of the crop), the rest are mapped back
   to image pixels (:func:`crop_to_image`) and merged with the coarse boxes by Soft-NMS.

Coordinates: a crop with ``origin`` (x0, y0) and zoom z holds the image zoomed by z from
its zoomed pixel (x0, y0) on: crop pixel edge u is image x = (x0 + u) / z. Origins are whole
zoomed pixels, so at zoom 1 a crop is an exact copy of the image's pixels.

Shapes: B images, V = B * len(init_sizes) views, N locations (crops), K candidate boxes
per view or crop, S the crop side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from anchorless.detectors.assigners.attention import size_class
from anchorless.detectors.postprocess.corners import Candidates, CornerPostprocess
from anchorless.detectors.postprocess.heatmap import heatmap_peaks


class Locations(NamedTuple):
    """Places to look at: a centre and a zoom in one image of the batch each."""

    image: torch.Tensor  # (N,) int64 index of the image in the batch
    centres: torch.Tensor  # (N, 2) x, y in image pixels
    zooms: torch.Tensor  # (N,) zoomed pixels per image pixel
    scores: torch.Tensor  # (N,) how sure the step that proposed it is
    from_box: torch.Tensor  # (N,) bool, proposed by a coarse box (ranked before attention)

    @classmethod
    def cat(cls, parts: Sequence["Locations"]) -> "Locations":
        return cls(*(torch.cat(column) for column in zip(*parts)))

    def take(self, index: torch.Tensor) -> "Locations":
        return Locations(*(column[index] for column in self))


def view_locations(
    batch: int, image_size: tuple[int, int], sizes: Sequence[int], device: torch.device | None = None
) -> Locations:
    """Step 1's views: each image's centre, zoomed so its longer side is each of ``sizes``;
    image-major (image 0's views first)."""
    height, width = image_size
    zooms = torch.tensor([size / max(height, width) for size in sizes], device=device)  # (len(sizes),)
    count = batch * len(sizes)
    return Locations(
        image=torch.arange(batch, device=device).repeat_interleave(len(sizes)),
        centres=torch.tensor([[width / 2, height / 2]], device=device).expand(count, 2),
        zooms=zooms.repeat(batch),
        scores=torch.ones(count, device=device),
        from_box=torch.zeros(count, dtype=torch.bool, device=device),
    )


def crop_origins(centres: torch.Tensor, zooms: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 2) top-left corners, in whole zoomed pixels, of ``side``-wide windows centred on
    (N, 2) image-pixel centres zoomed by (N,) zooms."""
    return torch.round(centres * zooms[:, None] - side / 2)


def zoom_crops(
    images: torch.Tensor, locations: Locations, side: int, fill: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) crops of (B, 3, H, W) images, each cut from its image zoomed by its zoom
    around its centre, and their (N, 2) origins (see the module docstring). Outside the image
    a crop holds ``fill`` (3,) (zeros if None). Bilinear resampling through
    ``torch.nn.functional.grid_sample``, one call per image, every crop on the images' device.
    """
    batch, channels, height, width = images.shape
    count = len(locations.image)
    origins = crop_origins(locations.centres, locations.zooms, side)  # (N, 2)
    steps = torch.arange(side, device=images.device, dtype=images.dtype) + 0.5  # crop pixel centres
    xs = (origins[:, 0:1] + steps) / locations.zooms[:, None]  # (N, S) image x of each column
    ys = (origins[:, 1:2] + steps) / locations.zooms[:, None]  # (N, S) image y of each row
    # grid_sample's coordinates with align_corners=False: -1 and 1 are the image's outer edges.
    grid_x, grid_y = xs * (2 / width) - 1, ys * (2 / height) - 1
    fill = torch.zeros(channels, device=images.device) if fill is None else fill.reshape(channels).to(images)
    shifted = images - fill.view(1, channels, 1, 1)  # zero padding of the shifted image is `fill`
    crops = images.new_empty(count, channels, side, side)
    for index in range(batch):
        mine = torch.nonzero(locations.image == index).squeeze(1)  # (n,)
        n = len(mine)
        if n == 0:
            continue
        grid = torch.stack(
            [grid_x[mine][:, None, :].expand(n, side, side), grid_y[mine][:, :, None].expand(n, side, side)], dim=-1
        )  # (n, S, S, 2)
        # The image's crops stacked as one tall grid: one sampling call, no copy of the image per crop.
        sampled = F.grid_sample(
            shifted[index : index + 1], grid.reshape(1, n * side, side, 2), mode="bilinear", padding_mode="zeros",
            align_corners=False,
        )  # (1, 3, n*S, S)  # fmt: skip
        crops[mine] = sampled.view(channels, n, side, side).transpose(0, 1) + fill.view(1, channels, 1, 1)
    return crops, origins


def crop_to_image(boxes: torch.Tensor, origins: torch.Tensor, zooms: torch.Tensor) -> torch.Tensor:
    """(N, K, 4) xyxy boxes in crop pixels -> image pixels, for crops with (N, 2) origins and (N,) zooms."""
    return (boxes + origins.repeat(1, 2)[:, None, :]) / zooms[:, None, None]


def touches_border(boxes: torch.Tensor, side: int, margin: float) -> torch.Tensor:
    """(N, K) bool: the (N, K, 4) crop-pixel box comes within ``margin`` pixels of a border of
    its ``side``-wide crop (the official code: a corner in the map's first or last row or column)."""
    return (boxes[..., :2] < margin).any(dim=-1) | (boxes[..., 2:] > side - margin).any(dim=-1)


def attention_locations(
    attention: Sequence[torch.Tensor],
    strides: Sequence[int],
    views: Locations,
    origins: torch.Tensor,
    image_size: tuple[int, int],
    *,
    threshold: float = 0.3,
    kernel: int = 3,
    zoom_scales: Sequence[float] = (4.0, 2.0, 1.0),
    max_zoom: float = 4.0,
) -> Locations:
    """Locations from the peaks (``kernel`` max-pool) of the V views' attention maps above
    ``threshold``: the centre of the peak's cell in image pixels, zoomed by the map's
    ``zoom_scales`` entry times the view's zoom. Maps (V, 1, h, w) probabilities, small /
    medium / large, with their ``strides`` in view pixels. Peaks outside the image, or asking
    to zoom more than ``max_zoom``, are dropped.

    The centre of the cell, not its corner as the official code (which sits half a cell off).
    """
    height, width = image_size
    parts = []
    for level, (probs, stride) in enumerate(zip(attention, strides)):
        peaks = heatmap_peaks(probs, kernel)  # (V, 1, h, w)
        view, _, ys, xs = torch.nonzero(peaks > threshold, as_tuple=True)  # (n,) each
        in_view = torch.stack([xs, ys], dim=1).to(probs.dtype).add(0.5).mul(stride)  # (n, 2) view pixels
        centres = (in_view + origins[view]) / views.zooms[view, None]  # (n, 2) image pixels
        zooms = views.zooms[view] * zoom_scales[level]  # (n,)
        keep = (
            (centres[:, 0] >= 0) & (centres[:, 0] < width) & (centres[:, 1] >= 0) & (centres[:, 1] < height)
            & (zooms <= max_zoom)
        )  # fmt: skip
        parts.append(Locations(
            views.image[view][keep], centres[keep], zooms[keep], peaks[view, 0, ys, xs][keep],
            torch.zeros(int(keep.sum()), dtype=torch.bool, device=probs.device),
        ))  # fmt: skip
    return Locations.cat(parts)


def box_locations(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image: torch.Tensor,
    *,
    threshold: float = 0.5,
    size_bounds: Sequence[float] = (32.0, 96.0),
    target_sides: Sequence[float] = (24.0, 64.0, 192.0),
    max_zoom: float = 4.0,
) -> Locations:
    """Locations from coarse boxes (M, 4) in image pixels scoring at least ``threshold``: the
    box's centre, zoomed so its longer side becomes the ``target_sides`` entry of its size
    class (small, medium, large; :func:`~anchorless.detectors.assigners.attention.size_class`),
    at most ``max_zoom`` (the official code has no cap; a sliver of a box would zoom without bound).
    """
    keep = scores >= threshold  # (M,)
    boxes, scores, image = boxes[keep], scores[keep], image[keep]
    longer = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1).clamp(min=1.0)  # (M',)
    targets = torch.as_tensor(target_sides, dtype=boxes.dtype, device=boxes.device)
    zooms = (targets[size_class(longer, size_bounds)] / longer).clamp(max=max_zoom)  # (M',)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M', 2)
    return Locations(image, centres, zooms, scores, torch.ones_like(scores, dtype=torch.bool))


def select_locations(
    locations: Locations, *, distance: float = 16.0, zoom_tolerance: float = 0.2, k_max: int = 30
) -> Locations:
    """Rank each image's locations (box-derived first, each kind by score), drop every one
    that a better one already covers, keep the first ``k_max`` per image.

    A location is covered when it lies within ``distance / z`` image pixels of a better one,
    along both axes (z the better one's zoom: ``distance`` zoomed pixels), and the two zooms
    differ by at most ``zoom_tolerance`` (their ratio in [0.8, 1.2] at 0.2). The official code
    measures the smaller of the two axis distances, so one shared row or column covers a
    location; both axes are what "too close" means.
    """
    rank = locations.scores + locations.from_box.to(locations.scores.dtype)  # box-derived above every attention one
    order = torch.sort(rank, descending=True, stable=True).indices
    kept = []
    for index in torch.unique(locations.image):
        mine = order[locations.image[order] == index]  # (n,) best first
        centres, zooms = locations.centres[mine], locations.zooms[mine]  # (n, 2), (n,)
        apart = (centres[:, None, :] - centres[None, :, :]).abs().amax(dim=-1)  # (n, n)
        ratio = zooms[:, None] / zooms[None, :]  # (n, n)
        covers = (apart <= distance / zooms[:, None]) & (ratio >= 1 - zoom_tolerance) & (ratio <= 1 + zoom_tolerance)
        covered = torch.zeros(len(mine), dtype=torch.bool, device=mine.device)
        chosen = []
        # Greedy, as NMS: the list is short (a few dozen), so a plain loop is cheapest.
        for position in range(len(mine)):
            if covered[position]:
                continue
            chosen.append(position)
            if len(chosen) == k_max:
                break
            covered |= covers[position]
        kept.append(mine[chosen])
    index = torch.cat(kept) if kept else order[:0]
    return locations.take(index)


class SaccadePostprocess(CornerPostprocess):
    """CornerNet's pairing and Soft-NMS, plus the numbers of CornerNet-Saccade's two steps
    (see the module docstring; the defaults are the paper's and the official COCO config's).

    Args:
        init_sizes: longer sides of step 1's downsized views (255, 192).
        attention_threshold: attention peaks above it become locations (t = 0.3).
        attention_kernel: max-pool window of the attention peaks (3).
        zoom_scales: zoom of an attention location of a small / medium / large object,
            relative to its view's zoom (s_s 4, s_m 2, s_l 1).
        target_sides: longer side, in zoomed pixels, a box-derived location's box gets, by
            its size class (24, 64, 192).
        size_bounds: longer box sides splitting small / medium / large (32, 96).
        box_threshold: coarse boxes scoring at least this become locations (0.5).
        coarse_threshold: coarse boxes scoring above this join the final merge (0.3).
        location_distance: zoomed pixels within which a location covers a worse one (16).
        zoom_tolerance: how far apart two zooms may be for one to cover the other (0.2).
        k_max: the most crops per image (30, the official ``att_max_crops``): the
            speed/accuracy knob; each crop is one more network pass over ``crop_size`` pixels.
        max_zoom: no location zooms in more than this (4).
        crop_size: side of each crop, and of the views' canvas (255; the network input is
            this rounded up to a multiple of 32, 256).
        border_margin: a crop's boxes within this many crop pixels of its border are dropped
            (4: a corner in the stride-4 map's outer row or column, as the official code).
        (topk, nms, nms_iou, score_threshold, nms_sigma, nms_beta, nms_min_score, corner_topk,
        max_embedding_distance, candidates, peak_kernel as :class:`CornerPostprocess`; the
        official Saccade config: 12 corners, 12 pairs per view or crop, embeddings within
        0.3, Gaussian Soft-NMS with sigma 0.7 at IoU 0.5.)
    """

    def __init__(
        self,
        *,
        nms_sigma: float | None = 0.7,
        corner_topk: int = 12,
        max_embedding_distance: float = 0.3,
        candidates: int = 12,
        init_sizes: Sequence[int] = (255, 192),
        attention_threshold: float = 0.3,
        attention_kernel: int = 3,
        zoom_scales: Sequence[float] = (4.0, 2.0, 1.0),
        target_sides: Sequence[float] = (24.0, 64.0, 192.0),
        size_bounds: Sequence[float] = (32.0, 96.0),
        box_threshold: float = 0.5,
        coarse_threshold: float = 0.3,
        location_distance: float = 16.0,
        zoom_tolerance: float = 0.2,
        k_max: int = 30,
        max_zoom: float = 4.0,
        crop_size: int = 255,
        border_margin: float = 4.0,
        **corners: Any,
    ) -> None:
        super().__init__(
            nms_sigma=nms_sigma, corner_topk=corner_topk, max_embedding_distance=max_embedding_distance,
            candidates=candidates, **corners,
        )  # fmt: skip
        if not init_sizes or min(init_sizes) < 1:
            raise ValueError(f"init_sizes must be one or more positive sides, got {list(init_sizes)}")
        if len(zoom_scales) != 3 or len(target_sides) != 3 or min(*zoom_scales, *target_sides) <= 0:
            raise ValueError(
                f"zoom_scales and target_sides need three positive entries (small, medium, large), "
                f"got {list(zoom_scales)}, {list(target_sides)}"
            )
        if len(size_bounds) != 2 or not 0 < size_bounds[0] < size_bounds[1]:
            raise ValueError(f"size_bounds must be two increasing positive sides, got {list(size_bounds)}")
        if k_max < 0 or crop_size < 32 or max_zoom <= 0:
            raise ValueError(f"k_max must be >= 0, crop_size >= 32, max_zoom > 0; got {k_max}, {crop_size}, {max_zoom}")
        if attention_kernel < 1 or attention_kernel % 2 == 0:
            raise ValueError(f"attention_kernel must be an odd number >= 1, got {attention_kernel}")
        self.init_sizes = tuple(int(s) for s in init_sizes)
        self.attention_threshold, self.attention_kernel = attention_threshold, attention_kernel
        self.zoom_scales, self.target_sides = tuple(zoom_scales), tuple(target_sides)
        self.size_bounds = tuple(size_bounds)
        self.box_threshold, self.coarse_threshold = box_threshold, coarse_threshold
        self.location_distance, self.zoom_tolerance = location_distance, zoom_tolerance
        self.k_max, self.max_zoom, self.crop_size, self.border_margin = k_max, max_zoom, crop_size, border_margin

    def canvas_side(self, size_divisor: int) -> int:
        """The network input's side: ``crop_size`` rounded up to a multiple of ``size_divisor``."""
        return -(-self.crop_size // size_divisor) * size_divisor

    def crop_detections(
        self, outputs: dict[str, Any], crops: Locations, origins: torch.Tensor, image_size: tuple[int, int], stride: int
    ) -> Candidates:
        """The paired boxes of every crop (or view) in image pixels, clipped to the image;
        ``valid`` also drops boxes that touch their crop's border. ``outputs``: the corner
        maps of the N crops (as :meth:`candidates_of`)."""
        side = outputs["tl_heatmap"].shape[-1] * stride
        found = self.candidates_of(outputs, (side, side), stride)  # boxes (N, K, 4) in crop pixels
        valid = found.valid & ~touches_border(found.boxes, side, self.border_margin)  # (N, K)
        height, width = image_size
        boxes = crop_to_image(found.boxes, origins, crops.zooms)  # (N, K, 4)
        boxes = torch.stack(
            [boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height), boxes[..., 2].clamp(0, width),
             boxes[..., 3].clamp(0, height)], dim=-1,
        )  # fmt: skip
        return Candidates(boxes, found.scores, found.labels, valid)

    def next_locations(
        self,
        attention: Sequence[torch.Tensor],
        strides: Sequence[int],
        views: Locations,
        origins: torch.Tensor,
        coarse: Candidates,
        image_size: tuple[int, int],
    ) -> Locations:
        """Step 2's locations from step 1's attention maps and coarse boxes, selected."""
        found = attention_locations(
            attention, strides, views, origins, image_size, threshold=self.attention_threshold,
            kernel=self.attention_kernel, zoom_scales=self.zoom_scales, max_zoom=self.max_zoom,
        )  # fmt: skip
        valid = coarse.valid  # (V, K)
        image = views.image[:, None].expand_as(valid)  # (V, K)
        boxed = box_locations(
            coarse.boxes[valid], coarse.scores[valid], image[valid], threshold=self.box_threshold,
            size_bounds=self.size_bounds, target_sides=self.target_sides, max_zoom=self.max_zoom,
        )  # fmt: skip
        return select_locations(
            Locations.cat([boxed, found]), distance=self.location_distance, zoom_tolerance=self.zoom_tolerance,
            k_max=self.k_max,
        )  # fmt: skip

    def merge(
        self, batch: int, coarse: Candidates, views: Locations, fine: Candidates, crops: Locations
    ) -> list[dict[str, torch.Tensor]]:
        """Per image: its views' boxes scoring above ``coarse_threshold`` and its crops' valid
        boxes, through Soft-NMS and the top ``topk`` (:meth:`finalize`)."""
        keep_coarse = coarse.valid & (coarse.scores > self.coarse_threshold)  # (V, K)
        image = torch.cat([
            views.image[:, None].expand_as(keep_coarse)[keep_coarse], crops.image[:, None].expand_as(fine.valid)[fine.valid]
        ])  # (D,) the image of each detection  # fmt: skip
        boxes = torch.cat([coarse.boxes[keep_coarse], fine.boxes[fine.valid]])  # (D, 4)
        scores = torch.cat([coarse.scores[keep_coarse], fine.scores[fine.valid]])  # (D,)
        labels = torch.cat([coarse.labels[keep_coarse], fine.labels[fine.valid]])  # (D,)
        return [self.finalize(boxes[image == i], scores[image == i], labels[image == i]) for i in range(batch)]
