"""Campaign files: search spaces over dotted paths, checked before any trial runs."""

import pytest
import yaml

from anchorless.platform.tuning.campaign import load_campaign, to_tune_space
from anchorless.platform.config import ConfigError


def write_campaign(tmp_path, **changes):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"name": "base", "training": {"epochs": 3}}))
    campaign = {
        "name": "assigner",
        "base": "base.yaml",
        "overrides": ["training.epochs=2"],
        "search_space": {
            "detector.assigner.cost_cls": {"uniform": [1.0, 4.0]},
            "training.optimizer.lr": {"loguniform": [5.0e-5, 5.0e-4]},
            "detector.assigner.cost_giou": {"choice": [1.0, 2.0, 3.0]},
        },
        "scheduler": {"kind": "asha", "grace_period": 1},
        "num_samples": 4,
    }
    campaign.update(changes)
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(campaign))
    return path


def test_a_trial_is_the_base_plus_overrides_plus_sampled_params(tmp_path):
    campaign = load_campaign(write_campaign(tmp_path))
    assert campaign.base.training.epochs == 2
    trial = campaign.trial({"detector.assigner.cost_cls": 3.5, "training.optimizer.lr": 1e-4})
    assert trial.detector["assigner"]["cost_cls"] == 3.5
    assert trial.training.optimizer.lr == pytest.approx(1e-4)
    assert trial.training.epochs == 2


def test_search_space_becomes_tune_domains(tmp_path):
    from ray import tune

    space = to_tune_space(load_campaign(write_campaign(tmp_path)).spec.search_space)
    assert isinstance(space["detector.assigner.cost_cls"], tune.search.sample.Float)
    assert space["detector.assigner.cost_cls"].lower == 1.0
    assert space["detector.assigner.cost_giou"].categories == [1.0, 2.0, 3.0]


def test_a_path_that_is_not_in_the_config_is_refused_before_any_trial(tmp_path):
    path = write_campaign(tmp_path, search_space={"detector.assigner.cost_gio": {"uniform": [1, 2]}})
    with pytest.raises(ConfigError, match=r"search_space\.detector\.assigner\.cost_gio: not a field of the base config"):
        load_campaign(path)


def test_a_value_the_schema_rejects_is_refused_before_any_trial(tmp_path):
    path = write_campaign(tmp_path, search_space={"training.epochs": {"choice": [2, 0]}})
    with pytest.raises(ConfigError, match=r"training\.epochs=0.*greater than or equal to 1"):
        load_campaign(path)


def test_malformed_distributions_and_algorithm_mismatch_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.optimizer\.lr: loguniform needs low > 0"):
        load_campaign(write_campaign(tmp_path, search_space={"training.optimizer.lr": {"loguniform": [0, 1]}}))
    with pytest.raises(ConfigError, match=r"expected one of"):
        load_campaign(write_campaign(tmp_path, search_space={"training.optimizer.lr": {"normal": [0, 1]}}))
    with pytest.raises(ConfigError, match="grid needs every dimension"):
        load_campaign(write_campaign(tmp_path, search={"algorithm": "grid"}))


def test_command_line_overrides_split_between_campaign_and_trials(tmp_path):
    campaign = load_campaign(write_campaign(tmp_path), ["num_samples=2", "training.epochs=5", "data.batch_size=4"])
    assert campaign.spec.num_samples == 2
    assert campaign.base.training.epochs == 5 and campaign.base.data.batch_size == 4
    assert campaign.trial({"detector.assigner.cost_cls": 2.0}).data.batch_size == 4


def test_relative_local_paths_are_pinned_for_trials_that_run_in_their_own_directories(tmp_path):
    from anchorless.platform.tuning.campaign import absolute_path_overrides
    from anchorless.platform.config import build_config

    cfg = build_config(
        {
            "workspace": "workspace",
            "data": {"train": "workspace/shards/train", "val": "s3://bucket/val"},
            "tracking": {"tracking_uri": "sqlite:///workspace/mlflow.db"},
        }
    )
    assert absolute_path_overrides(cfg, tmp_path) == [
        f"workspace={tmp_path / 'workspace'}",
        f"data.train={tmp_path / 'workspace/shards/train'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'workspace/mlflow.db'}",
    ]
    pinned = build_config({"workspace": str(tmp_path), "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}})
    assert absolute_path_overrides(pinned, "/elsewhere") == []  # absolute paths and 4-slash sqlite URIs stay


def test_concurrent_trials_are_capped_so_that_decoding_keeps_a_whole_cpu():
    from anchorless.platform.tuning.runner import trials_that_fit

    # Two one-worker trials hold 2.02 CPUs: on three CPUs 0.98 would be left and Ray Data's
    # one-CPU decode tasks could never run, so one trial runs at a time; four CPUs fit both.
    assert trials_that_fit(2, worker_cpus=1, cluster_cpus=3) == 1
    assert trials_that_fit(2, worker_cpus=1, cluster_cpus=4) == 2
    assert trials_that_fit(8, worker_cpus=2, cluster_cpus=16) == 7  # 7 x 2.01 = 14.07, 15 leaves 0.93
    assert trials_that_fit(3, worker_cpus=1, cluster_cpus=64) == 3  # never more than asked for
    assert trials_that_fit(2, worker_cpus=4, cluster_cpus=2) == 1  # at least one: an autoscaler may add CPUs
