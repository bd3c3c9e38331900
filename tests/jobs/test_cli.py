"""The command line: help, resolved configs, and one-line errors with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from anchorless.jobs.cli import main


def test_help_lists_the_verbs(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for verb in ("quickstart", "config", "data", "train", "evaluate", "predict"):
        assert verb in out


def test_config_show_prints_the_resolved_config_with_overrides(capsys):
    assert main(["config", "show", "training.epochs=3", "detector.assigner.cost_l1=4.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["epochs"] == 3
    assert shown["detector"]["assigner"]["cost_l1"] == 4.5
    assert shown["detector"]["assigner"]["cost_giou"] == 2.0


def test_config_error_is_one_line_on_stderr_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochz: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "anchorless.jobs.cli", "config", "show", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}: training.epochz: unknown key"
    assert "Traceback" not in result.stderr


def test_config_show_refuses_a_wrong_typed_detector_value_naming_the_key(capsys):
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    assert main(["config", "show", str(quickstart), "detector.assigner.cost_giou=abc"]) == 2
    error = capsys.readouterr().err
    assert "detector.assigner.cost_giou: expected float, got str 'abc'" in error


def test_data_synth_writes_the_coco_layout(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--num-images", "6", "--size", "64"]) == 0
    assert (tmp_path / "annotations" / "instances_train.json").exists()
    assert (tmp_path / "annotations" / "instances_val.json").exists()
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 6


def test_train_address_of_the_local_cluster_joins_with_its_token(tmp_path, monkeypatch):
    from anchorless.cluster import local
    from anchorless.jobs.cli import _join_local_cluster_with_its_token, build_parser

    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "")  # recorded, so what the test sets is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv(local.STATE_DIR_ENV, str(tmp_path))
    token_file = tmp_path / "token"
    local.write_state(tmp_path, {
        "version": local.STATE_VERSION, "ray_address": "127.0.0.1:41001",
        "dashboard_url": "http://127.0.0.1:41003", "token_file": str(token_file),
    })  # fmt: skip

    other = build_parser().parse_args(["train", "c.yaml", "--address", "10.0.0.5:6379"])
    _join_local_cluster_with_its_token(other)  # another cluster: its own credentials
    assert "RAY_AUTH_MODE" not in os.environ and other.address == "10.0.0.5:6379"

    args = build_parser().parse_args(["train", "c.yaml", "--address", "http://127.0.0.1:41003/"])
    _join_local_cluster_with_its_token(args)
    assert args.address == "127.0.0.1:41001"  # the dashboard's URL means the cluster's GCS
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token_file)


def test_overrides_may_follow_an_option_and_other_stray_words_are_still_refused(capsys):
    from anchorless.jobs.cli import _parse_with_overrides_anywhere, build_parser

    args = _parse_with_overrides_anywhere(build_parser(), ["train", "x.yaml", "a.b=1", "--restart", "c.d=2", "e=3"])
    assert (args.config, args.restart, args.overrides) == ("x.yaml", True, ["a.b=1", "c.d=2", "e=3"])
    for stray in (["train", "x.yaml", "--restart", "oops"], ["train", "x.yaml", "--restart", "--nope=1"]):
        try:
            _parse_with_overrides_anywhere(build_parser(), stray)
            raise AssertionError(f"{stray} was accepted")
        except SystemExit as exit_:
            assert exit_.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
