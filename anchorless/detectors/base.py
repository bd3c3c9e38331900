"""What every dense detector shares: building from its ``components`` table, input
normalisation, target checks, loss summing, the cross-rank loss normaliser, and the
forward / predict contract.

Contract: ``forward(images, targets=None)`` with ``images`` (B, 3, H, W) floats in [0, 1]
(H, W multiples of 32) and ``targets`` a list of B dicts with ``boxes`` (N, 4) xyxy in input
pixels and ``labels`` (N,) int64 in 0..C-1. With targets it returns the named weighted
losses plus ``loss`` (their sum); without, per-image detections. ``predict(images)`` runs
in eval mode without gradients and returns ``[{"boxes", "scores", "labels"}]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

# ImageNet statistics of torchvision's ResNet weights, for images in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = Mapping[str, torch.Tensor]
Detections = list[dict[str, torch.Tensor]]
# A detector's parts, in the order they are built and passed to BaseDetector.__init__.
SECTIONS = ("backbone", "neck", "head", "assigner", "loss", "postprocess")


class DetectorConfigError(ValueError):
    """A detector config is wrong; the message starts with the dotted key, e.g.
    ``detector.assigner.cost_gio: unknown key; expected one of ...``."""


def reduce_normalizer(
    value: float | torch.Tensor, device: torch.device | None = None, min_value: float = 1.0
) -> torch.Tensor:
    """A loss normaliser averaged over ranks and clamped to >= min_value (as the official codes do).

    All ranks then divide by the same number, so a rank with few objects does not get
    an outsized gradient; on one process it is just ``max(value, min_value)``.
    """
    total = torch.as_tensor(value, dtype=torch.float32, device=device).detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return total.clamp(min=min_value)


def grid_points(height: int, width: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """Centres (x, y) of the cells of a stride-s map, row-major: (H*W, 2), at s*i + s//2."""
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + stride // 2  # (W,)
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + stride // 2  # (H,)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)  # (H*W, 2)


def as_float32(outputs: Any) -> Any:
    """``outputs`` (tensors in nested dicts, lists, tuples) with low-precision float tensors cast to float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() and outputs.dtype != torch.float64 else outputs
    if isinstance(outputs, Mapping):
        return {key: as_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(as_float32(value) for value in outputs)
    return outputs


def sum_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``loss``, the sum of the (already weighted) named terms."""
    losses = dict(losses)
    losses["loss"] = torch.stack(list(losses.values())).sum()
    return losses


class BaseDetector(nn.Module):
    """Base of the dense detectors: backbone -> neck -> head, then losses or inference.

    Subclasses set ``components``, the class of each section (the registry reads each
    one's keyword-only arguments as that section's config), optionally ``defaults``
    (per-section overrides of those arguments), and implement
    ``forward_head(features) -> outputs``, ``losses(outputs, targets, image_size) -> dict``
    and ``inference(outputs, image_size) -> list[dict]``.
    """

    size_divisor = 32
    components: ClassVar[dict[str, type[nn.Module]]]
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        assigner: nn.Module,
        loss: nn.Module,
        postprocess: nn.Module,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone, self.neck, self.head = backbone, neck, head
        self.assigner, self.loss, self.postprocess = assigner, loss, postprocess
        # Buffers, so an exported model normalises by itself.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.config: dict[str, Any] = {}  # the resolved config, set by build_detector

    # ------------------------------------------------------------------ contract
    def forward(
        self, images: torch.Tensor, targets: Sequence[Target] | None = None
    ) -> dict[str, torch.Tensor] | Detections:
        image_size, outputs = self._network(images)
        # Under a caller's autocast (bf16 training) the network runs in low precision, but
        # assignment, losses and decoding stay float32: costs and box sums need the bits.
        with torch.autocast(images.device.type, enabled=False):
            if targets is None:
                return self.inference(outputs, image_size)
            targets = self._check_targets(targets, images)
            return sum_losses(self.losses(outputs, targets, image_size))

    def _network(self, images: torch.Tensor) -> tuple[tuple[int, int], dict[str, Any]]:
        """(image size, the head's outputs in float32) of normalised images."""
        image_size = self._check_images(images)
        features = self.neck(self.backbone((images - self.pixel_mean) / self.pixel_std))
        return image_size, as_float32(self.forward_head(features))

    @torch.no_grad()
    def predict_padded(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The detections of :meth:`predict` as fixed-shape batch tensors, the form a deployment
        graph (ONNX) returns: ``boxes`` (B, K, 4), ``scores`` (B, K), ``labels`` (B, K), K =
        ``postprocess.topk``, best first, padded with score 0. Decoded batch-wide, without a
        Python loop over images, so the whole path traces into one graph. Use in eval mode."""
        image_size, outputs = self._network(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.inference_padded(outputs, image_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Detections:
        """Detections per image, in eval mode and without gradients (mode restored after)."""
        was_training = self.training
        self.eval()
        try:
            return self(images)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, num_classes: int, cfg: Mapping[str, Mapping[str, Any]]) -> BaseDetector:
        """Build every section from ``cls.components[section]`` with its resolved settings.

        The backbone returns the strides the neck takes, the neck's channels (and strides)
        feed the head; the loss, assigner and post-processing take their settings plus
        whatever :meth:`part_inputs` passes (the loss is built first, so an assigner can
        match on the loss's own terms).
        """
        table = cls.components
        parts: dict[str, nn.Module] = {}
        parts["backbone"] = cls.make("backbone", table["backbone"], table["neck"].in_strides, **cfg["backbone"])
        parts["neck"] = cls.make("neck", table["neck"], parts["backbone"].out_channels, **cfg["neck"])
        parts["head"] = cls.make("head", table["head"], *cls.head_inputs(parts["neck"], num_classes), **cfg["head"])
        for section in ("loss", "assigner", "postprocess"):
            parts[section] = cls.make(section, table[section], *cls.part_inputs(section, parts), **cfg[section])
        cls.check_parts(parts)
        return cls(num_classes, **parts)

    @classmethod
    def head_inputs(cls, neck: nn.Module, num_classes: int) -> tuple[Any, ...]:
        """The head's positional arguments: the neck's width and the class count."""
        return neck.out_channels[0], num_classes

    @classmethod
    def part_inputs(cls, section: str, parts: Mapping[str, nn.Module]) -> tuple[Any, ...]:
        """Positional arguments of the loss, assigner or post-processing, from the parts built
        before it (none by default; OneNet's assigner takes its loss's IoU kind)."""
        return ()

    @classmethod
    def check_parts(cls, parts: Mapping[str, nn.Module]) -> None:
        """Raise :class:`DetectorConfigError` where built parts do not fit together."""

    @staticmethod
    def make(section: str, factory: Any, *args: Any, **kwargs: Any) -> Any:
        """Build one component, turning its argument errors into a config error naming the section."""
        try:
            return factory(*args, **kwargs)
        except DetectorConfigError:
            raise
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise DetectorConfigError(f"detector.{section}: {error}") from error

    # ------------------------------------------------------------------ to implement
    def inference_padded(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """:meth:`inference` batch-wide with fixed shapes (see :meth:`predict_padded`)."""
        raise NotImplementedError(f"{type(self).__name__} has no batch-wide decoding, so it cannot be exported")

    def forward_head(self, features: list[torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def losses(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def inference(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> Detections:
        raise NotImplementedError

    # ------------------------------------------------------------------ checks
    def _check_images(self, images: torch.Tensor) -> tuple[int, int]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
        height, width = images.shape[-2:]
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(f"image height and width must be multiples of {self.size_divisor}, got {height}x{width}")
        return int(height), int(width)

    def _check_targets(self, targets: Sequence[Target], images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Validate targets and drop zero-size boxes.

        A box with no width or height has no location to learn and makes IoU costs 0/0,
        so it is dropped here (the data pipeline already drops and counts them).
        """
        if len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} targets for {images.shape[0]} images")
        checked = []
        for i, target in enumerate(targets):
            boxes = torch.as_tensor(target["boxes"], dtype=images.dtype, device=images.device).reshape(-1, 4)
            labels = torch.as_tensor(target["labels"], dtype=torch.long, device=images.device).reshape(-1)
            if boxes.shape[0] != labels.shape[0]:
                raise ValueError(f"targets[{i}]: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"targets[{i}]: labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
            if not torch.isfinite(boxes).all():
                raise ValueError(f"targets[{i}]: boxes contain NaN or inf")
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (N,)
            checked.append({"boxes": boxes[keep], "labels": labels[keep]})
        return checked


class SingleMapDetector(BaseDetector):
    """A backbone, a neck that fuses its maps into one stride-4 map (CenterNet's
    deconvolution upsampler, as OneNet uses it too), and one head on that map."""

    stride = 4


class PyramidDetector(BaseDetector):
    """A backbone, an FPN neck (P3-P7) and one head shared by every level (FCOS, GFL); the
    head gets the neck's strides, and every level's locations are laid out one after another."""

    @classmethod
    def head_inputs(cls, neck: nn.Module, num_classes: int) -> tuple[Any, ...]:
        return neck.out_channels[0], num_classes, neck.out_strides

    @staticmethod
    def locations(features: Sequence[torch.Tensor], strides: Sequence[int]) -> dict[str, Any]:
        """The locations of all levels: ``points`` (R, 2) xy in input pixels, ``point_strides``
        (R,), ``point_levels`` (R,) and ``level_sizes`` (R_l of each level)."""
        device = features[0].device
        points, point_strides, point_levels, sizes = [], [], [], []
        for level, (feature, stride) in enumerate(zip(features, strides)):
            height, width = feature.shape[-2:]
            points.append(grid_points(height, width, stride, device))  # (H_l*W_l, 2)
            point_strides.append(torch.full((height * width,), stride, device=device))
            point_levels.append(torch.full((height * width,), level, device=device, dtype=torch.long))
            sizes.append(height * width)
        return {
            "points": torch.cat(points),  # (R, 2)
            "point_strides": torch.cat(point_strides),  # (R,)
            "point_levels": torch.cat(point_levels),  # (R,)
            "level_sizes": sizes,  # L ints
        }
