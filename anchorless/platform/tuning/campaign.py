"""Campaign files: a base training config plus a search space over dotted paths.

```yaml
name: onenet-assigner
base: configs/quickstart.yaml          # relative to this file
overrides: [training.epochs=4]         # applied to the base for every trial
search_space:
  detector.assigner.cost_cls: {uniform: [1.0, 4.0]}
  training.optimizer.lr: {loguniform: [5.0e-5, 5.0e-4]}
  detector.assigner.cost_giou: {choice: [1.0, 2.0, 3.0]}
search: {algorithm: optuna, seed: 0}
scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
num_samples: 8
max_concurrent_trials: 1
metric: AP
mode: max
```

Every searched path must exist in the resolved base config, and every value a
distribution can produce is validated against the config schema before any trial
starts, so a typo never costs a cluster-hour.

With ``scheduler: {kind: pbt, perturbation_interval: N, quantile_fraction: F}`` the
trials are a population: every N checkpointed epochs the bottom fraction F continues
from a copy of a top trial's checkpoint, with that trial's hyperparameters perturbed
(:func:`to_pbt_mutations`) and kept inside the searched ranges (:class:`KeepInRange`).
``synch: true`` makes every exploit wait until all trials reached that epoch, so a
trial that runs ahead (or alone, when the cluster fits fewer trials than the
population) is always compared with the whole population. A trial's last epoch is
never a perturbation point: there is nothing left to train from a clone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anchorless.platform.config import ConfigError, ExperimentConfig, apply_overrides, build_config, read_yaml

DISTRIBUTIONS = ("uniform", "quniform", "loguniform", "randint", "choice", "grid")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchConfig(_Strict):
    algorithm: Literal["random", "grid", "optuna"] = "random"
    seed: int | None = 0


class SchedulerConfig(_Strict):
    kind: Literal["fifo", "asha", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep 1/reduction_factor at each rung")
    perturbation_interval: int = Field(2, ge=1, description="PBT: epochs between exploit/explore steps")
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5, description="PBT: bottom fraction that copies the top")
    synch: bool = Field(
        False,
        description="PBT: exploit only once every trial reached the perturbation epoch (trials ahead wait, paused); "
        "otherwise each trial is compared with the others' latest results as it reports",
    )


class CampaignConfig(_Strict):
    name: str
    base: str = Field(description="training config the trials start from, relative to the campaign file")
    overrides: list[str] = Field(default_factory=list)
    search_space: dict[str, dict[str, Any]]
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    num_samples: int = Field(8, ge=1, description="trials (for grid: repeats of the whole grid)")
    max_concurrent_trials: int = Field(1, ge=1)
    metric: str = "AP"
    mode: Literal["max", "min"] = "max"
    register_best: bool = Field(True, description="register the best trial's model under the base config's name")

    @field_validator("search_space")
    @classmethod
    def _distributions(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not space:
            raise ValueError("must name at least one dotted config path to search")
        for path, spec in space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{path}: expected one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}, got {spec!r}")
            kind, args = next(iter(spec.items()))
            if kind in ("choice", "grid"):
                if not isinstance(args, list) or not args:
                    raise ValueError(f"{path}: {kind} needs a non-empty list of values")
            elif kind == "quniform":
                if not (isinstance(args, list) and len(args) == 3 and args[0] < args[1] and args[2] > 0):
                    raise ValueError(f"{path}: quniform needs [low, high, q] with low < high, q > 0")
            else:
                if not (isinstance(args, list) and len(args) == 2 and args[0] < args[1]):
                    raise ValueError(f"{path}: {kind} needs [low, high] with low < high")
                if kind == "loguniform" and args[0] <= 0:
                    raise ValueError(f"{path}: loguniform needs low > 0")
        return space

    @model_validator(mode="after")
    def _algorithm_fits_space(self) -> "CampaignConfig":
        kinds = {next(iter(spec)) for spec in self.search_space.values()}
        if self.search.algorithm == "grid" and kinds - {"grid", "choice"}:
            raise ValueError("search.algorithm=grid needs every dimension to be grid or choice")
        if self.search.algorithm == "optuna" and "grid" in kinds:
            raise ValueError("grid dimensions need search.algorithm=grid or random, not optuna")
        return self


def extreme_values(spec: dict[str, Any]) -> list[Any]:
    """Values at the edges of a distribution, enough to type-check a path."""
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":  # Tune's randint excludes the upper bound
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def to_tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Our YAML distributions to Ray Tune's search-space objects, keyed by dotted path."""
    from ray import tune

    build = {
        "uniform": lambda a: tune.uniform(*a),
        "quniform": lambda a: tune.quniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
    }
    return {path: build[kind](args) for path, spec in space.items() for kind, args in spec.items()}


def to_pbt_mutations(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: what its explore step may do to each searched path.

    ``choice``/``grid`` become plain lists, so explore moves to a neighbouring value (or
    resamples); a Tune ``Categorical`` would instead be multiplied by 0.8 or 1.2, and a
    ``grid_search`` dict is not a mutation PBT understands at all. Ranges stay Tune
    domains: explore multiplies by 0.8 or 1.2, or resamples.
    """
    domains = to_tune_space({path: spec for path, spec in space.items() if next(iter(spec)) not in ("choice", "grid")})
    return {path: list(spec[next(iter(spec))]) if path not in domains else domains[path] for path, spec in space.items()}


class KeepInRange:
    """PBT ``custom_explore_fn``: puts explored values back inside the searched ranges.

    PBT multiplies a value by 0.8 or 1.2 with no bound; clipped to ``[low, high]`` (and
    to the grid of ``quniform``, the integers of ``randint``) every trial config stays
    one that :func:`load_campaign` type-checked at the range's edges.
    A class rather than a closure so Tune can pickle the scheduler with the campaign state.
    """

    def __init__(self, space: dict[str, dict[str, Any]]) -> None:
        self.ranges = {path: spec for path, spec in space.items() if next(iter(spec)) not in ("choice", "grid")}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for path, spec in self.ranges.items():
            if path not in config:
                continue
            kind, args = next(iter(spec.items()))
            low, high = (args[0], args[1] - 1) if kind == "randint" else (args[0], args[1])
            value = min(max(config[path], low), high)
            if kind == "quniform":
                value = min(max(round(value / args[2]) * args[2], low), high)
            config[path] = int(round(value)) if kind == "randint" else value
        return config


def trial_config(base_raw: dict[str, Any], overrides: list[str], params: dict[str, Any], source: str) -> ExperimentConfig:
    """The resolved config of one trial: base, campaign overrides, then the sampled params."""
    sampled = [f"{path}={_yaml_scalar(value)}" for path, value in params.items()]
    return build_config(apply_overrides(base_raw, [*overrides, *sampled]), source)


def absolute_path_overrides(cfg: ExperimentConfig, cwd: str | Path | None = None) -> list[str]:
    """Overrides that pin the config's relative local paths to ``cwd`` (default: this directory).

    Tune runs each trial in a directory of its own, where ``workspace/...`` or
    ``sqlite:///workspace/mlflow.db`` would name something else; the campaign driver
    resolves them once and hands them to every trial. URIs (``s3://...``) are left alone.
    """
    base = Path(cwd or Path.cwd())
    pinned = []
    for dotted, value in (("workspace", cfg.workspace), ("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if value and "://" not in str(value) and not Path(value).is_absolute():
            pinned.append(f"{dotted}={base / value}")
    uri = cfg.tracking.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        pinned.append(f"tracking.tracking_uri=sqlite:///{base / uri.removeprefix('sqlite:///')}")
    return pinned


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


@dataclass(frozen=True)
class Campaign:
    spec: CampaignConfig
    path: Path
    base_path: Path
    base_raw: dict[str, Any]  # the base file as written; trials apply overrides to it
    base: ExperimentConfig  # the base with the campaign's overrides, resolved

    def trial(self, params: dict[str, Any]) -> ExperimentConfig:
        return trial_config(self.base_raw, self.spec.overrides, params, f"{self.path} trial {params}")


def load_campaign(path: str | Path, overrides: Sequence[str] = ()) -> Campaign:
    """Read and check a campaign file.

    ``overrides`` whose first key is a campaign field (``num_samples=2``,
    ``scheduler.kind=fifo``) change the campaign; all others (``data.train=...``,
    ``training.epochs=2``) are added to its base-config overrides for every trial.
    """
    path = Path(path)
    own = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in CampaignConfig.model_fields]
    raw = apply_overrides(read_yaml(path), own)
    for_trials = [o for o in overrides if o not in own]
    if for_trials:
        raw["overrides"] = [*raw.get("overrides", []), *for_trials]
    try:
        campaign = CampaignConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    base_path = (path.parent / campaign.base) if not Path(campaign.base).is_absolute() else Path(campaign.base)
    if not base_path.exists() and Path(campaign.base).exists():
        base_path = Path(campaign.base)  # also accept paths relative to the working directory
    base_raw = read_yaml(base_path)
    base = build_config(apply_overrides(base_raw, campaign.overrides), f"{base_path} (campaign {path.name})")
    known = base.flat()
    for dotted, spec in campaign.search_space.items():
        if dotted not in known:
            raise ConfigError(f"{path}: search_space.{dotted}: not a field of the base config {base_path}")
        for value in extreme_values(spec):
            trial_config(base_raw, campaign.overrides, {dotted: value}, f"{path}: search_space.{dotted}={value!r}")
    return Campaign(spec=campaign, path=path, base_path=base_path, base_raw=base_raw, base=base)
