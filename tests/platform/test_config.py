"""The config schema: defaults, overrides, and errors that name the key and the file."""

from pathlib import Path

import pytest
import yaml

from anchorless.platform.config import ConfigError, apply_overrides, load_config, parse_overrides


def write(tmp_path: Path, content: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return path


def test_defaults_resolve_every_detector_weight_under_a_dotted_path():
    cfg = load_config(None)
    flat = cfg.flat()
    assert flat["detector.name"] == "onenet"
    assert flat["detector.assigner.cost_cls"] == 2.0
    assert flat["detector.assigner.cost_l1"] == 5.0
    assert flat["detector.assigner.cost_giou"] == 2.0
    assert flat["training.optimizer.name"] == "adamw"


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    path = write(tmp_path, {"name": "x", "training": {"epochs": 3}})
    cfg = load_config(
        path,
        [
            "training.epochs=7",
            "training.optimizer.lr=2e-4",
            "detector.assigner.cost_giou=3",
            "data.augment.enabled=false",
            "tracking.registered_model=shapes",
            "data.augment.scale_jitter=[0.5, 1.5]",
        ],
    )
    assert cfg.training.epochs == 7
    assert cfg.training.optimizer.lr == pytest.approx(2e-4)
    assert cfg.detector["assigner"]["cost_giou"] == 3
    assert cfg.data.augment.enabled is False
    assert cfg.tracking.registered_model == "shapes"
    assert cfg.data.augment.scale_jitter == (0.5, 1.5)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, {"training": {"epochz": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "training.epochz" in message and "unknown key" in message


def test_unknown_detector_key_names_its_dotted_path(tmp_path):
    path = write(tmp_path, {"detector": {"name": "onenet", "assigner": {"cost_gio": 1.0}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "detector.assigner.cost_gio" in message and "cost_giou" in message


def test_unknown_detector_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"detector.name: unknown detector 'yolo'.*onenet"):
        load_config(None, ["detector.name=yolo"])


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, {"training": {"epochs": "many"}})
    with pytest.raises(ConfigError, match=r"training\.epochs"):
        load_config(path)


def test_a_wrong_typed_detector_value_is_refused_at_config_time_naming_the_key():
    # One resolver (the detectors' own) checks detector values when the config is read,
    # not inside a Ray worker when the detector is built.
    with pytest.raises(ConfigError, match=r"detector\.assigner\.cost_giou: expected float, got str 'abc'"):
        load_config(None, ["detector.assigner.cost_giou=abc"])
    with pytest.raises(ConfigError, match=r"detector\.backbone\.depth: expected"):
        load_config(None, ["detector.backbone.depth=1.5"])
    assert load_config(None, ["detector.assigner.cost_giou=3"]).detector["assigner"]["cost_giou"] == 3.0


def test_image_size_must_be_a_multiple_of_32():
    with pytest.raises(ConfigError, match=r"data\.image_size.*multiple of 32"):
        load_config(None, ["data.image_size=100"])


def test_fp16_on_cpu_is_refused_and_bf16_is_allowed_on_both():
    with pytest.raises(ConfigError, match=r"precision=fp16 needs use_gpu"):
        load_config(None, ["training.precision=fp16"])
    assert load_config(None, ["training.precision=fp16", "training.use_gpu=true"]).training.precision == "fp16"
    assert load_config(None, ["training.precision=bf16"]).training.precision == "bf16"  # CPU autocast
    assert load_config(None, ["training.precision=bf16", "training.use_gpu=true"]).training.precision == "bf16"


def test_sync_batchnorm_on_cpu_is_refused_before_any_worker_starts():
    with pytest.raises(ConfigError, match=r"sync_batchnorm=true needs use_gpu"):
        load_config(None, ["training.sync_batchnorm=true"])
    assert load_config(None, ["training.sync_batchnorm=true", "training.use_gpu=true"]).training.sync_batchnorm


def test_sync_batchnorm_conversion_keeps_every_weight():
    import torch

    from anchorless.detectors import build_detector

    cfg = load_config(None, ["detector.backbone.norm=bn"])
    model = build_detector(cfg.detector)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_detector(cfg.detector))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert model.state_dict().keys() == synced.state_dict().keys()  # checkpoints stay interchangeable


def test_malformed_override_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["training.epochs"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_through_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_overrides({"name": "x"}, ["name.inner=1"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["training.epochs=4", "detector.name=fcos"])
    again = load_config(write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml")))
def test_every_shipped_config_is_valid(path):
    if path.name.startswith("tune_"):
        pytest.skip("campaign files have their own schema")
    load_config(path)
