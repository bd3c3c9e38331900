"""Experiment configuration: YAML files validated by pydantic, with overrides.

A config has five sections (``data``, ``detector``, ``training``, ``evaluation``,
``tracking``) plus a name and a workspace. Every field has a default, every
field can be overridden from the command line as ``key.path=value`` (the value
is parsed as a YAML scalar), and an unknown key or a wrong type is an error that
names the key and the file, never a silent no-op.

The ``detector`` section is resolved by the detectors' own resolver
(``anchorless.detectors.resolve_detector_config``): every key and the type of every
value is checked here, at config time, and the resolved config shows every weight a
detector has under its dotted path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anchorless.detectors import resolve_detector_config
from anchorless.errors import AnchorlessError

DEFAULT_DETECTOR = "onenet"


class ConfigError(AnchorlessError, ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    # inf stays a float through dumps (FCOS's last size range is unbounded), YAML writes `.inf`.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="constants")


def _positive_range(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high:
        raise ValueError(f"expected 0 < low <= high, got {list(value)}")
    return value


class ObjectCropConfig(_Section):
    """CornerNet-Saccade's training crops (Law et al., CornerNet-Lite): each image becomes one
    ``data.image_size`` window around a random object, zoomed so that object's longer side is a
    random size of its size class: 16-32 px (small), 32-96 (medium) or 96 to the window
    (large); in place of the random crop, scale jitter and letterbox (colour jitter and
    flip still apply). An image without objects is zoomed by a random factor of
    ``empty_scale`` and cut at a random place."""

    enabled: bool = False
    centre_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="probability the window is centred on the object (else anywhere it fits)"
    )
    centre_jitter: int = Field(15, ge=0, description="pixels the centred window moves at most, each axis")
    min_side: float = Field(16.0, gt=0.0, description="smallest longer side a small object is zoomed to")
    size_bounds: tuple[float, float] = Field(
        (32.0, 96.0), description="longer sides splitting small, medium and large objects (px, after zoom)"
    )
    empty_scale: tuple[float, float] = Field((0.5, 1.0), description="zoom range of an image without objects")

    @field_validator("size_bounds", "empty_scale")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _positive_range(value)


class AugmentConfig(_Section):
    """Training-time augmentation; evaluation never augments."""

    enabled: bool = True
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    scale_jitter: tuple[float, float] = Field(
        (0.8, 1.2), description="range of the random scale applied before letterboxing"
    )
    crop_prob: float = Field(0.3, ge=0.0, le=1.0, description="probability of a random crop")
    crop_min_fraction: float = Field(
        0.6, gt=0.0, le=1.0, description="smallest crop side as a fraction of the image side"
    )
    color_jitter: float = Field(
        0.2, ge=0.0, le=1.0, description="strength of brightness/contrast/saturation jitter"
    )
    object_crop: ObjectCropConfig = ObjectCropConfig()

    @field_validator("scale_jitter")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _positive_range(value)


class MultiscaleConfig(_Section):
    """Multi-scale training: each optimizer step's batch is resized to one size of ``sizes``.

    The pipeline still letterboxes every image to ``data.image_size`` (with its scale
    jitter); the worker then resizes the whole batch (boxes with it) to the step's size,
    drawn from (training.seed, step) alone, so every rank uses the same size at a step.
    Sizes above ``data.image_size`` upscale its canvas: set ``data.image_size`` to the largest
    for full detail. Evaluation stays at ``data.image_size``.
    """

    enabled: bool = False
    sizes: list[int] = Field(
        default_factory=lambda: [416, 448, 480, 512, 544, 576, 608],
        description="input sides drawn uniformly per step, each a multiple of 32",
    )

    @field_validator("sizes")
    @classmethod
    def _sides(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one size")
        bad = [side for side in value if side < 32 or side % 32]
        if bad:
            raise ValueError(f"every size must be a multiple of 32 and >= 32 (the largest stride), got {bad}")
        return value


class MixupConfig(_Section):
    """Mixup for detection: two training images blended, the boxes of both kept.

    The blend weight is drawn from Beta(alpha, alpha). No detector loss here takes per-box
    weights, so both images' boxes train at full weight, as YOLOX does.
    """

    enabled: bool = False
    prob: float = Field(0.5, ge=0.0, le=1.0, description="probability that an image is mixed with another")
    alpha: float = Field(1.5, gt=0.0, description="Beta(alpha, alpha) blend weight; 1.5 as in YOLOv4/ScaledYOLO")


class DataConfig(_Section):
    """Where the shards are and how images reach the detector."""

    train: str | None = Field(None, description="shard directory of the training split")
    val: str | None = Field(None, description="shard directory of the validation split")
    image_size: int = Field(512, ge=32, description="square network input side, multiple of 32")
    batch_size: int = Field(8, ge=1, description="images per worker per step")
    max_boxes: int = Field(100, ge=1, description="boxes kept per image (padded to this)")
    augment: AugmentConfig = AugmentConfig()
    multiscale: MultiscaleConfig = MultiscaleConfig()
    mixup: MixupConfig = MixupConfig()
    decode_concurrency: int | None = Field(
        None, ge=1, description="parallel decode/augment tasks; None lets Ray decide"
    )
    prefetch_batches: int = Field(2, ge=0, description="batches prefetched per worker")
    cache_encoded: Literal["auto", "always", "never"] = Field(
        "auto",
        description="keep the shards' encoded rows in Ray's object store after one read, so epochs "
        "only decode; auto = when they fit in a quarter of the object store",
    )
    stream_rows: int = Field(
        4096,
        ge=1,
        description="with the training split cached, one Ray Data execution streams enough passes over "
        "it for about this many rows (each execution's start-up is paid once per this many rows)",
    )

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32 (the largest detector stride), got {value}")
        return value


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0.0, description="peak learning rate for the whole batch")
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(_Section):
    kind: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps from warmup_factor*lr")
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0)
    warmup_seconds: float | None = Field(
        None,
        gt=0.0,
        description="with training.time_budget_minutes: warm up over this many training seconds instead of "
        "warmup_steps steps",
    )
    milestones: list[float] = Field(
        default_factory=lambda: [0.67, 0.89],
        description="step schedule: fractions of the total steps where lr is multiplied by gamma",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")


class CheckpointConfig(_Section):
    every_epochs: int = Field(1, ge=1)
    keep_best: int = Field(2, ge=1, description="best checkpoints kept by `metric`, plus the latest")
    metric: str = "AP"
    mode: Literal["max", "min"] = "max"
    storage: str | None = Field(
        None,
        description="where Ray Train keeps the checkpoints: a directory or a URI such as s3://bucket/runs "
        "(every node must reach it; S3 endpoint from $AWS_ENDPOINT_URL); None = <workspace>/runs",
    )


class EmaConfig(_Section):
    """An exponential moving average of the weights (and BatchNorm statistics).

    Updated after every optimizer step with decay ``decay * (1 - exp(-updates / tau))``
    (small at first, so early weights are forgotten); when enabled it is the model that is
    evaluated, checkpointed and exported.
    """

    enabled: bool = False
    decay: float = Field(0.9998, gt=0.0, lt=1.0, description="the decay once warmed up")
    tau: float = Field(2000.0, gt=0.0, description="updates over which the decay ramps up (1 - exp(-t/tau))")


class TrainingConfig(_Section):
    """Ray Train workers and the DeepSpeed engine each of them runs."""

    epochs: int = Field(12, ge=1)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    gpus_per_worker: float = Field(1.0, ge=0.0, description="used only when use_gpu is true")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per worker; None = cpus_per_worker"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="bf16 on GPU: DeepSpeed's bf16 mode; bf16 on CPU: the forward under torch autocast "
        "(bfloat16 matmuls and convolutions, float32 weights, gradients and losses; about 2x faster on "
        "CPUs with native bf16 such as AVX512-BF16 or AMX, slower on others); fp16 needs use_gpu",
    )
    zero_stage: Literal[0, 1, 2] = 0
    sync_batchnorm: bool = Field(
        False,
        description="BatchNorm statistics over the global batch (torch SyncBatchNorm) rather than each "
        "worker's share; needs use_gpu (torch syncs only GPU tensors)",
    )
    grad_clip: float | None = Field(1.0, gt=0.0, description="max gradient norm; None disables")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ema: EmaConfig = EmaConfig()
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="sigmoid focal classification targets become eps/2 and 1-eps/2 (OneNet, FCOS); "
        "detectors without such a loss (Gaussian heatmaps, quality focal loss) refuse a non-zero value",
    )
    checkpoint: CheckpointConfig = CheckpointConfig()
    max_failures: int = Field(2, ge=0, description="worker-group restarts before the run fails")
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss stops the run, or skips that step"
    )
    log_every_steps: int = Field(10, ge=1)
    time_budget_minutes: float | None = Field(
        None,
        gt=0.0,
        description="stop once this much training time is spent (evaluation excluded): the partial "
        "epoch is evaluated and checkpointed; the LR schedule (warmup aside, see schedule.warmup_seconds) "
        "runs over the budget's seconds instead of `epochs`",
    )

    @model_validator(mode="after")
    def _gpu_only_options(self) -> "TrainingConfig":
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision=fp16 needs use_gpu=true; on CPU use fp32 or bf16")
        if self.sync_batchnorm and not self.use_gpu:
            raise ValueError("sync_batchnorm=true needs use_gpu=true (torch's SyncBatchNorm syncs GPU tensors only)")
        warmup_seconds = self.schedule.warmup_seconds
        if warmup_seconds is not None:
            if self.time_budget_minutes is None:
                raise ValueError("schedule.warmup_seconds needs time_budget_minutes (without a budget warm up by warmup_steps)")
            if warmup_seconds >= self.time_budget_minutes * 60:
                raise ValueError(
                    f"schedule.warmup_seconds={warmup_seconds:g} is not shorter than the "
                    f"time_budget_minutes={self.time_budget_minutes:g} budget"
                )
        return self


class EvaluationConfig(_Section):
    every_epochs: int = Field(1, ge=1)
    every_steps: int | None = Field(None, ge=1, description="also evaluate every N steps")
    batch_size: int = Field(8, ge=1)
    duplicate_score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    duplicate_iou_threshold: float = Field(0.5, gt=0.0, le=1.0)


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI or a SQLite store in the workspace"
    )
    experiment: str = "anchorless"
    run_name: str | None = Field(None, description="None = the config's name")
    registered_model: str | None = Field(None, description="register the final model under this name")
    artifact_location: str | None = Field(
        None,
        description="where a new experiment keeps its artifacts, e.g. s3://bucket/mlflow; None = the store's "
        "default (<workspace>/mlartifacts for the embedded store, the server's choice for a server)",
    )


class ExperimentConfig(_Section):
    name: str = "experiment"
    workspace: str = Field("workspace", description="runs, checkpoints and the local MLflow store")
    data: DataConfig = DataConfig()
    detector: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_DETECTOR}, validate_default=True)
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("detector", mode="before")
    @classmethod
    def _resolve_detector(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping with a `name`, got {type(value).__name__}")
        # DetectorConfigError is a ValueError whose message starts with the dotted key.
        return resolve_detector_config({"name": DEFAULT_DETECTOR, **value})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to leaf values, e.g. for MLflow params."""
        return flatten(self.to_dict())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``a.b.c=value`` strings to (path, value) pairs, values parsed as YAML scalars."""
    parsed = []
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {override!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {override!r}: value is not valid YAML ({exc.problem})") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in a raw config dict; validation checks the keys."""
    result = copy.deepcopy(raw)
    for path, value in parse_overrides(overrides):
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return result


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        if message.startswith("detector."):  # already carries its own dotted path
            lines.append(f"{source}: {message}")
        else:
            lines.append(f"{source}: {location}: {message}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def build_config(raw: Mapping[str, Any], source: str = "<config>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " (with overrides)"
    return build_config(apply_overrides(raw, overrides), source)
